"""The operator against an emulated API server: pools, children, owners, conditions, restarts."""

from __future__ import annotations

import pytest
from conftest import NAMESPACE, Cluster, be_spec, eventually, ls_spec, running_operator

from piggyback_operator import pools
from piggyback_runtime.config import RuntimeConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]  # slow: the operator against an emulated API server


def pool_of(cluster: Cluster, name: str) -> str:
    return cluster.status(name).get("pool", "")


async def admitted_pool(cluster: Cluster, *names: str) -> str:
    """Wait until every named service is admitted, then return their one pool.

    kopf admits services in either order, so waiting for one and then reading another's pool races.
    """
    for name in names:
        await eventually(lambda n=name: cluster.condition(n, "Admitted").get("status") == "True",
                         what=f"{name} admitted")
    pools_seen = {pool_of(cluster, name) for name in names}
    assert len(pools_seen) == 1, f"services {names} were placed in different pools: {pools_seen}"
    return pools_seen.pop()


def owners(obj: dict) -> set[str]:
    return {ref["name"] for ref in obj["metadata"].get("ownerReferences", [])}


async def test_ls_and_be_services_of_one_model_share_one_pool_owned_by_both(cluster, operator, runtime):
    await cluster.add_gpu_node("gpu-a")
    await cluster.create("chat", ls_spec())
    await cluster.create("batch", be_spec())

    pool = await admitted_pool(cluster, "chat", "batch")
    assert pool.startswith("default-")
    deployment = await eventually(
        lambda: (d := cluster.deployment(pool)) and owners(d) == {"chat", "batch"} and d, what="pool owned by both"
    )
    assert len(cluster.deployments()) == 1
    assert owners(cluster.configmap(pool)) == {"chat", "batch"}
    assert all(ref["blockOwnerDeletion"] and not ref["controller"] for ref in deployment["metadata"]["ownerReferences"])

    config = RuntimeConfig.from_dict(cluster.runtime_config(pool))
    assert [(s.name, s.service_class) for s in config.services] == [("batch", "BE"), ("chat", "LS")]
    assert config.service("chat").slo.ttft_ms == 200 and config.model.uri == "synthetic://tiny-llama"

    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"][pools.GPU_RESOURCE] == "1"
    assert container["resources"]["requests"]["memory"] == "68Gi"  # 4Gi runtime + 64Gi BE KV
    assert container["resources"]["requests"]["cpu"] == "9"  # 1 + 8 cores for BE attention
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["args"] == ["serve", "--config", "/etc/piggyback/runtime.yaml"]

    for name in ("chat", "batch"):
        service = cluster.service(name)
        assert owners(service) == {name} and service["spec"]["selector"] == {pools.LABEL_POOL: pool}

    # No runtime pod yet: admitted, but not placed, so not ready, and the reason says so.
    assert cluster.condition("chat", "Placed")["reason"] == "Pending"
    ready = cluster.condition("chat", "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "Pending")

    # A kubelet starts a replica on gpu-a whose runtime answers on loopback: everything goes Ready.
    runtime.set(services={"chat": {"class": "LS", "attainment": 1.0, "window": 50, "ttft_s": [0.05] * 50},
                          "batch": {"class": "BE", "tokens": 100}})
    await cluster.run_replicas(pool, node="gpu-a", port=runtime.port)
    for name in ("chat", "batch"):
        await eventually(lambda n=name: cluster.condition(n, "Ready").get("status") == "True", what=f"{name} Ready")
    status = cluster.status("chat")
    assert status["observedGeneration"] == cluster.llms("chat")["metadata"]["generation"] == 1
    assert status["nodes"] == ["gpu-a"] and status["runtimeEndpoints"] == [f"127.0.0.1:{runtime.port}"]
    assert status["endpoint"] == f"http://chat.{NAMESPACE}.svc:8000/v1"
    conds = {c["type"]: c for c in status["conditions"]}
    assert set(conds) == {"Admitted", "Placed", "RuntimeReady", "SLOMet", "Ready"}
    assert (conds["Placed"]["reason"], conds["RuntimeReady"]["reason"], conds["SLOMet"]["reason"]) == (
        "Scheduled", "ReplicasReady", "AttainmentMet")
    assert all(c["observedGeneration"] == 1 and c["message"] and c["lastTransitionTime"] for c in conds.values())
    assert cluster.condition("batch", "SLOMet")["reason"] == "BestEffort"


async def test_a_spec_update_re_renders_the_pool(cluster, operator):
    await cluster.add_gpu_node("gpu-a")
    await cluster.create("chat", ls_spec())
    await eventually(lambda: cluster.condition("chat", "Admitted").get("status") == "True")
    pool = pool_of(cluster, "chat")
    await eventually(lambda: cluster.configmap(pool))
    first_hash = cluster.deployment(pool)["spec"]["template"]["metadata"]["annotations"][pools.ANNOTATION_CONFIG_HASH]

    await cluster.patch("chat", {"spec": {"slo": {"ttftMs": 500}, "replicas": 2, "scaling": {"maxReplicas": 3}}})

    await eventually(lambda: cluster.runtime_config(pool)["services"][0]["slo"]["ttft_ms"] == 500, what="re-render")
    deployment = cluster.deployment(pool)
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["template"]["metadata"]["annotations"][pools.ANNOTATION_CONFIG_HASH] != first_hash
    await eventually(lambda: cluster.status("chat").get("observedGeneration") == 2, what="observedGeneration 2")


async def test_deleting_one_service_re_renders_the_pool_and_deleting_both_removes_the_children(cluster, operator):
    await cluster.add_gpu_node("gpu-a")
    await cluster.create("chat", ls_spec())
    await cluster.create("batch", be_spec())
    pool = await admitted_pool(cluster, "chat", "batch")
    await eventually(lambda: (d := cluster.deployment(pool)) and owners(d) == {"chat", "batch"})

    await cluster.delete("batch")
    await eventually(lambda: cluster.llms("batch") is None, what="batch finalized")
    await eventually(lambda: [s["name"] for s in cluster.runtime_config(pool)["services"]] == ["chat"],
                     what="pool without batch")
    assert owners(cluster.deployment(pool)) == {"chat"}
    assert cluster.deployment(pool)["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"][
        "memory"] == "4Gi"
    assert cluster.service("batch") is None and cluster.service("chat") is not None

    await cluster.delete("chat")
    await eventually(lambda: cluster.llms("chat") is None, what="chat finalized")
    await eventually(lambda: cluster.deployment(pool) is None and cluster.configmap(pool) is None,
                     what="children garbage-collected")
    assert cluster.service("chat") is None and cluster.deployments() == []


async def test_without_a_gpu_node_the_service_is_not_admitted_and_retried_until_one_appears(cluster, operator):
    await cluster.create("chat", ls_spec())
    admitted = await eventually(lambda: (c := cluster.condition("chat", "Admitted")) and c, what="a decision")
    assert (admitted["status"], admitted["reason"]) == ("False", "NoGPUNode")
    assert "nvidia.com/gpu" in admitted["message"]
    ready = cluster.condition("chat", "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "NoGPUNode")
    assert cluster.deployments() == []

    await cluster.add_gpu_node("gpu-late", labels={"accelerator": "h100"})
    await eventually(lambda: cluster.condition("chat", "Admitted").get("status") == "True", what="retried admission")
    assert cluster.deployment(pool_of(cluster, "chat")) is not None


async def test_a_node_selector_no_gpu_node_matches_is_reported_as_no_gpu_node(cluster, operator):
    await cluster.add_gpu_node("gpu-a", labels={"accelerator": "l4"})
    await cluster.create("chat", ls_spec(placement={"nodeSelector": {"accelerator": "h100"}}))
    admitted = await eventually(lambda: (c := cluster.condition("chat", "Admitted")) and c)
    assert admitted["reason"] == "NoGPUNode" and "accelerator" in admitted["message"]


async def test_an_operator_restarted_mid_way_converges_without_duplicating_children(cluster, apiserver):
    await cluster.add_gpu_node("gpu-a")
    async with running_operator():
        await cluster.create("chat", ls_spec())
        await eventually(lambda: cluster.condition("chat", "Admitted").get("status") == "True")
    pool = pool_of(cluster, "chat")

    # While no operator runs: a BE service arrives and the LS one changes its SLO.
    await cluster.create("batch", be_spec())
    await cluster.patch("chat", {"spec": {"slo": {"tpotMs": 80}}})

    async with running_operator():
        await eventually(lambda: cluster.condition("batch", "Admitted").get("status") == "True", what="batch")
        await eventually(lambda: (c := cluster.runtime_config(pool)) and len(c["services"]) == 2
                         and c["services"][1]["slo"]["tpot_ms"] == 80, what="converged config")
        await eventually(lambda: cluster.status("chat").get("observedGeneration") == 2)
    async with running_operator():  # and a restart with nothing to do changes nothing
        await eventually(lambda: cluster.status("chat").get("observedGeneration") == 2)
    assert len(cluster.deployments()) == 1
    assert len(apiserver.all("v1/configmaps", NAMESPACE)) == 1
    assert sorted(s["metadata"]["name"] for s in apiserver.all("v1/services", NAMESPACE)) == ["batch", "chat"]
    assert owners(cluster.deployment(pool)) == {"chat", "batch"}


async def test_each_pool_gets_a_network_policy_before_its_pods_and_loses_it_with_the_pool(cluster, apiserver,
                                                                                          operator):
    await cluster.add_gpu_node("gpu-a")
    await cluster.create("chat", ls_spec())
    pool = await admitted_pool(cluster, "chat")
    policy = await eventually(lambda: cluster.network_policy(pool), what="the pool's NetworkPolicy")
    assert policy["spec"]["podSelector"] == {"matchLabels": {pools.LABEL_POOL: pool}}
    assert owners(policy) == {"chat"}
    writes = [c.path.rsplit("/", 2)[-2] for c in apiserver.operator_calls()
              if c.method == "PATCH" and c.path.endswith(f"/{pool}")]  # fmt: skip
    assert writes.index("networkpolicies") < writes.index("deployments"), "no runtime pod may start unprotected"

    await cluster.delete("chat")
    await eventually(lambda: cluster.network_policy(pool) is None, what="the NetworkPolicy garbage-collected")


async def test_an_operator_configured_without_network_policies_renders_none(cluster, monkeypatch):
    monkeypatch.setenv("PIGGYBACK_NETWORK_POLICY", "false")  # e.g. a cluster whose CNI does not enforce them
    await cluster.add_gpu_node("gpu-a")
    async with running_operator():
        await cluster.create("chat", ls_spec())
        pool = await admitted_pool(cluster, "chat")
        await eventually(lambda: cluster.deployment(pool), what="the pool")
    assert cluster.network_policy(pool) is None


async def test_limits_api_key_and_drain_of_an_llmservice_reach_the_runtime(cluster, operator):
    await cluster.add_gpu_node("gpu-a")
    await cluster.create("chat", ls_spec(limits={"defaultMaxTokens": 128, "maxTokens": 1024},
                                         apiKeySecretRef={"name": "chat-keys", "key": "token"},
                                         drainTimeoutSeconds=45))  # fmt: skip
    pool = await admitted_pool(cluster, "chat")
    config = RuntimeConfig.from_dict(await eventually(lambda: cluster.runtime_config(pool), what="config"))
    chat = config.service("chat")
    assert (chat.default_max_tokens, chat.max_tokens_limit, chat.api_key_env) == (
        128, 1024, "PIGGYBACK_API_KEY_CHAT")
    assert config.server.drain_timeout_s == 45
    pod = cluster.deployment(pool)["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 45 + pools.GRACE_MARGIN_S
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["PIGGYBACK_API_KEY_CHAT"]["valueFrom"]["secretKeyRef"] == {
        "name": "chat-keys", "key": "token", "optional": False}
