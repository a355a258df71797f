"""GitOps: the Argo CD health check maps every LLMService status the operator writes, and the examples point at
real kustomize entry points and real image names.

The reasons come from the operator's source (every `Cond(...)` and admission `Decision(...)` it builds), and
the sample statuses from its own `aggregate_ready` and `render`, so a new reason or a changed aggregation
shows up here rather than as an Application stuck Progressing (or wrongly Healthy) in someone's Argo CD.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from piggyback_operator import conditions
from piggyback_operator.conditions import FALSE, TRUE, UNKNOWN, Cond

lupa = pytest.importorskip("lupa", reason="lupa runs the Argo CD health check; it comes with `pip install -e .[dev]`")

ROOT = Path(__file__).resolve().parents[2]
GITOPS = ROOT / "manifests" / "gitops"
HEALTH_LUA = GITOPS / "argocd" / "llmservice-health.lua"
OPERATOR_SRC = ROOT / "operator" / "piggyback_operator"

# The reasons under which the operator is still working towards Ready; every other blocking reason needs a
# person (more GPUs, a fixed spec, a runtime that answers) and must read Degraded.
PROGRESSING_REASONS = {"ScalingUp", "WaitingForMetrics", "Pending", "NoReadyReplicas", "NotAdmitted",
                       "RayClusterPending", "RayClusterNotReady"}
STATUS_NAMES = {"TRUE": TRUE, "FALSE": FALSE, "UNKNOWN": UNKNOWN}


def blocking_reasons_in_operator() -> dict[str, str]:
    """reason -> condition type, for every condition the operator can set False (from its source)."""
    found: dict[str, str] = {}
    for path in sorted(OPERATOR_SRC.glob("*.py")):
        tree = ast.parse(path.read_text())
        constants = {
            target.id: node.value.value
            for node in tree.body if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
            for target in node.targets if isinstance(target, ast.Name) and isinstance(node.value.value, str)
        }  # fmt: skip
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)):
            if call.func.id == "Cond" and len(call.args) >= 3:
                type_arg, status_arg, reason_arg = call.args[:3]
                status = STATUS_NAMES.get(status_arg.id) if isinstance(status_arg, ast.Name) else None
                if status == FALSE and isinstance(reason_arg, ast.Constant):
                    # A computed type (InvalidSpec marks every condition): the first one is what Ready reports.
                    type_ = type_arg.value if isinstance(type_arg, ast.Constant) else conditions.ORDER[0]
                    found[reason_arg.value] = type_
            elif call.func.id == "Decision" and len(call.args) >= 2:
                admitted_arg, reason_arg = call.args[:2]
                if isinstance(admitted_arg, ast.Constant) and admitted_arg.value is False:
                    reason = constants.get(reason_arg.id) if isinstance(reason_arg, ast.Name) else None
                    assert reason, f"{path.name}:{call.lineno}: a Decision reason that is not a module constant"
                    found[reason] = "Admitted"
    return found


def run_health(obj: Mapping[str, Any]) -> dict[str, str]:
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(HEALTH_LUA.read_text())
    return {"status": result["status"], "message": result["message"]}


def llmservice(conds: list[Cond] | None, generation: int = 3, observed: int | None = 3) -> dict[str, Any]:
    """An LLMService as the operator leaves it: its conditions plus the aggregated Ready, rendered its way."""
    obj: dict[str, Any] = {"apiVersion": "piggyback.dev/v1alpha1", "kind": "LLMService",
                           "metadata": {"name": "chat", "namespace": "team", "generation": generation}}
    if conds is not None:
        conds = [*conds, conditions.aggregate_ready(conds)]
        obj["status"] = {"observedGeneration": observed, "conditions": conditions.render(None, conds, observed)}
    return obj


def all_true() -> list[Cond]:
    return [Cond("Admitted", TRUE, "Admitted", "admitted"), Cond("Placed", TRUE, "Scheduled", "on gpu-1"),
            Cond("RuntimeReady", TRUE, "ReplicasReady", "1/1"), Cond("SLOMet", TRUE, "AttainmentMet", "0.99")]


def with_failure(type_: str, reason: str) -> list[Cond]:
    return [Cond(c.type, FALSE, reason, f"{reason} for the test") if c.type == type_ else c for c in all_true()]


BLOCKING = blocking_reasons_in_operator()


def test_the_operator_source_yields_the_reasons_the_issue_names():
    # Guards the AST walk itself: if it found nothing the per-reason tests below would pass vacuously.
    assert {"InsufficientSLOHeadroom", "NoGPUNode", "ScalingUp", "WaitingForMetrics", "InvalidSpec",
            "RuntimeNotResponding", "AttainmentBelowTarget"} <= set(BLOCKING), sorted(BLOCKING)


@pytest.mark.parametrize("reason", sorted(BLOCKING))
def test_every_blocking_reason_is_classified_explicitly(reason):
    health = run_health(llmservice(with_failure(BLOCKING[reason], reason)))
    expected = "Progressing" if reason in PROGRESSING_REASONS else "Degraded"
    assert health["status"] == expected, (reason, health)
    assert "unclassified" not in health["message"], f"{reason} is missing from {HEALTH_LUA.name}'s tables"
    assert reason in health["message"]


def test_ready_is_healthy_and_carries_the_operators_message():
    obj = llmservice(all_true())
    ready = conditions.find(obj["status"]["conditions"], "Ready")
    assert run_health(obj) == {"status": "Healthy", "message": ready["message"]}


def test_an_unmeasured_slo_does_not_block_health():
    conds = [*all_true()[:3], Cond("SLOMet", UNKNOWN, "NotMeasured", "no runtime replica answered /metrics yet")]
    assert run_health(llmservice(conds))["status"] == "Healthy"


@pytest.mark.parametrize(
    ("obj", "why"),
    [
        (llmservice(None), "no status yet"),
        (llmservice(all_true(), generation=4, observed=3), "the operator has not seen the new spec"),
        ({"metadata": {"generation": 1}, "status": {"conditions": []}}, "no Ready condition yet"),
    ],
)
def test_progressing_before_the_operator_has_reported(obj, why):
    assert run_health(obj)["status"] == "Progressing", why


def test_a_reason_the_check_does_not_know_reads_degraded_and_says_so():
    health = run_health(llmservice(with_failure("RuntimeReady", "SomethingNew")))
    assert health["status"] == "Degraded" and "unclassified reason SomethingNew" in health["message"]


# --- the Argo CD and Flux examples -----------------------------------------------------------------------


def base_image_names() -> set[str]:
    kustomization = yaml.safe_load((ROOT / "manifests" / "base" / "kustomization.yaml").read_text())
    return {entry["name"] for entry in kustomization["images"]}


def test_the_argocd_application_installs_a_kustomize_entry_point_with_the_base_images():
    app = yaml.safe_load((GITOPS / "argocd" / "application.yaml").read_text())
    assert (app["apiVersion"], app["kind"]) == ("argoproj.io/v1alpha1", "Application")
    source = app["spec"]["source"]
    assert (ROOT / source["path"] / "kustomization.yaml").is_file(), source["path"]
    assert {image.rsplit(":", 1)[0] for image in source["kustomize"]["images"]} == base_image_names()
    assert "ServerSideApply=true" in app["spec"]["syncPolicy"]["syncOptions"]  # the CRD is too big otherwise


def test_the_flux_kustomization_reads_the_git_repository_and_overrides_the_base_images():
    source = yaml.safe_load((GITOPS / "flux" / "gitrepository.yaml").read_text())
    sync = yaml.safe_load((GITOPS / "flux" / "flux-kustomization.yaml").read_text())
    assert source["kind"] == "GitRepository" and sync["kind"] == "Kustomization"
    assert sync["spec"]["sourceRef"] == {"kind": "GitRepository", "name": source["metadata"]["name"]}
    assert sync["metadata"]["namespace"] == source["metadata"]["namespace"]
    assert (ROOT / sync["spec"]["path"] / "kustomization.yaml").is_file(), sync["spec"]["path"]
    assert {entry["name"] for entry in sync["spec"]["images"]} == base_image_names()


def test_the_readme_installs_the_health_check_under_argos_key_for_llmservice():
    crd = yaml.safe_load((ROOT / "crds" / "piggyback.dev_llmservices.yaml").read_text())
    key = f"resource.customizations.health.{crd['spec']['group']}_{crd['spec']['names']['kind']}"
    readme = (GITOPS / "README.md").read_text()
    assert readme.count(key) == 2 and HEALTH_LUA.name in readme
