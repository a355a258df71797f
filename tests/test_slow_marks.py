"""`make test-fast` runs `pytest -m "not slow"`: this keeps that honest. A test that starts a process or a
server (a subprocess, a multiprocessing worker, an HTTP or API server, the operator) must be marked slow: by
`@pytest.mark.slow` on it or its class, or `pytestmark` in its module.

Read from the source: a test starts something if its body, a module-level function or class it uses, or a
fixture it asks for (from its module or a conftest.py above it) calls one of STARTERS, followed through
module-level helpers and fixture dependencies. Processes started inside the runtime itself (an Engine's
CPU workers) are not visible here; tests that build such engines are marked by hand.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

TESTS = Path(__file__).parent
# Calls that start a process or a server, as `module.attr` (any module where the module is "*").
STARTERS = {
    ("subprocess", "Popen"), ("subprocess", "run"), ("subprocess", "call"), ("subprocess", "check_call"),
    ("subprocess", "check_output"), ("asyncio", "create_subprocess_exec"), ("asyncio", "create_subprocess_shell"),
    ("*", "Process"), ("*", "Pool"), ("*", "Server"),
}  # fmt: skip
# Names imported bare (from subprocess import Popen) or defined in the test suite that start something.
STARTER_NAMES = {"Popen", "ApiServer", "OperatorThread", "running_operator"}


def _is_slow_mark(node: ast.expr) -> bool:
    return "mark.slow" in ast.unparse(node)


@dataclass
class Definitions:
    """Module-level functions, classes and fixtures of one file, and which of them start something."""

    uses: dict[str, set[str]] = field(default_factory=dict)  # name -> names its body refers to
    fixtures: dict[str, set[str]] = field(default_factory=dict)  # fixture -> the fixtures it asks for
    direct: set[str] = field(default_factory=set)  # names whose own body calls a starter
    slow_module: bool = False
    tests: list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef, bool]] = field(default_factory=list)


def _calls_starter(node: ast.AST) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute):
            owner = sub.value.id if isinstance(sub.value, ast.Name) else "*"
            if (owner, sub.attr) in STARTERS or ("*", sub.attr) in STARTERS:
                return True
        elif isinstance(sub, ast.Name) and sub.id in STARTER_NAMES:
            return True
    return False


def _names(node: ast.AST) -> set[str]:
    return {sub.id for sub in ast.walk(node) if isinstance(sub, ast.Name)}


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    return {a.arg for a in [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]}


def _is_fixture(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any("fixture" in ast.unparse(d) for d in fn.decorator_list)


def read(path: Path) -> Definitions:
    defs = Definitions()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in node.targets):
            defs.slow_module = _is_slow_mark(node.value)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defs.uses[node.name] = _names(node)
            if _calls_starter(node):
                defs.direct.add(node.name)
            if not isinstance(node, ast.ClassDef) and _is_fixture(node):
                defs.fixtures[node.name] = _params(node)
            if node.name.startswith(("test_", "Test")):
                marked = any(_is_slow_mark(d) for d in node.decorator_list)
                methods = [m for m in node.body if isinstance(m, ast.FunctionDef | ast.AsyncFunctionDef)
                           and m.name.startswith("test_")] if isinstance(node, ast.ClassDef) else [node]  # fmt: skip
                for fn in methods:
                    slow = marked or any(_is_slow_mark(d) for d in fn.decorator_list)
                    defs.tests.append((f"{node.name}.{fn.name}" if fn is not node else fn.name, fn, slow))
    return defs


def _starting(defs: Definitions, inherited_fixtures: set[str]) -> tuple[set[str], set[str]]:
    """Module-level names and fixture names (this module's and the conftests') that start something."""
    names = set(defs.direct)
    fixtures = set(inherited_fixtures)
    changed = True
    while changed:
        before = len(names) + len(fixtures)
        names |= {n for n, refs in defs.uses.items() if refs & names}
        fixtures |= {f for f, params in defs.fixtures.items() if f in names or params & fixtures}
        names |= fixtures & defs.uses.keys()
        changed = len(names) + len(fixtures) != before
    return names, fixtures


def conftest_fixtures(directory: Path, root: Path) -> set[str]:
    """Fixtures that start something, from every conftest.py from `root` down to `directory`."""
    starting: set[str] = set()
    chain = [directory, *directory.parents]
    for folder in reversed(chain[: chain.index(root) + 1]):
        conftest = folder / "conftest.py"
        if conftest.exists():
            _, fixtures = _starting(read(conftest), starting)
            starting |= fixtures
    return starting


def unmarked_starters(path: Path, root: Path = TESTS) -> list[str]:
    defs = read(path)
    if defs.slow_module:
        return []
    names, fixtures = _starting(defs, conftest_fixtures(path.parent, root))
    found = []
    for name, fn, slow in defs.tests:
        if not slow and (_names(fn) & names or _params(fn) & fixtures or _calls_starter(fn)):
            found.append(f"{path.relative_to(root.parent)}::{name}")
    return found


def test_every_test_that_starts_a_process_or_server_is_marked_slow() -> None:
    unmarked = [t for path in sorted(TESTS.rglob("test_*.py")) for t in unmarked_starters(path)]
    assert not unmarked, (
        "these tests start a process or a server but are not marked slow, so `make test-fast` would run them; "
        "mark them @pytest.mark.slow (or the module: pytestmark = pytest.mark.slow):\n  " + "\n  ".join(unmarked)
    )


def test_the_check_follows_helpers_fixtures_and_conftests(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(
        "import pytest\nimport uvicorn\n\n@pytest.fixture\ndef server():\n    return uvicorn.Server(None)\n\n"
        "@pytest.fixture\ndef client(server):\n    return server\n"
    )
    sample = tmp_path / "sub" / "test_sample.py"
    sample.parent.mkdir()
    sample.write_text(
        "import subprocess\nimport pytest\n\n"
        "def _start():\n    return subprocess.Popen(['true'])\n\n"
        "@pytest.fixture\ndef proc():\n    return _start()\n\n"
        "def test_via_fixture(proc):\n    pass\n\n"
        "def test_via_helper():\n    _start()\n\n"
        "def test_via_conftest_fixture(client):\n    pass\n\n"
        "@pytest.mark.slow\ndef test_marked(proc):\n    pass\n\n"
        "def test_plain():\n    assert subprocess.PIPE\n"
    )
    found = [f.split("::")[1] for f in unmarked_starters(sample, root=tmp_path)]
    assert found == ["test_via_fixture", "test_via_helper", "test_via_conftest_fixture"]
    sample.write_text("import pytest\npytestmark = pytest.mark.slow\n\ndef test_x(client):\n    pass\n")
    assert unmarked_starters(sample, root=tmp_path) == []
