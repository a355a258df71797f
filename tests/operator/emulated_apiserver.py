"""KMock's Kubernetes emulator, extended with the API-server semantics the operator relies on.

KMock stores objects and streams watch events; a real API server also: stamps uid, resourceVersion,
generation and creationTimestamp; names objects from generateName; bumps generation only when the spec
changes; keeps `status` and the rest apart when a resource has a status subresource; refuses a patch whose
metadata.resourceVersion is stale (409); filters lists and watches by label selectors; applies server-side
apply patches (create when absent); and, through the garbage collector, deletes dependents whose owners
are all gone and drops owner references to deleted owners. Everything here is what those do, simplified:
server-side apply treats this operator as the only manager of the fields it applies.

For the RBAC and fault tests it also records every request (who sent it, method, path) as the API server's
audit log would, and injects faults into matching requests: an error status instead of executing, a
response held back after executing (the client times out though the write landed), or a request held until
the test releases it (the sender is stopped meanwhile), then executed or dropped.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import json
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, Literal

import attrs
import jsonpatch
import kmock
from kmock._internal import rendering  # Request/Payload types of the handler interface we override

Key = tuple[kmock.resource, str | None, str]
_APPLY = "application/apply-patch+yaml"


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: dicts merge, null deletes, everything else replaces."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def parse_selector(selector: str) -> list[tuple[str, str, set[str]]]:
    """`a=b,c!=d,e,!f,g in (h,i),j notin (k)` as (key, op, values)."""
    parts = re.findall(r"[^,(]+(?:\([^)]*\))?", selector)
    out: list[tuple[str, str, set[str]]] = []
    for part in (p.strip() for p in parts if p.strip()):
        if m := re.fullmatch(r"(\S+)\s+(in|notin)\s+\(([^)]*)\)", part):
            out.append((m[1], m[2], {v.strip() for v in m[3].split(",")}))
        elif m := re.fullmatch(r"([^!=]+)(==|=|!=)(.*)", part):
            out.append((m[1].strip(), "!=" if m[2] == "!=" else "=", {m[3].strip()}))
        elif part.startswith("!"):
            out.append((part[1:].strip(), "!", set()))
        else:
            out.append((part, "exists", set()))
    return out


def selector_matches(labels: Mapping[str, str], selector: str | None) -> bool:
    for key, op, values in parse_selector(selector or ""):
        present = key in labels
        ok = {
            "=": present and labels[key] in values,
            "!=": not present or labels[key] not in values,
            "in": present and labels[key] in values,
            "notin": not present or labels[key] not in values,
            "exists": present,
            "!": not present,
        }[op]
        if not ok:
            return False
    return True


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _conflict(message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=409, reason="Conflict", message=message)


OPERATOR_TOKEN = "operator"  # the kubeconfig's bearer token: requests carrying it are the operator's
_REASONS = {409: "Conflict", 429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable",
            504: "Timeout"}


def _header(request: rendering.Request, name: str) -> str:
    return next((v for k, v in request.headers.items() if k.lower() == name.lower()), "")


@attrs.frozen
class Call:
    """One request as an audit log records it."""

    user: str  # "operator" or "test" (the test's own hands on the cluster)
    agent: str  # the User-Agent's product: "kopf" or the kubernetes client's "OpenAPI-Generator"
    method: str
    path: str
    watch: bool
    content_type: str
    at: float = attrs.field(factory=time.monotonic, eq=False)  # when it arrived

    def permissions(self) -> set[tuple[str, str, str]]:
        """(apiGroup, resource[/subresource], verb) an RBAC authorizer checks for it; empty for discovery."""
        m = re.fullmatch(r"/api/v1/(.+)|/apis/([^/]+)/[^/]+/(.+)", self.path)
        if m is None:
            return set()  # /api, /apis, /apis/<group>[/<version>], /version: discovery, granted to everyone
        group, rest = ("", m[1]) if m[1] is not None else (m[2], m[3])
        parts = rest.split("/")
        if parts[0] == "namespaces" and len(parts) >= 3:
            parts = parts[2:]  # namespaced: /namespaces/<ns>/<resource>[/<name>[/<subresource>]]
        resource, named = parts[0], len(parts) >= 2
        if len(parts) >= 3:
            resource = f"{resource}/{parts[2]}"
        verbs = {
            "GET": {"get"} if named else {"watch"} if self.watch else {"list"},
            "POST": {"create"}, "PUT": {"update"}, "PATCH": {"patch"},
            "DELETE": {"delete"} if named else {"deletecollection"},
        }[self.method]  # fmt: skip
        if self.method == "PATCH" and self.content_type.startswith(_APPLY):
            verbs = {"patch", "create"}  # server-side apply creates when absent: both are checked then
        return {(group, resource, verb) for verb in verbs}


SESSION_CALLS: list[Call] = []  # every ApiServer's calls in this pytest session, for the RBAC comparison


@attrs.define(kw_only=True)
class Fault:
    """Requests of `user` whose method is in `methods` and whose path matches `path` fail as `mode` says.

    - "status": answer `status` without executing, the first `times` matches;
    - "late": execute, then hold the response `delay_s` (past the client's timeout), the first `times` matches;
    - "hold": from the first match until `release()`, hold every match, then execute them ("land") or answer
      500 without executing ("drop").
    """

    methods: frozenset[str]
    path: re.Pattern[str]
    mode: Literal["status", "late", "hold"]
    status: int = 500
    times: int = 1
    delay_s: float = 0.0
    then: Literal["land", "drop"] = "land"
    user: str = OPERATOR_TOKEN
    hits: list[Call] = attrs.field(factory=list)
    _released: asyncio.Event = attrs.field(factory=asyncio.Event)

    def matches(self, call: Call) -> bool:
        if call.user != self.user or call.method not in self.methods or not self.path.search(call.path):
            return False
        if self.mode == "hold":
            return not self._released.is_set()
        return len(self.hits) < self.times

    def release(self) -> None:
        self._released.set()


@attrs.define(kw_only=True)
class ApiServer(kmock.KubernetesEmulator):
    _versions: Iterable[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    _last_rv: int = attrs.field(default=0, init=False)
    calls: list[Call] = attrs.field(factory=list, init=False)
    faults: list[Fault] = attrs.field(factory=list, init=False)

    def inject(self, methods: str, path: str, mode: Literal["status", "late", "hold"], **kwargs: Any) -> Fault:
        """Add a fault for `methods` ("PATCH" or "POST,PATCH") on paths matching the regexp `path`."""
        fault = Fault(methods=frozenset(methods.split(",")), path=re.compile(path), mode=mode, **kwargs)
        self.faults.append(fault)
        return fault

    def operator_calls(self) -> list[Call]:
        return [c for c in self.calls if c.user == OPERATOR_TOKEN]

    # --- helpers ---

    def _next_rv(self) -> str:
        self._last_rv = next(self._versions)  # type: ignore[call-overload]
        return str(self._last_rv)

    def _has_status_subresource(self, resource: kmock.resource) -> bool:
        for known in self.resources:
            if known == resource:
                return "status" in self.resources[known].subresources
        return False

    def _live(self, key: Key) -> dict[str, Any] | None:
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(self.objects[key].raw)

    async def _store(self, key: Key, body: dict[str, Any], event: str) -> None:
        body["metadata"]["resourceVersion"] = self._next_rv()
        if key in self.objects:
            self.objects[key].history.append(body)
        else:
            self.objects[key] = body
        await self._buses[key[0]].put({"type": event, "object": copy.deepcopy(body)})

    async def _remove(self, key: Key) -> None:
        body = self._live(key)
        if body is None:
            return
        body["metadata"]["resourceVersion"] = self._next_rv()
        self.objects[key].history.append(body)
        self.objects[key].delete()
        await self._buses[key[0]].put({"type": "DELETED", "object": body})
        await self._collect_garbage(body["metadata"]["uid"])

    async def _collect_garbage(self, gone_uid: str) -> None:
        live_uids = {
            obj.raw["metadata"].get("uid") for _, obj in self.objects.items() if not obj.deleted
        }
        for key, obj in list(self.objects.items()):
            if obj.deleted:
                continue
            refs = obj.raw["metadata"].get("ownerReferences") or []
            if not any(r.get("uid") == gone_uid for r in refs):
                continue
            remaining = [r for r in refs if r.get("uid") in live_uids]
            if remaining:
                body = self._live(key)
                assert body is not None
                body["metadata"]["ownerReferences"] = remaining
                await self._store(key, body, "MODIFIED")
            else:
                await self._delete(key)

    async def _delete(self, key: Key) -> dict[str, Any]:
        body = self._live(key)
        if body is None:
            raise kmock.KubernetesObjectNotFoundError()
        if body["metadata"].get("finalizers"):
            if not body["metadata"].get("deletionTimestamp"):
                body["metadata"]["deletionTimestamp"] = _now()
                await self._store(key, body, "MODIFIED")
            return body
        await self._remove(key)
        return body

    # --- request handling ---

    async def _handle(self, request: rendering.Request) -> Any:
        authorization = _header(request, "Authorization")
        call = Call(
            user=authorization.removeprefix("Bearer ") if authorization else "test",
            agent=_header(request, "User-Agent").split("/")[0],
            method=request.method.value,
            path=request.url.path,
            watch=request.params.get("watch", "").lower() in ("true", "1"),
            content_type=_header(request, "Content-Type"),
        )  # fmt: skip
        self.calls.append(call)
        SESSION_CALLS.append(call)
        fault = next((f for f in self.faults if f.matches(call)), None)
        if fault is None:
            return await self._execute(request)
        fault.hits.append(call)
        if fault.mode == "status":
            raise kmock.KubernetesError(status=fault.status, reason=_REASONS.get(fault.status, "InternalError"),
                                        message=f"injected fault: HTTP {fault.status}")
        if fault.mode == "late":
            response = await self._execute(request)
            await asyncio.sleep(fault.delay_s)
            return response
        await fault._released.wait()
        if fault.then == "drop":
            raise kmock.KubernetesError(status=500, reason="InternalError", message="injected fault: dropped")
        return await self._execute(request)

    async def _execute(self, request: rendering.Request) -> Any:
        if request.resource is not None and request.subresource == "scale":
            async with self._lock:
                result = await self._scale(request)
            return await kmock.Response(payload=result)(request)
        if request.resource is None or request.action not in (
            kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE
        ):
            return await super()._handle(request)  # reads: served by the fallbacks below
        async with self._lock:
            if request.action == kmock.action.CREATE:
                result = await self._create(request.resource, request.namespace, request.data)
            elif request.action == kmock.action.DELETE:
                result = await self._delete((request.resource, request.namespace, request.name or ""))
            else:
                result = await self._patch(request)
        return await kmock.Response(payload=result)(request)

    async def _scale(self, request: rendering.Request) -> dict[str, Any]:
        """The /scale subresource of a custom resource, as its CRD's `scale` paths map it (spec.replicas,
        status.replicas, status.selector): read as an autoscaling/v1 Scale; a write changes spec.replicas (and so
        the generation, and the watchers see an update), as kubectl scale or an HPA would."""
        assert request.resource is not None and request.name is not None
        key = (request.resource, request.namespace, request.name)
        current = self._live(key)
        if current is None:
            raise kmock.KubernetesObjectNotFoundError()
        if request.method.value in ("PUT", "PATCH"):
            data = request.data if request.data is not None else json.loads(request.text or "null")
            replicas = ((data or {}).get("spec") or {}).get("replicas")
            if replicas is not None and replicas != current.get("spec", {}).get("replicas"):
                current["spec"]["replicas"] = replicas
                current["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
                await self._store(key, current, "MODIFIED")
        status = current.get("status") or {}
        meta = current["metadata"]
        return {
            "apiVersion": "autoscaling/v1", "kind": "Scale",
            "metadata": {"name": meta["name"], "namespace": meta.get("namespace"), "uid": meta["uid"],
                         "resourceVersion": meta["resourceVersion"]},
            "spec": {"replicas": current.get("spec", {}).get("replicas")},
            "status": {"replicas": status.get("replicas") or 0, "selector": status.get("selector") or ""},
        }  # fmt: skip

    async def _create(self, resource: kmock.resource, namespace: str | None, data: Any) -> dict[str, Any]:
        body = copy.deepcopy(data)
        meta = body.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)
        if namespace is not None:
            meta["namespace"] = namespace
        key = (resource, meta.get("namespace"), meta["name"])
        if self._live(key) is not None:
            raise _conflict(f"{resource.plural} {meta['name']!r} already exists")
        meta.update(uid=str(uuid.uuid4()), generation=1, creationTimestamp=_now())
        if self._has_status_subresource(resource):
            body.pop("status", None)
        await self._store(key, body, "ADDED")
        return body

    async def _patch(self, request: rendering.Request) -> dict[str, Any]:
        assert request.resource is not None and request.name is not None
        key = (request.resource, request.namespace, request.name)
        content_type = request.headers.get("Content-Type", "")
        data = request.data if request.data is not None else json.loads(request.text or "null")
        current = self._live(key)
        if content_type.startswith(_APPLY):
            if current is None:
                return await self._create(request.resource, request.namespace, data)
            new = copy.deepcopy(current)
            for field, value in data.items():
                if field not in ("metadata", "status", "apiVersion", "kind"):
                    new[field] = copy.deepcopy(value)  # the applier owns these fields whole
            for field in ("labels", "annotations", "ownerReferences"):
                if field in data.get("metadata", {}):
                    new["metadata"][field] = copy.deepcopy(data["metadata"][field])
        else:
            if current is None:
                raise kmock.KubernetesObjectNotFoundError()
            expected_rv = (data.get("metadata") or {}).get("resourceVersion") if isinstance(data, dict) else None
            if expected_rv is not None and expected_rv != current["metadata"]["resourceVersion"]:
                raise _conflict(
                    f"the object has been modified; please apply your changes to the latest version "
                    f"(have {current['metadata']['resourceVersion']}, got {expected_rv})"
                )
            if isinstance(data, list):
                new = jsonpatch.apply_patch(current, data, in_place=False)
            else:
                data = copy.deepcopy(data)
                (data.get("metadata") or {}).pop("resourceVersion", None)
                new = merge_patch(current, data)
        if self._has_status_subresource(request.resource):
            if request.subresource == "status":  # only status changes through /status
                new = {**current, "status": new.get("status")} if new.get("status") is not None else {
                    k: v for k, v in current.items() if k != "status"}  # fmt: skip
            elif "status" in current or "status" in new:  # and status does not change through the main resource
                new["status"] = current.get("status")
                if new["status"] is None:
                    del new["status"]
        for immutable in ("uid", "creationTimestamp", "namespace", "name", "generation"):
            if immutable in current["metadata"]:
                new["metadata"][immutable] = current["metadata"][immutable]
        spec_of = lambda b: {k: v for k, v in b.items() if k not in ("metadata", "status")}  # noqa: E731
        if spec_of(new) != spec_of(current):
            new["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        if new == current:
            return current  # a no-op patch does not bump resourceVersion, as on a real server
        await self._store(key, new, "MODIFIED")
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            await self._remove(key)
        return new

    # --- reads with label selectors and a real resourceVersion ---

    def _select(self, request: rendering.Request) -> list[dict[str, Any]]:
        selector = request.params.get("labelSelector")
        out = []
        for (resource, namespace, _name), obj in self.objects.items():
            if obj.deleted or resource != request.resource:
                continue
            if request.namespace is not None and namespace != request.namespace:
                continue
            body = obj.raw
            if request.name is not None and body["metadata"].get("name") != request.name:
                continue
            if selector_matches(body["metadata"].get("labels") or {}, selector):
                out.append(copy.deepcopy(body))
        return out

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        async with self._lock:
            items = self._select(request)
            version = str(self._last_rv)
        return {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": version}, "items": items}

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        yield b""
        selector = request.params.get("labelSelector")
        assert request.resource is not None
        bus = self._buses[request.resource]
        async with self._lock:  # mark the bus and snapshot at one instant: no event falls in between
            marker = await bus.mark()
            since = int(request.params.get("resourceVersion") or 0)
            backlog = [b for b in self._select(request) if int(b["metadata"]["resourceVersion"]) > since]
        try:
            for body in backlog:
                yield {"type": "ADDED", "object": body}
            async for event in bus.stream(since=marker):
                meta = event["object"].get("metadata", {})
                if request.namespace is not None and meta.get("namespace") != request.namespace:
                    continue
                if int(meta.get("resourceVersion") or 0) <= since:
                    continue
                if selector_matches(meta.get("labels") or {}, selector):
                    yield event
        finally:
            await bus.unmark(marker)

    # --- test conveniences ---

    def live(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        return self._live((kmock.resource(resource), namespace, name))

    def all(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        wanted = kmock.resource(resource)
        return [
            copy.deepcopy(obj.raw) for (res, ns, _), obj in self.objects.items()
            if res == wanted and not obj.deleted and (namespace is None or ns == namespace)
        ]  # fmt: skip
