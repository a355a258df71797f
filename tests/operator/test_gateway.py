"""placement.routing: gateway: the pool as a Gateway API Inference Extension InferencePool with its EPP.

Specification:
- Per gateway-routed pool: an inference.networking.k8s.io/v1 InferencePool (valid against the upstream CRD,
  vendored with its source and licence) selecting exactly the pool's runtime pods on the runtime port, whose
  endpoint picker reference names the EPP Service and its gRPC port; the stock EPP (image configurable) with
  its ServiceAccount, a RoleBinding to the piggyback-epp ClusterRole, a Deployment and a Service.
- The EPP reads one pod-wide series per figure (queue, running, KV usage: the runtime's piggyback_pod_*
  totals, since its vLLM-named gauges are per service and the EPP reads a single series), and the cache
  configuration; LoRA scraping is off (the runtime serves no adapters).
- No Piggyback router for such a pool; each LLMService's Service selects the runtime pods directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import NAMESPACE, eventually, ls_spec
from crd_validation import validation_errors
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from piggyback_operator import gateway, pools
from piggyback_operator.api import LLMServiceSpec
from piggyback_runtime import metrics as m

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]
POOL_CRD = "inference.networking.k8s.io_inferencepools.yaml"
# The EPP's defaults in gateway-api-inference-extension v1.5.0 (pkg/epp/server/options.go): what it scrapes
# from every model server unless its flags say otherwise.
EPP_V1_5_DEFAULTS = {
    "total-queued-requests-metric": "vllm:num_requests_waiting",
    "total-running-requests-metric": "vllm:num_requests_running",
    "kv-cache-usage-percentage-metric": "vllm:kv_cache_usage_perc",
    "cache-info-metric": "vllm:cache_config_info",
    "lora-info-metric": "vllm:lora_requests_info",
}


def member(name: str = "chat", **spec: Any) -> pools.Member:
    body = ls_spec(placement={"routing": "gateway"}, **spec)
    return pools.Member(name, NAMESPACE, f"uid-{name}", LLMServiceSpec.model_validate(body), True, False, name)


def test_the_inference_pool_is_valid_upstream_and_selects_exactly_the_runtime_pods():
    chat = member()
    inference_pool = gateway.render_inference_pool(chat.pool, NAMESPACE, [chat])
    assert validation_errors(inference_pool, POOL_CRD, "v1") == []
    _, deployment = pools.render_children(chat.pool, NAMESPACE, [chat], replicas=2, scaled=0)
    runtime_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = inference_pool["spec"]["selector"]["matchLabels"]
    assert selector.items() <= runtime_labels.items()
    (_, _, epp, service) = gateway.render_epp(chat.pool, NAMESPACE, [chat])
    assert not selector.items() <= epp["spec"]["template"]["metadata"]["labels"].items()  # the EPP is not a target
    assert inference_pool["spec"]["targetPorts"] == [{"number": pools.RUNTIME_PORT}]
    ref = inference_pool["spec"]["endpointPickerRef"]
    assert ref["name"] == service["metadata"]["name"]
    assert ref["port"]["number"] in {p["port"] for p in service["spec"]["ports"]}
    assert service["spec"]["selector"].items() <= epp["spec"]["template"]["metadata"]["labels"].items()
    assert {r["uid"] for r in inference_pool["metadata"]["ownerReferences"]} == {"uid-chat"}


def test_a_broken_inference_pool_fails_the_vendored_schema():
    chat = member()
    bad = gateway.render_inference_pool(chat.pool, NAMESPACE, [chat])
    bad["spec"]["targetPorts"] = [{"number": 8000}, {"number": 8000}]
    assert validation_errors(bad, POOL_CRD, "v1") == ["spec.targetPorts: port number must be unique"]
    del bad["spec"]["endpointPickerRef"]
    assert validation_errors(bad, POOL_CRD, "v1")


def test_the_epp_reads_one_pod_wide_series_per_figure_from_a_pod_serving_several_services():
    """The EPP takes a single series of each family it is told to read (GIE v1.5.0 getLatestMetric: the latest
    by timestamp, the first listed when none has one), so the figure it reads must be the pod's, not one
    service's: the runtime's per-service vLLM series would give it the LS queue and miss the BE one."""
    registry = CollectorRegistry()
    runtime = m.RuntimeMetrics(registry)
    runtime.num_waiting.labels("chat", "LS").set(2)
    runtime.num_waiting.labels("batch", "BE").set(5)
    runtime.num_running.labels("chat", "LS").set(3)
    runtime.kv_cache_usage.labels("chat", "LS").set(0.25)
    runtime.kv_cache_usage.labels("batch", "BE").set(0.1)
    runtime.cache_config_info.labels(block_size="16", num_gpu_blocks="1000").set(1)
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    args = gateway.epp_args("pool", NAMESPACE)
    flags = dict(a.removeprefix("--").split("=", 1) for a in args if "=" in a)
    assert set(flags) == set(EPP_V1_5_DEFAULTS), "every metric the EPP scrapes is configured"
    expected = {"total-queued-requests-metric": 7, "total-running-requests-metric": 3,
                "kv-cache-usage-percentage-metric": 0.35, "cache-info-metric": 1}  # fmt: skip
    for flag, value in expected.items():
        family = families.get(flags[flag])
        assert family is not None, f"the runtime does not export {flags[flag]} (--{flag})"
        (series,) = family.samples
        assert series.value == pytest.approx(value), flag
    assert flags["cache-info-metric"] == EPP_V1_5_DEFAULTS["cache-info-metric"]  # one series already
    assert flags["lora-info-metric"] == "", "no LoRA adapters: the EPP must not wait for a LoRA series"
    assert EPP_V1_5_DEFAULTS["total-queued-requests-metric"] in families  # vLLM's names stay, per service
    assert args[args.index("--pool-name") + 1] == "pool" and args[args.index("--pool-namespace") + 1] == NAMESPACE


def test_the_epp_is_bound_to_a_cluster_role_that_grants_what_it_reads_and_no_more():
    chat = member()
    (account, binding, epp, _) = gateway.render_epp(chat.pool, NAMESPACE, [chat])
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": gateway.EPP_CLUSTER_ROLE}  # fmt: skip
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": NAMESPACE}]  # fmt: skip
    assert epp["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    role = yaml.safe_load((ROOT / "manifests" / "base" / "epp-rbac.yaml").read_text())
    assert role["metadata"]["name"] == gateway.EPP_CLUSTER_ROLE
    assert all(set(rule["verbs"]) == {"get", "list", "watch"} for rule in role["rules"])
    granted = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert granted >= {("", "pods"), ("inference.networking.k8s.io", "inferencepools")}
    operator_role = next(d for d in yaml.safe_load_all((ROOT / "manifests/base/rbac.yaml").read_text())
                         if d["kind"] == "ClusterRole")  # fmt: skip
    bind = [r for r in operator_role["rules"] if "bind" in r["verbs"]]
    assert bind == [{"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles"], "verbs": ["bind"],
                     "resourceNames": [gateway.EPP_CLUSTER_ROLE, pools.ROUTER_CLUSTER_ROLE]}]  # fmt: skip
    container = epp["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == gateway.DEFAULT_EPP_IMAGE
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_epp_image_is_configurable(monkeypatch):
    monkeypatch.setenv("PIGGYBACK_EPP_IMAGE", "mirror.example.com/epp:v1.5.0")
    chat = member()
    assert gateway.render_epp(chat.pool, NAMESPACE, [chat])[2]["spec"]["template"]["spec"]["containers"][0][
        "image"] == "mirror.example.com/epp:v1.5.0"  # fmt: skip


@pytest.mark.slow  # starts a process (a Python subprocess or the operator)
async def test_a_gateway_routed_pool_gets_an_inference_pool_and_an_epp_but_no_router(cluster, operator):
    await cluster.add_gpu_node("gpu-a", gpus=4)
    await cluster.create("chat", ls_spec(replicas=2, scaling={"maxReplicas": 3}, placement={"routing": "gateway"}))
    await eventually(lambda: cluster.condition("chat", "Admitted").get("status") == "True", what="admitted")
    pool = cluster.status("chat")["pool"]
    inference_pool = await eventually(
        lambda: cluster.api.live("inference.networking.k8s.io/v1/inferencepools", NAMESPACE, pool),
        what="InferencePool")  # fmt: skip
    assert validation_errors({k: v for k, v in inference_pool.items() if k != "status"}, POOL_CRD, "v1") == []
    epp = await eventually(lambda: cluster.deployment(gateway.epp_name(pool)), what="EPP deployment")
    assert epp["spec"]["replicas"] == 1
    assert cluster.api.live("v1/serviceaccounts", NAMESPACE, gateway.epp_name(pool))
    assert cluster.api.live("rbac.authorization.k8s.io/v1/rolebindings", NAMESPACE, gateway.epp_name(pool))
    assert cluster.service(gateway.epp_name(pool))
    assert cluster.deployment(pool)["spec"]["replicas"] == 2
    assert cluster.deployment(pools.router_name(pool)) is None
    assert cluster.service("chat")["spec"]["selector"] == {pools.LABEL_POOL: pool}
