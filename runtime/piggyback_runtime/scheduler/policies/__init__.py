"""How BE work shares the accelerator with LS work: one module per policy, registered by being here.

Every module of this package except `base` (and names starting with `_`) defines one `Policy` subclass
with a `name`; the registry finds them with pkgutil, so a new policy is a new file and nothing else:
`engine.policy` accepts its name, and `piggyback serve --help`, `piggyback sim run --policy all`, the
benchmarks and the README's list (checked by a test) show it. Policies outside the package: set
`PIGGYBACK_POLICY_MODULES` to comma-separated importable module names, each defining one subclass the same
way. Pure Python: no torch, no planner import (config.py validates names through `policy_names()`).
The hooks a policy may override, and who asks them when, are in `base.py`.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from types import ModuleType

from piggyback_runtime.scheduler.policies.base import Policy

__all__ = ["EXTRA_MODULES_ENV", "Policy", "make_policy", "markdown_list", "policy_class", "policy_names",
           "registry"]  # fmt: skip

# Comma-separated importable modules with more policies (plugins outside this package).
EXTRA_MODULES_ENV = "PIGGYBACK_POLICY_MODULES"
_NOT_POLICIES = {"base"}


def _policy_modules() -> list[ModuleType]:
    names = [f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__)
             if not m.name.startswith("_") and m.name not in _NOT_POLICIES]  # fmt: skip
    names += [n.strip() for n in os.environ.get(EXTRA_MODULES_ENV, "").split(",") if n.strip()]
    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ImportError as exc:
            raise ImportError(f"policy module {name!r} (from this package or {EXTRA_MODULES_ENV}) does not "
                              f"import: {exc}") from exc  # fmt: skip
    return modules


def _policy_of(module: ModuleType) -> type[Policy]:
    found = [obj for obj in vars(module).values()
             if isinstance(obj, type) and issubclass(obj, Policy) and obj.__module__ == module.__name__
             and "name" in vars(obj)]  # fmt: skip
    if len(found) != 1:
        raise TypeError(f"policy module {module.__name__} must define exactly one Policy subclass with a `name`; "
                        f"found {len(found)}")  # fmt: skip
    return found[0]


def registry() -> dict[str, type[Policy]]:
    """Every policy by name, in listing order (`listing_rank`, then name). Discovered on each call (cheap:
    modules import once), so a module added to `PIGGYBACK_POLICY_MODULES` at run time counts."""
    classes: dict[str, type[Policy]] = {}
    for module in _policy_modules():
        cls = _policy_of(module)
        if cls.name in classes and classes[cls.name] is not cls:
            raise ValueError(f"two policies are named {cls.name!r}: {classes[cls.name].__module__} and "
                             f"{cls.__module__}")  # fmt: skip
        classes[cls.name] = cls
    return dict(sorted(classes.items(), key=lambda item: (item[1].listing_rank, item[0])))


def policy_names() -> list[str]:
    """The names `engine.policy` accepts, in listing order."""
    return list(registry())


def policy_class(name: str) -> type[Policy]:
    policies = registry()
    if name not in policies:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(policies)}")
    return policies[name]


def make_policy(name: str, headroom_be_kv_share: float = 0.3, max_be_requests: int = 256) -> Policy:
    return policy_class(name)(headroom_be_kv_share, max_be_requests)


def markdown_list() -> str:
    """The README's policy list, one bullet per policy (a test keeps the README equal to it)."""
    return "\n".join(f"- `{name}` (`{cls.__module__.removeprefix('piggyback_runtime.').replace('.', '/')}.py`): "
                     f"{cls.summary()}" for name, cls in registry().items())  # fmt: skip
