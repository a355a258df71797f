"""Fixtures: an emulated API server on loopback, the real kopf operator in-process, fake kubelets, runtimes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

# Fast timers and retries; read by piggyback_operator.handlers at import, so set before importing it.
os.environ.setdefault("PIGGYBACK_SCRAPE_INTERVAL_S", "1")
os.environ.setdefault("PIGGYBACK_RETRY_DELAY_S", "1")
# The operator's API client gives up on a request after this long (and retries): the fault tests hold
# responses past it. Long enough that a loaded 2-core machine does not time out ordinary requests.
os.environ.setdefault("PIGGYBACK_API_TIMEOUT_S", "3")

import httpx
import kmock
import kopf
import pytest
import yaml
from emulated_apiserver import OPERATOR_TOKEN, ApiServer
from rbac import missing_permissions

import piggyback_operator.handlers  # noqa: F401  (registers the handlers with kopf's default registry)
from piggyback_operator import pools
from piggyback_operator.api import crd_manifest

NAMESPACE = "serving"
LLMS = "piggyback.dev/v1alpha1/llmservices"
LLMS_PATH = f"/apis/piggyback.dev/v1alpha1/namespaces/{NAMESPACE}/llmservices"
HERE = Path(__file__).parent

RESOURCES: dict[str, kmock.ResourceInfo] = {
    LLMS: kmock.ResourceInfo(kind="LLMService", namespaced=True, subresources={"status", "scale"},
                             shortnames={"llms"}),
    "v1/pods": kmock.ResourceInfo(kind="Pod", namespaced=True),
    "v1/nodes": kmock.ResourceInfo(kind="Node", namespaced=False),
    "v1/namespaces": kmock.ResourceInfo(kind="Namespace", namespaced=False),
    "v1/configmaps": kmock.ResourceInfo(kind="ConfigMap", namespaced=True),
    "v1/persistentvolumeclaims": kmock.ResourceInfo(kind="PersistentVolumeClaim", namespaced=True),
    "v1/services": kmock.ResourceInfo(kind="Service", namespaced=True),
    "v1/events": kmock.ResourceInfo(kind="Event", namespaced=True),
    "apps/v1/deployments": kmock.ResourceInfo(kind="Deployment", namespaced=True),
    "networking.k8s.io/v1/networkpolicies": kmock.ResourceInfo(kind="NetworkPolicy", namespaced=True),
    "v1/serviceaccounts": kmock.ResourceInfo(kind="ServiceAccount", namespaced=True),
    "rbac.authorization.k8s.io/v1/rolebindings": kmock.ResourceInfo(kind="RoleBinding", namespaced=True),
    "keda.sh/v1alpha1/scaledobjects": kmock.ResourceInfo(kind="ScaledObject", namespaced=True),
    "ray.io/v1/rayclusters": kmock.ResourceInfo(kind="RayCluster", namespaced=True),
    "inference.networking.k8s.io/v1/inferencepools": kmock.ResourceInfo(kind="InferencePool", namespaced=True),
    "apiextensions.k8s.io/v1/customresourcedefinitions": kmock.ResourceInfo(
        kind="CustomResourceDefinition", namespaced=False),
}
VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}


async def eventually(check: Callable[[], Any], timeout: float = 45.0, what: str = "") -> Any:
    """Poll until `check()` returns something truthy (and return it), or fail saying what was awaited.

    The timeout only matters on failure: it is generous so that a loaded 2-core CI machine does not fail a
    scenario that merely ran slowly.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or check}; last value: {last!r}")


class Cluster:
    """The test's hands on the emulated cluster: what kubectl, the scheduler and kubelets would do."""

    def __init__(self, api: ApiServer) -> None:
        self.api = api

    async def _request(self, method: str, path: str, body: Any = None, content_type: str | None = None) -> Any:
        headers = {"Content-Type": content_type} if content_type else {}
        async with self.api.request(method, path, json=body, headers=headers) as response:
            payload = await response.json()
            assert response.status < 300, f"{method} {path}: {response.status} {payload}"
            return payload

    async def add_gpu_node(
        self, name: str, gpus: int = 2, memory: str = "512Gi", labels: dict[str, str] | None = None
    ) -> None:
        await self._request("POST", "/api/v1/nodes", {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
            "status": {"allocatable": {"cpu": "64", "memory": memory, pools.GPU_RESOURCE: str(gpus)}},
        })  # fmt: skip

    async def create(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {"apiVersion": "piggyback.dev/v1alpha1", "kind": "LLMService",
                "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}
        return await self._request("POST", LLMS_PATH, body)

    async def scale(self, name: str, replicas: int) -> dict[str, Any]:
        """What `kubectl scale llms/NAME --replicas=N` and an HPA do: write the /scale subresource."""
        return await self._request("PATCH", f"{LLMS_PATH}/{name}/scale", {"spec": {"replicas": replicas}},
                                   "application/merge-patch+json")  # fmt: skip

    async def read_scale(self, name: str) -> dict[str, Any]:
        return await self._request("GET", f"{LLMS_PATH}/{name}/scale")

    async def patch(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return await self._request("PATCH", f"{LLMS_PATH}/{name}", patch, "application/merge-patch+json")

    async def delete(self, name: str) -> None:
        await self._request("DELETE", f"{LLMS_PATH}/{name}")

    def llms(self, name: str) -> dict[str, Any] | None:
        return self.api.live(LLMS, NAMESPACE, name)

    def status(self, name: str) -> dict[str, Any]:
        return (self.llms(name) or {}).get("status") or {}

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == type_), {})

    def deployments(self) -> list[dict[str, Any]]:
        return self.api.all("apps/v1/deployments", NAMESPACE)

    def deployment(self, pool: str) -> dict[str, Any] | None:
        return self.api.live("apps/v1/deployments", NAMESPACE, pool)

    def configmap(self, pool: str) -> dict[str, Any] | None:
        return self.api.live("v1/configmaps", NAMESPACE, pool)

    def runtime_config(self, pool: str) -> dict[str, Any] | None:
        cm = self.configmap(pool)
        return yaml.safe_load(cm["data"][pools.CONFIG_KEY]) if cm else None

    def service(self, name: str) -> dict[str, Any] | None:
        return self.api.live("v1/services", NAMESPACE, name)

    def network_policy(self, pool: str) -> dict[str, Any] | None:
        return self.api.live("networking.k8s.io/v1/networkpolicies", NAMESPACE, pool)

    def events(self, reason: str) -> list[dict[str, Any]]:
        return [e for e in self.api.all("v1/events", NAMESPACE) if e.get("reason") == reason]

    async def delete_replicas(self, pool: str) -> list[str]:
        """Be the Deployment controller removing every pod of the pool (e.g. before replacing them)."""
        names = [p["metadata"]["name"] for p in self.api.all("v1/pods", NAMESPACE)
                 if p["metadata"]["labels"].get(pools.LABEL_POOL) == pool]
        for name in names:
            await self._request("DELETE", f"/api/v1/namespaces/{NAMESPACE}/pods/{name}")
        return names

    async def set_pod_ready(self, name: str, ready: bool, restarted: bool = False) -> None:
        """Be the kubelet: a failing readiness probe marks the pod not ready; a restarted container counts."""
        pod = self.api.live("v1/pods", NAMESPACE, name)
        assert pod is not None, f"no pod {name}"
        statuses = pod["status"].get("containerStatuses") or [{"name": "runtime", "restartCount": 0}]
        if restarted:
            statuses = [{**c, "restartCount": c.get("restartCount", 0) + 1} for c in statuses]
        await self._request("PATCH", f"/api/v1/namespaces/{NAMESPACE}/pods/{name}", {"status": {
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "containerStatuses": [{**c, "ready": ready} for c in statuses],
        }}, "application/merge-patch+json")  # fmt: skip

    async def run_replicas(self, pool: str, node: str, port: int, count: int | None = None) -> list[str]:
        """Be the Deployment controller, the scheduler and the kubelet: ready pods of the pool's template,
        on `node`, listening on 127.0.0.1:`port` (where a runtime process really is)."""
        deployment = self.deployment(pool)
        assert deployment is not None, f"no Deployment {pool}"
        template = deployment["spec"]["template"]
        count = deployment["spec"]["replicas"] if count is None else count
        existing = [p for p in self.api.all("v1/pods", NAMESPACE)
                    if p["metadata"]["labels"].get(pools.LABEL_POOL) == pool]
        names = []
        for i in range(len(existing), count):
            containers = []
            for c in template["spec"]["containers"]:
                ports = [{**p, "containerPort": port} if p.get("name") == "http" else p for p in c.get("ports", [])]
                containers.append({**c, "ports": ports})
            pod = await self._request("POST", f"/api/v1/namespaces/{NAMESPACE}/pods", {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "name": f"{pool}-{i}", "labels": template["metadata"]["labels"],
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": pool,
                                         "uid": deployment["metadata"]["uid"], "controller": True}],
                },
                "spec": {**template["spec"], "containers": containers, "nodeName": node},
                "status": {"phase": "Running", "podIP": "127.0.0.1",
                           "conditions": [{"type": "Ready", "status": "True"}]},
            })  # fmt: skip
            names.append(pod["metadata"]["name"])
        return names


@pytest.fixture
async def apiserver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ApiServer]:
    async with ApiServer() as api, kmock.Server(api) as server:
        for resource, info in RESOURCES.items():
            info.verbs.update(VERBS)
            api.resources[resource] = info
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": f"http://127.0.0.1:{server.port}"}}],
            "users": [{"name": "kmock", "user": {"token": OPERATOR_TOKEN}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
        }))  # fmt: skip
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        async with api.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=crd_manifest()) as r:
            assert r.status == 200, await r.text()
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        yield api
    # Every scenario doubles as an RBAC check: what the operator called must be granted by its ClusterRole.
    missing = missing_permissions(api.operator_calls())
    assert not missing, "the operator made calls manifests/base/rbac.yaml does not grant:\n" + "\n".join(
        f"  {perm}: e.g. {call.method} {call.path}" for perm, call in sorted(missing.items()))


@pytest.fixture
def cluster(apiserver: ApiServer) -> Cluster:
    return Cluster(apiserver)


class OperatorThread:
    """The real kopf operator with the real handlers, in its own thread and event loop.

    As kopf's KopfRunner does: on exit, kopf cancels every task its loop spawned while it ran, which must not
    include the emulated API server's or the test's. Stopping is what SIGTERM does to the operator's pod:
    kopf gives running handlers `settings.queueing.exit_timeout` (2 s) to finish, then cancels them.
    """

    def __init__(self) -> None:
        self.settings = kopf.OperatorSettings()
        self.settings.watching.reconnect_backoff = 0.1
        self._stop, self._ready = threading.Event(), threading.Event()
        self.failures: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name="kopf-operator", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(kopf.operator(
                clusterwide=True, standalone=True, settings=self.settings, stop_flag=self._stop,
                ready_flag=self._ready, memo=kopf.Memo(),
            ))  # fmt: skip
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.failures.append(exc)

    async def start(self) -> None:
        self._thread.start()
        assert await asyncio.to_thread(self._ready.wait, 20), f"the operator did not start: {self.failures}"

    def request_stop(self) -> None:
        self._stop.set()

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.to_thread(self._thread.join, 30)
        assert not self._thread.is_alive(), "the operator did not stop within 30s"
        if self.failures:
            raise self.failures[0]


@contextlib.asynccontextmanager
async def running_operator() -> AsyncIterator[OperatorThread]:
    """The real kopf operator with the real handlers, until the block ends."""
    op = OperatorThread()
    await op.start()
    try:
        yield op
    finally:
        await op.stop()


@pytest.fixture
async def operator(apiserver: ApiServer) -> AsyncIterator[None]:
    async with running_operator():
        yield


def _start_fake_runtime(port: int = 0) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(
        [sys.executable, str(HERE / "fake_runtime.py"), "--port", str(port)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("PORT "), f"fake runtime did not start: {line!r}"
    return process, int(line.split()[1])


class Runtime:
    """A runtime-like HTTP process on 127.0.0.1 whose /metrics figures the test sets."""

    def __init__(self, process: subprocess.Popen[str], port: int) -> None:
        self.process = process
        self.port = port
        self.processes = [process]  # every process this runtime has been, for cleanup

    def set(self, **control: Any) -> None:
        httpx.post(f"http://127.0.0.1:{self.port}/control", json=control, timeout=5).raise_for_status()

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or a crash would: no goodbye, the port stops answering."""
        self.process.kill()
        self.process.wait(timeout=10)

    def restart(self) -> None:
        """The container restarted: a new process on the same port, with fresh (empty) metrics."""
        self.process, port = _start_fake_runtime(self.port)
        self.processes.append(self.process)
        assert port == self.port


@pytest.fixture
def runtime_factory() -> Iterator[Callable[[], Runtime]]:
    started: list[Runtime] = []

    def start() -> Runtime:
        runtime = Runtime(*_start_fake_runtime())
        started.append(runtime)
        return runtime

    yield start
    for process in (p for runtime in started for p in runtime.processes):
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=10)


@pytest.fixture
def runtime(runtime_factory: Callable[[], Runtime]) -> Runtime:
    return runtime_factory()


SpecFactory = Callable[..., dict[str, Any]]


def ls_spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"uri": "synthetic://tiny-llama", "dtype": "float32"},
        "class": "LS",
        "slo": {"ttftMs": 200, "tpotMs": 50, "attainmentTarget": 0.99},
        "expectedLoad": {"requestsPerSecond": 5},
    }
    spec.update(overrides)
    return spec


def be_spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"uri": "synthetic://tiny-llama", "dtype": "float32"},
        "class": "BE",
        "expectedLoad": {"concurrency": 256},
        "resources": {"gpus": 1, "cpuCores": 8, "hostMemory": "64Gi"},
    }
    spec.update(overrides)
    return spec


Waiter = Callable[..., Awaitable[Any]]
