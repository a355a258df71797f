"""Policies as files: the registry finds every module in scheduler/policies/ (and PIGGYBACK_POLICY_MODULES),
and everything that lists policies (config, `serve --help`, the simulator, the benchmarks, the README) lists
exactly the registry's names, so a new policy is a new file and no other edit."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from piggyback_runtime import cli
from piggyback_runtime.config import ConfigError, RuntimeConfig
from piggyback_runtime.kv.allocator import BlockAllocator
from piggyback_runtime.request import Request, SamplingParams
from piggyback_runtime.scheduler import policies
from piggyback_runtime.scheduler.batching import BatchScheduler
from piggyback_runtime.scheduler.policies import EXTRA_MODULES_ENV, Policy, make_policy, policy_names, registry
from piggyback_runtime.sim.scenario import load_scenario, run_scenario, summary
from tests.runtime.test_sim import needs_vidur, scenario

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = "test_plugin_policy_half_kv"
PLUGIN_NAME = "test-half-kv"


@pytest.fixture
def plugin_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A policy in a module of its own, outside the package, named only in PIGGYBACK_POLICY_MODULES."""
    (tmp_path / f"{PLUGIN}.py").write_text(textwrap.dedent(f'''
        from piggyback_runtime.scheduler.policies import Policy


        class HalfKVPolicy(Policy):
            """BE on the accelerator within half of its KV blocks (a test plugin)."""

            name = "{PLUGIN_NAME}"

            def be_kv_block_limit(self, num_blocks: int) -> int | None:
                return num_blocks // 2
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(EXTRA_MODULES_ENV, PLUGIN)
    yield PLUGIN_NAME
    sys.modules.pop(PLUGIN, None)


def _config(policy: str) -> RuntimeConfig:
    return RuntimeConfig.from_dict({"model": {"uri": "synthetic://tiny-llama"},
                                    "services": [{"name": "batch", "class": "BE"}],
                                    "engine": {"policy": policy}})  # fmt: skip


def test_each_builtin_policy_is_one_module_of_the_package_and_the_config_accepts_exactly_those() -> None:
    package = ROOT / "runtime" / "piggyback_runtime" / "scheduler" / "policies"
    modules = {p.stem for p in package.glob("*.py") if not p.stem.startswith("_")} - {"base"}
    assert {cls.__module__.rsplit(".", 1)[1] for cls in registry().values()} == modules
    assert policy_names()[:2] == ["hybrid", "piggyback"]  # the default first in every listing, then the baselines
    for name in policy_names():
        assert _config(name).engine.policy == name
        assert type(make_policy(name)) is registry()[name]
    with pytest.raises(ConfigError, match=r"engine\.policy.*use one of hybrid, piggyback, priority"):
        _config("fastest")


def test_a_file_dropped_into_the_package_folder_is_a_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The package's folder, extended by a tmp folder so that the repository is not written to.
    (tmp_path / "test_dropped_in.py").write_text(textwrap.dedent('''
        from piggyback_runtime.scheduler.policies.base import Policy


        class DroppedInPolicy(Policy):
            """BE waits whenever LS work is held, listed first (a test file)."""

            name = "test-dropped-in"
            listing_rank = -100

            def be_waits_for(self, ls_work_held: bool) -> bool:
                return ls_work_held
    '''))
    monkeypatch.setattr(policies, "__path__", [*policies.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, f"{policies.__name__}.test_dropped_in", raising=False)
    try:
        assert policy_names()[0] == "test-dropped-in"
        assert make_policy("test-dropped-in").be_waits_for(ls_work_held=True)
        assert _config("test-dropped-in").engine.policy == "test-dropped-in"
    finally:
        sys.modules.pop(f"{policies.__name__}.test_dropped_in", None)


@pytest.mark.slow  # starts a process (a Python subprocess or the operator)
def test_the_registry_imports_neither_torch_nor_the_planner() -> None:
    script = textwrap.dedent("""
        import sys
        import piggyback_runtime.config
        from piggyback_runtime.scheduler.policies import policy_names
        assert policy_names()
        loaded = [m for m in sys.modules if m == "torch" or m.startswith(("torch.", "piggyback_runtime.scheduler.p"))]
        print(sorted(m for m in loaded if not m.startswith("piggyback_runtime.scheduler.policies")))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_plugin_policy_is_accepted_by_the_config_and_listed_by_serve_help(
    plugin_policy: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert policy_names()[-1] == plugin_policy  # default listing rank: after the built-ins
    assert make_policy(plugin_policy).be_kv_block_limit(64) == 32
    assert _config(plugin_policy).engine.policy == plugin_policy
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    help_text = capsys.readouterr().out
    for name in policy_names():
        assert f"  {name} " in help_text
    assert "within half of its KV blocks (a test plugin)" in help_text


def test_without_the_plugin_the_policy_is_unknown() -> None:
    assert PLUGIN_NAME not in policy_names()
    with pytest.raises(ConfigError, match=PLUGIN_NAME):
        _config(PLUGIN_NAME)


@needs_vidur
def test_a_plugin_policy_runs_in_the_simulator_as_one_of_every_policy(plugin_policy: str) -> None:
    spec = load_scenario({**scenario(duration_s=5.0, be_count=4), "policies": "all"})
    assert spec.policies == policy_names() and plugin_policy in spec.policies
    row = summary(run_scenario(spec, policy=plugin_policy))
    assert row["policy"] == plugin_policy and float(row["be_tokens_per_s"]) > 0


def test_the_benchmarks_list_a_plugin_policy(plugin_policy: str) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        sys.modules.pop("paper_scenarios", None)
        paper_scenarios = importlib.import_module("paper_scenarios")
        assert policy_names() == paper_scenarios.POLICIES
        assert plugin_policy in paper_scenarios.POLICIES
        assert plugin_policy in paper_scenarios.BASELINES_GPU_ONLY  # no host path: the CPUs do not matter
    finally:
        sys.modules.pop("paper_scenarios", None)
        sys.path.remove(str(ROOT / "benchmarks"))


def test_benchmarks_do_not_spell_out_the_policy_list() -> None:
    """Every benchmark that compares policies takes its default list from the registry."""
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        text = path.read_text()
        assert "piggyback,priority,ls-only" not in text and '"priority", "ls-only", "headroom"' not in text, path


def test_the_readme_lists_exactly_the_registered_policies() -> None:
    readme = (ROOT / "README.md").read_text()
    listed = readme.split("<!-- policies:begin -->\n", 1)[1].split("\n<!-- policies:end -->", 1)[0]
    assert listed == policies.markdown_list(), (
        "README.md's policy list differs from scheduler/policies/: replace the lines between the policies markers "
        "with the output of `python -c 'from piggyback_runtime.scheduler import policies; "
        "print(policies.markdown_list())'`"
    )


def _request(rid: str, service_class: str, prompt: int, arrival_s: float) -> Request:
    return Request(rid, rid, service_class, list(range(prompt)), SamplingParams(max_tokens=4),  # type: ignore[arg-type]
                   arrival_s=arrival_s)  # fmt: skip


class EarliestVictimPolicy(Policy):
    """Preempts the highest-priority candidate instead of the lowest (only to show the hook is asked)."""

    name = "test-earliest-victim"

    def choose_victim(self, request: Request, candidates: Sequence[Request]) -> Request:
        return candidates[0]


@pytest.mark.parametrize(("policy", "preempted"), [(make_policy("priority"), "b1"), (EarliestVictimPolicy(), "b0")])
def test_the_batch_scheduler_asks_the_policy_which_request_to_preempt(policy: Policy, preempted: str) -> None:
    # 4 blocks of 4 tokens: two BE requests hold 2 blocks each; an LS prompt needing 2 blocks preempts one.
    scheduler = BatchScheduler(BlockAllocator(4, 4), max_num_seqs=8, max_num_batched_tokens=64, policy=policy)
    scheduler.add(_request("b0", "BE", 8, 0.0))
    scheduler.add(_request("b1", "BE", 8, 1.0))
    assert len(scheduler.schedule().prefills) == 2
    scheduler.add(_request("l0", "LS", 8, 2.0))
    plan = scheduler.schedule()
    assert [r.request_id for r in plan.preempted] == [preempted]
    assert [c.request.request_id for c in plan.prefills] == ["l0", *({"b0", "b1"} - {preempted})]
