"""Every kustomize entry point builds (the CI check), and what it builds keeps the promised properties."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ENTRY_POINTS = ["crds", "manifests/base", "manifests/overlays/monitoring", "manifests/samples"]

pytestmark = [
    pytest.mark.slow,  # runs kubectl
    pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed"),
]


def build(entry: str) -> list[dict[str, Any]]:
    result = subprocess.run(["kubectl", "kustomize", str(ROOT / entry)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {entry} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_entry_point_builds(entry):
    assert build(entry)


def test_the_base_installs_namespace_crd_rbac_and_one_operator():
    docs = build("manifests/base")
    assert {d["kind"] for d in docs} >= {"Namespace", "CustomResourceDefinition", "ServiceAccount", "ClusterRole",
                                         "ClusterRoleBinding", "Deployment", "Service"}
    (deployment,) = by_kind(docs, "Deployment")
    assert deployment["metadata"]["namespace"] == "piggyback-system"
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz" and "readinessProbe" in container
    assert container["command"] == ["piggyback-operator"] and container["args"][0] == "run"


def test_rbac_grants_only_named_verbs_on_named_resources():
    roles = {r["metadata"]["name"]: r for r in by_kind(build("manifests/base"), "ClusterRole")}
    assert set(roles) == {"piggyback-operator", "piggyback-epp", "piggyback-router"}
    role = roles["piggyback-operator"]
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
        assert not set(rule["verbs"]) & {"deletecollection", "escalate", "impersonate"}, rule
        if "delete" in rule["verbs"]:  # only the ScaledObject of a service whose autoscaler was switched off
            assert rule["resources"] == ["scaledobjects"], rule
        if "bind" in rule["verbs"]:  # only the EPP's and the router's roles, bound per pool
            assert rule["resources"] == ["clusterroles"], rule
            assert rule["resourceNames"] == ["piggyback-epp", "piggyback-router"], rule
    granted = {(res, verb) for rule in role["rules"] for res in rule["resources"] for verb in rule["verbs"]}
    assert ("llmservices/status", "patch") in granted and ("deployments", "patch") in granted
    assert ("secrets", "get") not in granted
    assert roles["piggyback-router"]["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "patch"]}]
    for rule in roles["piggyback-epp"]["rules"]:
        assert set(rule["verbs"]) == {"get", "list", "watch"}, rule


def test_the_monitoring_overlay_adds_monitors_for_the_operator_the_runtimes_and_the_routers():
    docs = build("manifests/overlays/monitoring")
    (service_monitor,) = by_kind(docs, "ServiceMonitor")
    (pod_monitor,) = by_kind(docs, "PodMonitor")
    assert service_monitor["spec"]["endpoints"][0]["port"] == "metrics"
    (components,) = pod_monitor["spec"]["selector"]["matchExpressions"]
    assert components["key"] == "app.kubernetes.io/component" and set(components["values"]) == {"runtime", "router"}


def test_the_samples_are_an_ls_and_a_be_service_of_the_same_model_and_pool():
    ls, be = sorted(build("manifests/samples"), key=lambda d: d["spec"]["class"], reverse=True)
    assert (ls["spec"]["class"], be["spec"]["class"]) == ("LS", "BE")
    assert ls["spec"]["model"] == be["spec"]["model"]
    assert ls["spec"]["placement"]["pool"] == be["spec"]["placement"]["pool"]


def test_the_operator_runs_hardened_and_writes_only_to_an_empty_dir():
    (deployment,) = by_kind(build("manifests/base"), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ctx = container["securityContext"]
    for scope in (pod["securityContext"], ctx):
        assert scope["runAsNonRoot"] is True and scope["runAsUser"] != 0
        assert scope["seccompProfile"] == {"type": "RuntimeDefault"}
    assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]} and ctx["privileged"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = [m for m in container["volumeMounts"] if not m.get("readOnly")]
    assert writable and all("emptyDir" in volumes[m["name"]] for m in writable)
    env = {e["name"]: e for e in container["env"]}
    assert env["HOME"]["value"] in {m["mountPath"] for m in writable}
    (namespace,) = by_kind(build("manifests/base"), "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_the_operators_network_policy_settings_parse_and_let_the_operator_itself_in():
    from piggyback_operator.pools import NetworkPolicySettings

    (deployment,) = by_kind(build("manifests/base"), "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["PIGGYBACK_OPERATOR_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    values = {name: e["value"] for name, e in env.items() if "value" in e}
    settings = NetworkPolicySettings.from_env({**values, "PIGGYBACK_OPERATOR_NAMESPACE": "piggyback-system"})
    assert settings.enabled
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in settings.operator_pods.items()), \
        "runtime pods would refuse the operator's /metrics scrapes"


def test_the_role_grants_network_policies_because_the_operator_renders_one_per_pool():
    roles = by_kind(build("manifests/base"), "ClusterRole")
    (role,) = [r for r in roles if r["metadata"]["name"] == "piggyback-operator"]
    granted = {(res, verb) for rule in role["rules"] for res in rule["resources"] for verb in rule["verbs"]}
    assert {("networkpolicies", "create"), ("networkpolicies", "patch")} <= granted


def test_the_operators_gateway_and_autoscaling_settings_default_to_what_the_code_assumes():
    from piggyback_operator import autoscaling, gateway

    (deployment,) = by_kind(build("manifests/base"), "Deployment")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["PIGGYBACK_EPP_IMAGE"] == gateway.DEFAULT_EPP_IMAGE
    assert env["PIGGYBACK_PROMETHEUS_URL"] == autoscaling.DEFAULT_PROMETHEUS_URL
