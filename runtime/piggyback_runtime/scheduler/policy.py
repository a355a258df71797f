"""How BE work shares the accelerator with LS work: one class per policy, chosen once from the config.

Pure Python, no torch. The planner, the model runner and the simulator ask the policy object; nothing else
compares policy names. Adding a policy is one subclass with its `name`: `__init_subclass__` registers it,
and `engine.policy` in the RuntimeConfig accepts the name from then on.

- `piggyback` (the product): BE prefill on the accelerator at low priority, BE decode attention on host CPUs
  against KV in host DRAM, BE rows merged into the Dense batch layer by layer; a latency model decides the
  BE share per iteration and admits LS requests.
- Baselines, same engine: `priority` (BE entirely on the accelerator, after all LS work in the same token
  budget), `ls-only` (Sarathi-Serve-like: BE only while no LS work is held), `headroom` (Llumnix-style: BE
  on the accelerator within a reserved share of KV memory), `neo` (NEO-like: decode attention of every
  request on the CPU, the accelerator waiting for it layer by layer).
"""

from __future__ import annotations

from typing import ClassVar

POLICIES: dict[str, type[Policy]] = {}


class Policy:
    name: ClassVar[str]
    # Service classes whose decode runs with KV in host DRAM and attention on CPU workers.
    host_path_classes: ClassVar[frozenset[str]] = frozenset()
    # The accelerator waits for each layer's CPU attention (NEO); the piggyback path never does.
    synchronous_cpu_attention: ClassVar[bool] = False
    # A latency model chooses the BE share per iteration and admits LS requests (needs slo_control.enabled).
    slo_controlled: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        POLICIES[cls.name] = cls

    def __init__(self, headroom_be_kv_share: float = 0.3, max_be_requests: int = 256) -> None:
        self.headroom_be_kv_share = headroom_be_kv_share
        self.max_be_requests = max_be_requests

    @property
    def uses_host_path(self) -> bool:
        return bool(self.host_path_classes)

    def on_host_path(self, service_class: str) -> bool:
        return service_class in self.host_path_classes

    def be_waits_for(self, ls_work_held: bool) -> bool:
        """Whether BE work sits out this iteration."""
        return False

    def be_kv_block_limit(self, num_blocks: int) -> int | None:
        """Accelerator KV blocks BE requests may hold together; None: no limit beyond the cache itself."""
        return None

    def rows_per_layer(self, configured: int) -> int:
        """BE rows one layer takes when no latency model sets the bound."""
        return configured


class PiggybackPolicy(Policy):
    name = "piggyback"
    host_path_classes = frozenset({"BE"})
    slo_controlled = True


class PriorityPolicy(Policy):
    name = "priority"


class LSOnlyPolicy(Policy):
    name = "ls-only"

    def be_waits_for(self, ls_work_held: bool) -> bool:
        return ls_work_held


class HeadroomPolicy(Policy):
    name = "headroom"

    def be_kv_block_limit(self, num_blocks: int) -> int | None:
        return int(self.headroom_be_kv_share * num_blocks)


class NeoPolicy(Policy):
    name = "neo"
    host_path_classes = frozenset({"LS", "BE"})
    synchronous_cpu_attention = True

    def rows_per_layer(self, configured: int) -> int:
        return self.max_be_requests  # the accelerator waits anyway: every decoding row joins every layer


def make_policy(name: str, headroom_be_kv_share: float = 0.3, max_be_requests: int = 256) -> Policy:
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    return cls(headroom_be_kv_share, max_be_requests)
