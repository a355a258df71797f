"""Talking to the API server about children and status, with the official `kubernetes` client.

Children are written with server-side apply under one field manager, so a re-render (or a restarted
operator rendering the same bodies) is a no-op, and a field this operator stops setting is removed. The
client is synchronous; calls run in worker threads so that kopf's event loop keeps serving other objects.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

from piggyback_operator.api import GROUP, PLURAL, VERSION

FIELD_MANAGER = "piggyback-operator"
APPLY = "application/apply-patch+yaml"


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


class Kube:
    def __init__(self, api_client: kubernetes.client.ApiClient, timeout_s: float = 30.0) -> None:
        self.api_client = api_client
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.apps = kubernetes.client.AppsV1Api(api_client)
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self.timeout_s = timeout_s

    def close(self) -> None:
        self.api_client.close()

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, _request_timeout=self.timeout_s, **kwargs)

    async def apply(self, body: dict[str, Any]) -> None:
        """Server-side apply of a ConfigMap, Service or Deployment body (force: this operator owns them)."""
        patchers = {
            "ConfigMap": self.core.patch_namespaced_config_map,
            "Service": self.core.patch_namespaced_service,
            "Deployment": self.apps.patch_namespaced_deployment,
        }
        meta = body["metadata"]
        await self._call(
            patchers[body["kind"]], meta["name"], meta["namespace"], body,
            field_manager=FIELD_MANAGER, force=True, _content_type=APPLY,
        )  # fmt: skip

    async def read_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            response = await self._call(
                self.apps.read_namespaced_deployment, name, namespace, _preload_content=False
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return json.loads(response.data)

    async def read_llmservice(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self._call(self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name)
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
