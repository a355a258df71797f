"""spec.placement.routing: with more than one replica the operator deploys the pool router, and the
LLMService's Service sends clients to it; with one replica clients reach the runtime directly.

Specification:
- The CRD accepts roundRobin | leastLoaded | lengthAware | gateway (default roundRobin) and refuses anything else.
- One replica: no router Deployment; the Service selects the pool's runtime pods.
- Two replicas: a router Deployment (owned by the pool's members, hardened like the runtime pods: non-root,
  read-only root filesystem, no capabilities, no service account token) running `piggyback router` with the
  service's policy over a headless Service of the runtime pods; the LLMService's Service selects the router.
- lengthAware: each runtime pod is labelled with the length range of the stage the router puts it in now.
- gateway: no router (tests/operator/test_gateway.py).
"""

from __future__ import annotations

import pytest
from conftest import NAMESPACE, eventually, ls_spec

from piggyback_operator import api, pools

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]  # slow: the operator against an emulated API server


def test_routing_is_an_enum_with_round_robin_by_default() -> None:
    assert api.Placement().routing == "roundRobin"
    schema = api.crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    routing = schema["properties"]["spec"]["properties"]["placement"]["properties"]["routing"]
    assert routing["enum"] == ["roundRobin", "leastLoaded", "lengthAware", "gateway"]
    assert routing["default"] == "roundRobin"
    with pytest.raises(ValueError, match="roundRobin"):
        api.Placement.model_validate({"routing": "random"})


async def test_several_replicas_get_a_router_and_the_service_points_at_it(cluster, operator) -> None:
    await cluster.add_gpu_node("gpu-a")
    await cluster.add_gpu_node("gpu-b")
    await cluster.create("chat", ls_spec(placement={"routing": "lengthAware"}))
    await eventually(lambda: cluster.condition("chat", "Admitted").get("status") == "True", what="admitted")
    pool = cluster.status("chat")["pool"]
    service = await eventually(lambda: cluster.service("chat"), what="service")
    assert service["spec"]["selector"] == {pools.LABEL_POOL: pool}  # one replica: straight to the runtime
    assert cluster.deployment(pools.router_name(pool)) is None

    await cluster.patch("chat", {"spec": {"replicas": 2, "scaling": {"maxReplicas": 3}}})
    router = await eventually(lambda: cluster.deployment(pools.router_name(pool)), what="router deployment")
    await eventually(lambda: cluster.service("chat")["spec"]["selector"] == {pools.LABEL_ROUTER_FOR: pool},
                     what="service selects the router")  # fmt: skip
    assert {ref["name"] for ref in router["metadata"]["ownerReferences"]} == {"chat"}
    assert router["spec"]["replicas"] == pools.ROUTER_REPLICAS
    pod = router["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"][:2] == ["router", "--pool-dns"]
    assert container["args"][2] == f"{pools.replicas_service_name(pool)}.{NAMESPACE}.svc:{pools.RUNTIME_PORT}"
    assert container["args"][container["args"].index("--policy") + 1] == "lengthAware"
    assert container["args"][container["args"].index("--stage-boundaries") + 1] == "4096"  # 2 replicas: 2 stages
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["runAsNonRoot"] is True
    # Its token serves only the leader election's Lease (the piggyback-router role, bound to its account).
    assert pod["automountServiceAccountToken"] is True and pod["serviceAccountName"] == pools.router_name(pool)
    assert pools.LABEL_POOL not in router["spec"]["template"]["metadata"]["labels"]  # not a runtime pod
    headless = cluster.service(pools.replicas_service_name(pool))
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["selector"] == {pools.LABEL_POOL: pool}


async def test_the_pool_internal_token_is_a_secret_created_once_and_given_to_runtime_and_router(cluster, operator
                                                                                                ) -> None:
    """The runtimes' internal endpoints move requests with their KV: every pod that may reach the runtime port
    must not be able to call them, so each pool gets a random token that only its runtime and router pods see."""
    await cluster.add_gpu_node("gpu-a")
    await cluster.add_gpu_node("gpu-b")
    await cluster.create("chat", ls_spec(placement={"routing": "leastLoaded"}))
    await eventually(lambda: cluster.condition("chat", "Admitted").get("status") == "True", what="admitted")
    pool = cluster.status("chat")["pool"]
    name = pools.internal_token_secret_name(pool)
    secret = await eventually(lambda: cluster.api.live("v1/secrets", NAMESPACE, name), what="token secret")
    token = secret["stringData"][pools.INTERNAL_TOKEN_KEY]
    assert len(token) >= 32
    runtime = cluster.deployment(pool)
    assert secret["metadata"]["ownerReferences"][0]["uid"] == runtime["metadata"]["uid"]  # goes with the pool

    await cluster.patch("chat", {"spec": {"replicas": 2, "scaling": {"maxReplicas": 3}}})
    router = await eventually(lambda: cluster.deployment(pools.router_name(pool)), what="router deployment")
    expected = pools.internal_token_env(pool)
    for deployment in (cluster.deployment(pool), router):
        assert expected in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    # Reconciled again (scaled): the token is not rewritten, or running pods and new ones would disagree.
    assert cluster.api.live("v1/secrets", NAMESPACE, name)["stringData"][pools.INTERNAL_TOKEN_KEY] == token


async def test_a_length_aware_pools_pods_are_labelled_with_the_stage_their_router_puts_them_in(
        cluster, operator, runtime_factory) -> None:  # fmt: skip
    """A gateway's endpoint picker (or a person) can see and honour the L4 stages: each runtime pod carries
    the length range of its stage as the router routes now (read from the router's /metrics)."""
    await cluster.add_gpu_node("gpu-a", gpus=4)
    short, long_, router = runtime_factory(), runtime_factory(), runtime_factory()
    await cluster.create("chat", ls_spec(replicas=2, scaling={"maxReplicas": 3}, placement={"routing": "lengthAware"}))
    await eventually(lambda: cluster.condition("chat", "Admitted").get("status") == "True", what="admitted")
    pool = cluster.status("chat")["pool"]
    short_pod = (await cluster.run_replicas(pool, node="gpu-a", port=short.port, count=1))[0]
    long_pod = (await cluster.run_replicas(pool, node="gpu-a", port=long_.port, count=2))[0]
    router.set(router={"stages": [[0, 6000], [6000, None]],
                       "replicas": {f"http://127.0.0.1:{short.port}": 0, f"http://127.0.0.1:{long_.port}": 1}})
    deployment = await eventually(lambda: cluster.deployment(pools.router_name(pool)), what="router deployment")
    template = deployment["spec"]["template"]
    await cluster._request("POST", f"/api/v1/namespaces/{NAMESPACE}/pods", {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"{pool}-router-0", "labels": template["metadata"]["labels"]},
        "spec": {**template["spec"], "nodeName": "gpu-a", "containers": [
            {**c, "ports": [{"name": "http", "containerPort": router.port}]} for c in template["spec"]["containers"]]},
        "status": {"phase": "Running", "podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
    })  # fmt: skip

    def labels(name: str) -> dict[str, str]:
        return cluster.api.live("v1/pods", NAMESPACE, name)["metadata"]["labels"]

    await eventually(lambda: labels(short_pod).get(pools.LABEL_LENGTH_MAX) == "6000", what="short stage labels")
    assert labels(short_pod)[pools.LABEL_LENGTH_MIN] == "0"
    await eventually(lambda: labels(long_pod).get(pools.LABEL_LENGTH_MIN) == "6000", what="long stage labels")
    assert pools.LABEL_LENGTH_MAX not in labels(long_pod)  # the last stage is unbounded

    # The router re-plans: the labels follow.
    router.set(router={"stages": [[0, 3000], [3000, None]],
                       "replicas": {f"http://127.0.0.1:{short.port}": 0, f"http://127.0.0.1:{long_.port}": 1}})
    await eventually(lambda: labels(short_pod).get(pools.LABEL_LENGTH_MAX) == "3000", what="re-planned labels")
    await eventually(lambda: labels(long_pod).get(pools.LABEL_LENGTH_MIN) == "3000", what="re-planned labels")
