"""The operator's scenarios against a real cluster (kind via e2e/setup.sh, or any KUBECONFIG with it installed).

Skips, saying why, when no cluster is reachable or the operator is not installed. Runs in a fresh namespace
that is deleted afterwards.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

kubernetes = pytest.importorskip("kubernetes")
from kubernetes.client.exceptions import ApiException  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GROUP, VERSION, PLURAL = "piggyback.dev", "v1alpha1", "llmservices"


def _connect() -> Any:
    try:
        kubernetes.config.load_kube_config()
        client = kubernetes.client.ApiClient()
        kubernetes.client.VersionApi(client).get_code(_request_timeout=5)
    except Exception as exc:  # no kubeconfig, unreachable server, bad credentials
        pytest.skip(f"no Kubernetes cluster reachable ({type(exc).__name__}: {exc}); run e2e/setup.sh first")
    try:
        kubernetes.client.ApiextensionsV1Api(client).read_custom_resource_definition(f"{PLURAL}.{GROUP}")
    except ApiException:
        pytest.skip("the LLMService CRD is not installed; run e2e/setup.sh (or kubectl apply -k manifests/base)")
    return client


@pytest.fixture(scope="module")
def api() -> Any:
    return _connect()


@pytest.fixture
def ns(api: Any) -> Iterator[str]:
    name = f"pb-e2e-{uuid.uuid4().hex[:6]}"
    core = kubernetes.client.CoreV1Api(api)
    # Pod Security "restricted" enforced: a runtime pod the operator renders that is not hardened (root, a
    # capability, no seccomp profile) is refused by the API server, and no scenario reaches Ready.
    core.create_namespace({"metadata": {"name": name, "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}})
    yield name
    core.delete_namespace(name)


def eventually(check: Callable[[], Any], timeout: float = 120, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except ApiException as exc:
            last = exc
        if last and not isinstance(last, ApiException):
            return last
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


class Cluster:
    def __init__(self, api: Any, ns: str) -> None:
        self.ns = ns
        self.custom = kubernetes.client.CustomObjectsApi(api)
        self.apps = kubernetes.client.AppsV1Api(api)
        self.core = kubernetes.client.CoreV1Api(api)

    def create(self, name: str, spec: dict[str, Any]) -> None:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LLMService", "metadata": {"name": name}, "spec": spec}
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, body)

    def patch(self, name: str, patch: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name, patch)

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)

    def status(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name).get("status") or {}

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == type_), {})

    def deployment(self, name: str) -> Any:
        try:
            return self.apps.read_namespaced_deployment(name, self.ns)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def runtime_config(self, pool: str) -> dict[str, Any]:
        return yaml.safe_load(self.core.read_namespaced_config_map(pool, self.ns).data["runtime.yaml"])


def sample(name: str, **overrides: Any) -> dict[str, Any]:
    spec = yaml.safe_load((ROOT / "manifests" / "samples" / name).read_text())["spec"]
    spec["placement"] = {**spec.get("placement", {}), "nodeSelector": {"piggyback.dev/e2e-gpu": "true"}}
    return {**spec, "resources": {**spec.get("resources", {}), "cpuCores": 0, "hostMemory": "1Gi"}, **overrides}


@pytest.fixture
def cluster(api: Any, ns: str) -> Cluster:
    return Cluster(api, ns)


def owners(obj: Any) -> set[str]:
    return {ref.name for ref in obj.metadata.owner_references or []}


def test_ls_and_be_share_a_pool_rerender_on_update_and_delete_and_children_go_with_the_last(cluster):
    cluster.create("chat", sample("ls-chat.yaml"))
    cluster.create("batch", sample("be-batch.yaml"))
    eventually(lambda: cluster.condition("batch", "Admitted").get("status") == "True", what="batch admitted")
    pool = cluster.status("chat")["pool"]
    assert pool == cluster.status("batch")["pool"]
    eventually(lambda: (d := cluster.deployment(pool)) and owners(d) == {"chat", "batch"}, what="shared pool")
    eventually(lambda: cluster.condition("chat", "Ready").get("status") == "True", timeout=600, what="chat Ready")

    cluster.patch("chat", {"spec": {"slo": {"ttftMs": 900}}})
    eventually(lambda: next(s for s in cluster.runtime_config(pool)["services"] if s["name"] == "chat")["slo"]
               ["ttft_ms"] == 900, what="re-rendered config")

    cluster.delete("batch")
    eventually(lambda: [s["name"] for s in cluster.runtime_config(pool)["services"]] == ["chat"], what="without batch")
    cluster.delete("chat")
    eventually(lambda: cluster.deployment(pool) is None, what="garbage-collected pool")


def test_no_matching_gpu_node_is_reported(cluster):
    cluster.create("nowhere", sample("ls-chat.yaml", placement={"nodeSelector": {"piggyback.dev/no-such-label": "x"}}))
    c = eventually(lambda: (c := cluster.condition("nowhere", "Admitted")) and c, what="a decision")
    assert (c["status"], c["reason"]) == ("False", "NoGPUNode")


def test_an_operator_restart_converges(cluster, api):
    cluster.create("chat", sample("ls-chat.yaml"))
    eventually(lambda: cluster.condition("chat", "Admitted").get("status") == "True", what="admitted")
    core = kubernetes.client.CoreV1Api(api)
    core.delete_collection_namespaced_pod(
        "piggyback-system", label_selector="app.kubernetes.io/name=piggyback-operator"
    )
    cluster.create("batch", sample("be-batch.yaml"))
    eventually(lambda: cluster.condition("batch", "Admitted").get("status") == "True", what="after restart")
    pool = cluster.status("chat")["pool"]
    assert len(cluster.apps.list_namespaced_deployment(cluster.ns).items) == 1
    eventually(lambda: owners(cluster.deployment(pool)) == {"chat", "batch"}, what="owned by both")
