"""Talking to the API server about children and status, with the official `kubernetes` client.

Children are written with server-side apply under one field manager, so a re-render (or a restarted
operator rendering the same bodies) is a no-op, and a field this operator stops setting is removed. The
client is synchronous; calls run in worker threads so that kopf's event loop keeps serving other objects.

Transient API failures (5xx, 429, timeouts, a dropped connection) are retried here with exponential backoff
and jitter, a few seconds in all, before the handler fails and kopf retries it later: an API server restart
or a slow etcd should not cost a reconcile a whole handler retry delay. Every write is safe to repeat: applies
are idempotent, and a status patch carries the resourceVersion it was computed from.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
from collections.abc import Callable
from typing import Any

import kubernetes
import urllib3
from kubernetes.client.exceptions import ApiException

from piggyback_operator.api import GROUP, PLURAL, VERSION

FIELD_MANAGER = "piggyback-operator"
MERGE_PATCH = "application/merge-patch+json"
# Children that are custom resources of other projects: kind -> (group, version, plural).
CUSTOM_KINDS: dict[str, tuple[str, str, str]] = {
    "ScaledObject": ("keda.sh", "v1alpha1", "scaledobjects"),
    "InferencePool": ("inference.networking.k8s.io", "v1", "inferencepools"),
    "RayCluster": ("ray.io", "v1", "rayclusters"),
}
DELETABLE_KINDS = ("ScaledObject",)  # children that go while their owner stays (autoscaler switched off)
READABLE_KINDS = ("RayCluster",)  # children whose status the operator mirrors into a condition
APPLY = "application/apply-patch+yaml"
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
BACKOFF_S = 0.2  # the first retry's delay; doubled per attempt up to MAX_BACKOFF_S
MAX_BACKOFF_S = 5.0
logger = logging.getLogger(__name__)


def api_timeout_s() -> float:
    return float(os.environ.get("PIGGYBACK_API_TIMEOUT_S", "30"))


class Conflict(Exception):
    """The object changed since it was read (HTTP 409); read it again and retry."""


def load_client_config() -> kubernetes.client.ApiClient:
    """In-cluster credentials in a pod, else the kubeconfig (KUBECONFIG or ~/.kube/config)."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        # The client reads KUBECONFIG once at import; read it now, as kubectl would.
        kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    return kubernetes.client.ApiClient()


def _retry_after(exc: ApiException) -> float | None:
    try:
        return float((exc.headers or {}).get("Retry-After", ""))
    except ValueError:
        return None


class Kube:
    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        timeout_s: float | None = None,
        attempts: int = 6,
        backoff_s: float = BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
    ) -> None:
        self.api_client = api_client
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.apps = kubernetes.client.AppsV1Api(api_client)
        self.networking = kubernetes.client.NetworkingV1Api(api_client)
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self.rbac = kubernetes.client.RbacAuthorizationV1Api(api_client)
        self.timeout_s = api_timeout_s() if timeout_s is None else timeout_s
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s

    def close(self) -> None:
        self.api_client.close()

    async def _call(self, fn: Callable[..., Any], *args: Any, retry_conflict: bool = False, **kwargs: Any) -> Any:
        """`fn` in a worker thread; transient failures (and 409 where `retry_conflict`) retried with backoff."""
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                return await asyncio.to_thread(fn, *args, _request_timeout=self.timeout_s, **kwargs)
            except ApiException as exc:
                transient = exc.status in TRANSIENT_STATUSES or (retry_conflict and exc.status == 409)
                if not transient or attempt == self.attempts:
                    raise
                wait = max(delay, _retry_after(exc) or 0.0)
                reason = f"HTTP {exc.status} {exc.reason}"
            except (urllib3.exceptions.HTTPError, OSError) as exc:  # timeouts, refused or dropped connections
                if attempt == self.attempts:
                    raise
                wait, reason = delay, f"{type(exc).__name__}: {exc}"
            wait = min(wait, self.max_backoff_s) * random.uniform(0.8, 1.2)  # jitter: retries do not align
            logger.warning("%s failed (attempt %d/%d, %s); retrying in %.2fs",
                           getattr(fn, "__name__", fn), attempt, self.attempts, reason, wait)  # fmt: skip
            await asyncio.sleep(wait)
            delay = min(delay * 2, self.max_backoff_s)
        raise AssertionError("unreachable")

    async def apply(self, body: dict[str, Any]) -> None:
        """Server-side apply of a child body (force: this operator owns them).

        A 409 is retried too: an apply that creates races with another creating the same object (e.g. this
        operator's previous process, whose request was still in flight); applied again, it is an update.
        """
        patchers = {
            "ConfigMap": self.core.patch_namespaced_config_map,
            "Service": self.core.patch_namespaced_service,
            "Deployment": self.apps.patch_namespaced_deployment,
            "NetworkPolicy": self.networking.patch_namespaced_network_policy,
            "ServiceAccount": self.core.patch_namespaced_service_account,
            "RoleBinding": self.rbac.patch_namespaced_role_binding,
        }
        meta = body["metadata"]
        if body["kind"] in CUSTOM_KINDS:
            group, version, plural = CUSTOM_KINDS[body["kind"]]
            await self._call(
                self.custom.patch_namespaced_custom_object, group, version, meta["namespace"], plural, meta["name"],
                body, field_manager=FIELD_MANAGER, force=True, _content_type=APPLY, retry_conflict=True,
            )  # fmt: skip
            return
        await self._call(
            patchers[body["kind"]], meta["name"], meta["namespace"], body,
            field_manager=FIELD_MANAGER, force=True, _content_type=APPLY, retry_conflict=True,
        )  # fmt: skip

    async def create_if_absent(self, body: dict[str, Any]) -> bool:
        """Create `body` unless an object of its name exists (409); True if this call created it.

        For values set once and never rewritten (a generated token): the operator never reads them back, so
        its role needs `create` on Secrets and nothing that reveals one.
        """
        creators: dict[str, Callable[..., Any]] = {
            "Secret": self.core.create_namespaced_secret,
            "PersistentVolumeClaim": self.core.create_namespaced_persistent_volume_claim,
        }
        meta = body["metadata"]
        try:
            await self._call(creators[body["kind"]], meta["namespace"], body)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete a child that goes while its owner stays; False if it was not there."""
        assert kind in DELETABLE_KINDS, f"{kind} is not deleted by the operator"
        group, version, plural = CUSTOM_KINDS[kind]
        try:
            await self._call(self.custom.delete_namespaced_custom_object, group, version, namespace, plural, name)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def annotate_pod(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        """Merge annotations into a pod (the pod deletion cost that makes a scale-down remove it first)."""
        await self._patch_pod_metadata(namespace, name, {"annotations": annotations})

    async def label_pod(self, namespace: str, name: str, labels: dict[str, str | None]) -> None:
        """Merge labels into a pod (None removes one): a lengthAware replica's stage range."""
        await self._patch_pod_metadata(namespace, name, {"labels": labels})

    async def _patch_pod_metadata(self, namespace: str, name: str, metadata: dict[str, Any]) -> None:
        try:
            patch = {"metadata": metadata}
            await self._call(self.core.patch_namespaced_pod, name, namespace, patch, _content_type=MERGE_PATCH)
        except ApiException as exc:
            if exc.status != 404:  # gone meanwhile: nothing to order
                raise

    async def read_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            response = await self._call(
                self.apps.read_namespaced_deployment, name, namespace, _preload_content=False
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        deployment: dict[str, Any] = json.loads(response.data)
        return deployment

    async def serves_resource(self, group_version: str, plural: str) -> bool:
        """Whether the API server's discovery lists `plural` under /apis/<group_version> (a CRD installed).
        Discovery needs no rule in the operator's role (system:discovery grants it to every client)."""
        group, _, version = group_version.rpartition("/")
        try:
            response = await self._call(self.custom.get_api_resources, group, version, _preload_content=False)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        body = json.loads(response.data)
        return any(r.get("name") == plural for r in body.get("resources", []))

    async def read_custom(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        assert kind in READABLE_KINDS, f"{kind} is not read by the operator (the role grants get on READABLE_KINDS)"
        group, version, plural = CUSTOM_KINDS[kind]
        try:
            found: dict[str, Any] = await self._call(
                self.custom.get_namespaced_custom_object, group, version, namespace, plural, name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return found

    async def read_llmservice(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            service: dict[str, Any] = await self._call(
                self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name
            )
            return service
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any], resource_version: str) -> None:
        """Merge-patch the status subresource, only if nobody changed the object since `resource_version`."""
        body = {"metadata": {"resourceVersion": resource_version}, "status": status}
        try:
            await self._call(
                self.custom.patch_namespaced_custom_object_status, GROUP, VERSION, namespace, PLURAL, name, body,
                field_manager=FIELD_MANAGER,
            )  # fmt: skip
        except ApiException as exc:
            if exc.status == 409:
                raise Conflict(f"{namespace}/{name} changed since resourceVersion {resource_version}") from None
            raise
