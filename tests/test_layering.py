"""The import graph runs downhill: each top-level module and package of the runtime imports only from layers
below its own, there is no cycle, and the operator uses no more of the runtime than its config and metrics.

The graph is read from the source with `ast` (every import counts: module level, inside functions, and under
TYPE_CHECKING, since each is a dependency someone must keep working). A node is a top-level module
(`engine.py`) or package (`scheduler/`); an import inside one node is not an edge.
"""

from __future__ import annotations

import ast
from collections.abc import Collection, Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ROOT / "runtime" / "piggyback_runtime"
OPERATOR = ROOT / "operator" / "piggyback_operator"

# The runtime's layers, bottom first. A node may import from any layer below its own; never from its own layer
# (the nodes of one layer are independent of each other) or from one above. A new module gets a place here.
LAYERS: list[tuple[str, ...]] = [
    ("scheduler.policies",),  # the policies and their registry, which config.py validates names against
    ("config",),  # the config schema, and the names processes share (env vars, headers)
    ("metrics",),  # metric names, SLO definitions
    ("request",),  # a request, its sampling parameters and state
    ("client", "hardware", "staging", "remote_capacity"),  # HTTP client; host; pinned buffers; remote figures
    ("sampling",),  # token sampling
    ("model",),  # architectures, weights, tokenizers
    ("kv",),  # KV cache layout, block allocators, sizing
    ("attention", "scheduler"),  # attention kernels; the planner and its policies
    ("piggyback", "cuda_graphs"),  # the BE path: CPU attention workers over host KV; captured decode steps
    ("model_runner", "profiler"),  # runs a plan on the model; measures the latency model
    ("distributed",),  # tensor parallelism: rank processes, the plan broadcast, the followers' runner
    ("engine",),  # plan -> run -> update, one iteration at a time
    ("migration",),  # freeze/thaw of a request and its KV, the engine side of a live migration
    ("server",),  # the OpenAI-compatible HTTP server
    ("batch",),  # the OpenAI Batch API: routes, store, runner (piggyback serve hands it to the server app)
    ("router",),  # routing across a pool's replicas
    ("demo", "sim"),  # the demo; the discrete-event simulator
    ("cli",),  # `piggyback ...`
]

# Upward edges that other in-flight changes of issue #24 remove; the test ignores exactly these until then.
# The integrator empties this set once those branches are merged (moves 2 and 4: the engine owns migration,
# config validates policy names through the registry).
PENDING_EDGES: set[tuple[str, str]] = set()

# The simulator stands in for the engine (a latency model in place of the model runner): it shares the planner
# and never the real execution path. benchmarks/sim_replay.py, which drives both, lives outside the package.
SIMULATOR = "sim"
SIMULATOR_MUST_NOT_IMPORT = {"engine", "model_runner", "piggyback", "attention", "profiler", "migration", "server"}

# What of the runtime the operator may import: it renders the runtime's config and reads its metrics.
# model: only model/arch.py, the synthetic presets the CRD accepts (the torch-free operator import test holds
# that it pulls in no torch).
OPERATOR_MAY_IMPORT = {"config", "metrics", "model"}


# Subpackages that are nodes of their own, in a layer apart from their parent package.
SUBPACKAGE_NODES = ("scheduler.policies",)  # the policy registry: config.py validates policy names through it


def node_of(path: Path, package_root: Path) -> str:
    """The top-level module or package a source file belongs to (or one of SUBPACKAGE_NODES)."""
    parts = path.relative_to(package_root).parts
    for node in SUBPACKAGE_NODES:
        if ".".join(parts[: node.count(".") + 1]) == node:
            return node
    return parts[0].removesuffix(".py")


def is_external(target: str) -> bool:
    """An edge to another package's node ("piggyback_operator.handlers"), as import_graph names them."""
    return target.partition(".")[0] in ("piggyback_operator", "piggyback_runtime")


def target_node(rest: str) -> str:
    """The node a dotted module name inside the package (without the package's own name) belongs to."""
    return next((node for node in SUBPACKAGE_NODES if rest == node or rest.startswith(node + ".")),
                rest.split(".")[0])  # fmt: skip


def imported_modules(path: Path, package_root: Path) -> Iterable[str]:
    """Absolute dotted names of every module the file imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = [package_root.name, *path.relative_to(package_root).parent.parts]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - (node.level - 1)] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            yield module
            # `from pkg import metrics` imports the module pkg.metrics: each name may be a submodule.
            yield from (f"{module}.{alias.name}" for alias in node.names)


def import_graph(package_root: Path, external: Iterable[str] = ()) -> dict[str, set[str]]:
    """Edges between the top-level nodes of the package at `package_root`; imports of the packages named in
    `external` become edges to "<package>.<node>"."""
    name = package_root.name
    watched = {name, *external}
    graph: dict[str, set[str]] = {}
    for path in sorted(package_root.rglob("*.py")):
        if path.relative_to(package_root) == Path("__init__.py"):
            continue
        source = node_of(path, package_root)
        targets = graph.setdefault(source, set())
        for module in imported_modules(path, package_root):
            top, _, rest = module.partition(".")
            if top not in watched or not rest:
                continue
            target = target_node(rest) if top == name else rest.split(".")[0]
            if top != name:
                targets.add(f"{top}.{target}")
            elif target != source:
                targets.add(target)
    return graph


def layer_violations(graph: dict[str, set[str]], layers: list[tuple[str, ...]],
                     pending: set[tuple[str, str]]) -> list[str]:  # fmt: skip
    """Each edge that does not run to a lower layer (and is not pending), and each node with no layer."""
    level = {node: index for index, layer in enumerate(layers) for node in layer}
    problems = [f"{node} has no place in LAYERS" for node in sorted(graph) if node not in level]
    for source in sorted(graph):
        for target in sorted(graph[source]):
            if is_external(target) or (source, target) in pending or source not in level or target not in level:
                continue
            if level[target] >= level[source]:
                where = "the same layer" if level[target] == level[source] else "a higher layer"
                problems.append(f"{source} -> {target} imports from {where}")
    return problems


def find_cycle(graph: dict[str, set[str]], ignored: Collection[tuple[str, str]] = ()) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if (node, target) in ignored:
                continue
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


# --- the project ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runtime_graph() -> dict[str, set[str]]:
    return import_graph(RUNTIME, external=["piggyback_operator"])


def test_every_runtime_import_runs_to_a_lower_layer(runtime_graph: dict[str, set[str]]) -> None:
    assert layer_violations(runtime_graph, LAYERS, PENDING_EDGES) == []


def test_the_runtime_has_no_import_cycle(runtime_graph: dict[str, set[str]]) -> None:
    assert find_cycle(runtime_graph, PENDING_EDGES) is None


def test_the_layers_name_each_module_once_and_only_modules_that_exist() -> None:
    named = [node for layer in LAYERS for node in layer]
    assert len(named) == len(set(named))
    existing = {path.name.removesuffix(".py") for path in RUNTIME.iterdir()
                if path.suffix == ".py" or (path / "__init__.py").is_file()} - {"__init__"}  # fmt: skip
    subpackages = {node for node in SUBPACKAGE_NODES if (RUNTIME / node.replace(".", "/") / "__init__.py").is_file()}
    assert set(named) == existing | subpackages


def test_pending_edges_are_still_there(runtime_graph: dict[str, set[str]]) -> None:
    """A pending edge that is gone must leave the list, or it would hide its return."""
    assert {(a, b) for a, b in PENDING_EDGES if b in runtime_graph.get(a, set())} == PENDING_EDGES


def test_the_simulator_models_the_engine_and_does_not_run_it(runtime_graph: dict[str, set[str]]) -> None:
    assert runtime_graph[SIMULATOR] & SIMULATOR_MUST_NOT_IMPORT == set()


def test_the_runtime_does_not_import_the_operator(runtime_graph: dict[str, set[str]]) -> None:
    assert {(a, b) for a, targets in runtime_graph.items() for b in targets if is_external(b)} == set()


def test_the_operator_uses_only_the_runtimes_config_and_metrics_and_has_no_cycle() -> None:
    graph = import_graph(OPERATOR, external=["piggyback_runtime"])
    runtime_uses = {(a, b) for a, targets in graph.items() for b in targets if b.startswith("piggyback_runtime.")}
    assert {(a, b) for a, b in runtime_uses if b.partition(".")[2] not in OPERATOR_MAY_IMPORT} == set()
    assert find_cycle(graph) is None


# --- the checker itself can fail --------------------------------------------------------------------------------
def write_package(root: Path, files: dict[str, str]) -> Path:
    package = root / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    return package


def test_a_planted_upward_import_is_named(tmp_path: Path) -> None:
    package = write_package(tmp_path, {
        "low.py": "def f():\n    from pkg.high import g  # a lazy import is an edge too\n",
        "high/__init__.py": "", "high/g.py": "from ..low import f\n", "mid.py": "from pkg import low\n",
    })  # fmt: skip
    graph = import_graph(package)
    assert graph == {"low": {"high"}, "high": {"low"}, "mid": {"low"}}
    layers = [("low",), ("mid",), ("high",)]
    assert layer_violations(graph, layers, set()) == ["low -> high imports from a higher layer"]
    assert layer_violations(graph, layers, {("low", "high")}) == []
    assert find_cycle(graph) in (["high", "low", "high"], ["low", "high", "low"])
    assert find_cycle(graph, {("low", "high")}) is None


def test_peers_in_one_layer_and_unplaced_modules_are_named(tmp_path: Path) -> None:
    package = write_package(tmp_path, {"a.py": "import pkg.b\n", "b.py": "", "c.py": "import pkg.a\n"})
    assert layer_violations(import_graph(package), [("a", "b")], set()) == [
        "c has no place in LAYERS",
        "a -> b imports from the same layer",
    ]
