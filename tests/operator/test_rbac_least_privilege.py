"""The operator's ClusterRole grants exactly what the operator uses: nothing missing, nothing extra.

Two sources must agree with manifests/base/rbac.yaml:
- observed: the requests the emulated API server saw the real operator make through a scenario that walks
  every code path that calls the API (admission, pool rendering, status, scraping, events, deletion), plus
  every other operator scenario run in this session (and each of those fails on its own if it needed a
  permission the role lacks: see the `apiserver` fixture);
- static: kopf's registered handlers (what kopf itself lists, watches and patches) and the API methods
  kube.py calls, read from the code. A call in the code that the scenario never made fails too: the
  scenario must cover it, or the comparison would miss it.
"""

from __future__ import annotations

import ast
import inspect
import re

import kopf
import pytest
from conftest import Cluster, Runtime, be_spec, eventually, ls_spec
from emulated_apiserver import OPERATOR_TOKEN, SESSION_CALLS, ApiServer
from rbac import NOT_OBSERVABLE, RBAC_FILE, Permission, granted_permissions, needed_permissions

import piggyback_operator.handlers  # noqa: F401  (registers the handlers)
from piggyback_operator import api, kube

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]  # slow: the operator against an emulated API server


def _plural(snake: str) -> str:
    word = snake.replace("_", "")
    return word[:-1] + "ies" if word.endswith("y") else word + "s"


def kube_py_permissions() -> set[Permission]:
    """Permissions of every `self.<api>.<method>` kube.py references (methods named as the client names them)."""
    tree = ast.parse(inspect.getsource(kube))

    def nodes_in(name: str) -> set[int]:
        fn = next(n for n in ast.walk(tree) if isinstance(n, ast.AsyncFunctionDef) and n.name == name)
        return {id(n) for n in ast.walk(fn)}

    in_apply, in_delete, in_read = nodes_in("apply"), nodes_in("delete"), nodes_in("read_custom")
    out: set[Permission] = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"
                and node.value.attr in ("core", "apps", "networking", "custom", "rbac")):  # fmt: skip
            continue
        if node.attr == "get_api_resources":  # discovery (/apis/<group>/<version>): system:discovery, no rule
            continue
        m = re.fullmatch(r"(read|get|list|patch|create|replace|delete)_(?:namespaced_)?(\w+?)(_status)?", node.attr)
        assert m, f"kube.py calls {node.attr}, which this test cannot map to a permission"
        verb = {"read": "get", "get": "get", "replace": "update"}.get(m[1], m[1])
        if m[2] == "custom_object" and id(node) in in_apply:  # other projects' kinds (kube.CUSTOM_KINDS)
            targets = [(group, plural) for group, _, plural in kube.CUSTOM_KINDS.values()]
        elif m[2] == "custom_object" and id(node) in in_delete:
            targets = [(kube.CUSTOM_KINDS[k][0], kube.CUSTOM_KINDS[k][2]) for k in kube.DELETABLE_KINDS]
        elif m[2] == "custom_object" and id(node) in in_read:
            targets = [(kube.CUSTOM_KINDS[k][0], kube.CUSTOM_KINDS[k][2]) for k in kube.READABLE_KINDS]
        elif m[2] == "custom_object":
            targets = [(api.GROUP, api.PLURAL)]
        else:
            group = {"core": "", "apps": "apps", "networking": "networking.k8s.io",
                     "rbac": "rbac.authorization.k8s.io"}[node.value.attr]  # fmt: skip
            targets = [(group, _plural(m[2]))]
        for group, resource in targets:
            resource += "/status" if m[3] else ""
            out.add((group, resource, verb))
            if id(node) in in_apply:  # server-side apply creates when absent
                out.add((group, resource, "create"))
    return out


def kopf_permissions() -> set[Permission]:
    """What kopf does for the registered handlers: list+watch what it watches or indexes; patch what it
    handles (finalizer, progress and last-handled annotations); create Events (kopf.event and failures)."""
    registry = kopf.get_default_registry()
    out: set[Permission] = {("", "events", "create")}
    for handlers, verbs in ((registry._indexing, ("list", "watch")), (registry._watching, ("list", "watch")),
                            (registry._changing, ("list", "watch", "patch")),
                            (registry._spawning, ("list", "watch", "patch"))):  # fmt: skip
        for handler in handlers.get_all_handlers():
            selector = handler.selector
            assert selector is not None and selector.any_name, f"handler {handler.id} has no definite resource"
            out |= {(selector.group or "", str(selector.any_name), verb) for verb in verbs}
    return out


def describe(perms: set[Permission]) -> str:
    return "\n".join(f"  {group or 'core'}/{resource}: {verb}" for group, resource, verb in sorted(perms))


async def walk_every_api_path(cluster: Cluster, runtime: Runtime) -> None:
    """Create an LS and a BE service, run their pool, update one, breach its SLO, autoscale and scale it down,
    route a third through a gateway, delete them all."""
    await cluster.add_gpu_node("gpu-a")
    runtime.set(services={"chat": {"class": "LS", "attainment": 1.0, "window": 50, "ttft_s": [0.05] * 50},
                          "batch": {"class": "BE", "tokens": 100}}, headroom=5.0)
    await cluster.create("chat", ls_spec())
    # A batch claim, and CPU attention nodes: the pool's RayCluster (KubeRay's CRD is served here).
    await cluster.create("batch", be_spec(batch={"storage": {"pvc": {"size": "1Gi"}}},
                                          cpuAttentionNodes={"replicas": 1}))  # fmt: skip
    for name in ("chat", "batch"):
        await eventually(lambda n=name: cluster.condition(n, "Admitted").get("status") == "True", what=f"{name}")
    pool = cluster.status("chat")["pool"]
    await eventually(lambda: cluster.api.all("ray.io/v1/rayclusters"), what="the pool's RayCluster")
    await cluster.run_replicas(pool, node="gpu-a", port=runtime.port)
    await eventually(lambda: cluster.condition("chat", "Ready").get("status") == "True", what="chat Ready")
    await cluster.patch("chat", {"spec": {"slo": {"ttftMs": 400}}})
    await eventually(lambda: cluster.status("chat").get("observedGeneration") == 2, what="update handled")
    runtime.set(services={"chat": {"class": "LS", "attainment": 0.5, "window": 50, "ttft_s": [0.05] * 50}})
    await eventually(lambda: cluster.events("SLOBreached"), what="an Event")
    # Autoscaling: a ScaledObject while keda is on, a scale-down that marks a pod, the ScaledObject deleted.
    await cluster.patch("chat", {"spec": {"replicas": 2, "scaling": {"minReplicas": 1, "maxReplicas": 2,
                                                                     "autoscaler": "keda"}}})  # fmt: skip
    await eventually(lambda: cluster.api.live("keda.sh/v1alpha1/scaledobjects", "serving", "chat"), what="keda")
    await eventually(lambda: cluster.deployment(pool)["spec"]["replicas"] == 2, what="2 replicas")
    await cluster.run_replicas(pool, node="gpu-a", port=runtime.port)
    await cluster.scale("chat", 1)
    await eventually(lambda: any((p["metadata"].get("annotations") or {}) for p in cluster.api.all("v1/pods")),
                     what="a pod marked to go first")  # fmt: skip
    await cluster.patch("chat", {"spec": {"scaling": {"autoscaler": "none"}}})
    await eventually(lambda: cluster.api.live("keda.sh/v1alpha1/scaledobjects", "serving", "chat") is None,
                     what="ScaledObject deleted")  # fmt: skip
    # A gateway-routed pool: InferencePool, and the EPP's ServiceAccount, RoleBinding, Deployment and Service.
    await cluster.create("edge", ls_spec(placement={"pool": "edge", "routing": "gateway"}))
    await eventually(lambda: cluster.api.all("inference.networking.k8s.io/v1/inferencepools"), what="InferencePool")
    await eventually(lambda: cluster.api.all("rbac.authorization.k8s.io/v1/rolebindings"), what="EPP RoleBinding")
    await cluster.delete("edge")
    await eventually(lambda: cluster.llms("edge") is None, what="edge finalized")
    for name in ("batch", "chat"):
        await cluster.delete(name)
        await eventually(lambda n=name: cluster.llms(n) is None, what=f"{name} finalized")


async def test_the_cluster_role_grants_exactly_what_the_operator_calls(cluster, apiserver: ApiServer, operator,
                                                                       runtime):
    await walk_every_api_path(cluster, runtime)

    session = [c for c in SESSION_CALLS if c.user == OPERATOR_TOKEN]  # includes this scenario's
    observed = set(needed_permissions(session))
    needed = observed | set(NOT_OBSERVABLE)
    granted = granted_permissions()
    missing, extra = needed - granted, granted - needed
    assert not missing and not extra, (
        f"{RBAC_FILE.relative_to(RBAC_FILE.parents[2])} differs from what the operator uses.\n"
        f"missing (the operator calls these, the role does not grant them):\n{describe(missing) or '  -'}\n"
        f"extra (granted, never used):\n{describe(extra) or '  -'}"
    )

    static = kube_py_permissions() | kopf_permissions()
    unexercised = static - observed
    assert not unexercised, f"the code calls these but the scenario never did; extend it:\n{describe(unexercised)}"
    unexplained = observed - static
    assert not unexplained, f"observed calls the code reading does not explain:\n{describe(unexplained)}"


def test_a_permission_no_request_shows_is_listed_with_its_reason_and_is_granted():
    assert set(NOT_OBSERVABLE) <= granted_permissions()
    assert all(reason for reason in NOT_OBSERVABLE.values())


def test_the_role_reads_no_secrets_and_creates_no_pods():
    """API keys and the pool's internal token reach the pods through secretKeyRef: the operator creates the
    token's Secret once and can neither read nor rewrite any Secret. Pods: it patches only the deletion-cost
    annotation of a replica a scale-down removes (RBAC cannot narrow patch to a field), never creates one."""
    assert {verb for _, resource, verb in granted_permissions() if resource == "secrets"} == {"create"}
    assert {verb for _, resource, verb in granted_permissions() if resource == "pods"} == {"list", "watch", "patch"}
