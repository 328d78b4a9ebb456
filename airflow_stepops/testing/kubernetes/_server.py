"""HTTP front of the emulated API server (aiohttp): REST verbs, watch streams, pod logs, discovery."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from aiohttp import web

from airflow_stepops.testing._kit import take_request_fault
from airflow_stepops.testing.kubernetes._cluster import Cluster
from airflow_stepops.testing.kubernetes._store import JOBS, PODS, RESOURCES, Resource, Watcher
from airflow_stepops.testing.kubernetes._util import (
    JSON,
    ApiError,
    bad_request,
    deep,
    field_matcher,
    invalid,
    json_patch,
    label_matcher,
    merge_patch,
    parse_timestamp,
    strategic_merge_patch,
    timestamp_nano,
    utcnow,
)

KUBERNETES_VERSION = {"major": "1", "minor": "33", "gitVersion": "v1.33.0-stepops-emulator",
                      "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
                      "buildDate": "2025-04-23T00:00:00Z", "goVersion": "go1.24.2", "compiler": "gc",
                      "platform": "linux/amd64"}
_BY_PATH = {(r.group, r.version, r.plural): r for r in RESOURCES}
_TRUE = ("true", "1", "yes")


@dataclass
class ApiFault:
    """Make matching requests fail with ``status``; ``after_commit`` performs them first (a lost reply)."""

    method: str | None = None
    path: str | None = None  # a regular expression searched in the request path
    status: int = 500
    count: int | None = 1
    after_commit: bool = False
    message: str = "emulator: injected API error"
    delay: float = 0.0  # seconds the (real) answer is held: a client that times out first loses the reply
    hits: int = 0

    def matches(self, request: web.Request) -> bool:
        if self.method and request.method != self.method.upper():
            return False
        return self.path is None or re.search(self.path, request.path) is not None

    def error(self) -> web.Response:
        reasons = {409: "Conflict", 429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable",
                   504: "Timeout", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound"}
        body = ApiError(self.status, reasons.get(self.status, "InternalError"), self.message).status()
        headers = {"Retry-After": "1"} if self.status in (429, 503) else {}
        return web.json_response(body, status=self.status, headers=headers)


def _flag(query: Any, name: str) -> bool:
    return str(query.get(name, "")).lower() in _TRUE


def _int(query: Any, name: str) -> int | None:
    value = query.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise bad_request(f"invalid value for {name}: {value!r}")


class ApiServer:
    """Routes requests to the cluster; keeps a request log and the injected API faults."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster, self.store = cluster, cluster.store
        self.requests: deque[dict[str, Any]] = deque(maxlen=100_000)
        self.faults: list[ApiFault] = []
        self.closing = False
        self.address = ""

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        record: dict[str, Any] = {"method": request.method, "path": request.path, "query": dict(request.query), "status": None}
        self.requests.append(record)
        response: web.StreamResponse
        token = self.cluster.config.token
        fault = take_request_fault(self.faults, lambda f: f.matches(request), "count")
        if token and request.headers.get("Authorization") != f"Bearer {token}" and request.path not in (
                "/healthz", "/livez", "/readyz"):
            response = web.json_response(ApiError(401, "Unauthorized", "Unauthorized").status(), status=401)
        elif fault is not None and not fault.after_commit and not fault.delay:
            response = fault.error()
        else:
            try:
                response = await handler(request)
            except ApiError as exc:
                response = web.json_response(exc.status(), status=exc.code)
            if fault is not None and fault.after_commit and not response.prepared:
                response = fault.error()
            if fault is not None and fault.delay:
                await asyncio.sleep(fault.delay)
        record["status"] = response.status
        return response

    # ----- routing ----------------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        if request.method == "GET":
            simple = self._discovery(parts)
            if simple is not None:
                return simple
        if len(parts) >= 3 and parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        elif len(parts) >= 4 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return self._not_found()
        namespace: str | None = None
        if rest[0] == "namespaces" and len(rest) >= 3 and (group, version, rest[2]) in _BY_PATH:
            namespace, res, tail = rest[1], _BY_PATH[(group, version, rest[2])], rest[3:]
        elif (group, version, rest[0]) in _BY_PATH:
            res, tail = _BY_PATH[(group, version, rest[0])], rest[1:]
        else:
            return self._not_found()
        if not res.namespaced and namespace is not None:
            return self._not_found()
        if len(tail) > 2 or (res.namespaced and namespace is None and tail):
            return self._not_found()
        name = tail[0] if tail else None
        sub = tail[1] if len(tail) > 1 else None
        if sub is not None and sub not in res.subresources:
            return self._not_found()
        if name is None:
            return await self._collection(request, res, namespace)
        if sub == "log":
            return await self._log(request, namespace or "", name)
        return await self._item(request, res, namespace, name, sub)

    def _not_found(self) -> web.Response:
        body = ApiError(404, "NotFound", "the server could not find the requested resource").status()
        body["details"] = {}
        return web.json_response(body, status=404)

    def _discovery(self, parts: list[str]) -> web.StreamResponse | None:
        if parts in (["healthz"], ["livez"], ["readyz"]):
            return web.Response(text="ok")
        if parts == ["version"]:
            return web.json_response(KUBERNETES_VERSION)
        if parts == ["api"]:
            return web.json_response({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": self.address}]})
        groups = sorted({r.group for r in RESOURCES if r.group})
        group_docs = {g: {"name": g, "versions": [{"groupVersion": f"{g}/v1", "version": "v1"}],
                          "preferredVersion": {"groupVersion": f"{g}/v1", "version": "v1"}} for g in groups}
        if parts == ["apis"]:
            return web.json_response({"kind": "APIGroupList", "apiVersion": "v1",
                                      "groups": [group_docs[g] for g in groups]})
        if len(parts) == 2 and parts[0] == "apis" and parts[1] in group_docs:
            return web.json_response({"kind": "APIGroup", "apiVersion": "v1", **group_docs[parts[1]]})
        if parts == ["api", "v1"] or (len(parts) == 3 and parts[0] == "apis" and parts[1] in group_docs
                                      and parts[2] == "v1"):
            group = "" if parts[0] == "api" else parts[1]
            return web.json_response(self._resource_list(group))
        return None

    def _resource_list(self, group: str) -> JSON:
        resources = []
        for res in RESOURCES:
            if res.group != group:
                continue
            entry = {"name": res.plural, "singularName": res.singular, "namespaced": res.namespaced,
                     "kind": res.kind, "verbs": list(res.verbs)}
            if res.short_names:
                entry["shortNames"] = list(res.short_names)
            resources.append(entry)
            for sub in res.subresources:
                verbs = ["get"] if sub == "log" else ["get", "patch", "update"]
                resources.append({"name": f"{res.plural}/{sub}", "singularName": "", "namespaced": res.namespaced,
                                  "kind": res.kind, "verbs": verbs})
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{group}/v1" if group else "v1",
                "resources": resources}

    # ----- collections ------------------------------------------------------------------------------

    async def _collection(self, request: web.Request, res: Resource, namespace: str | None) -> web.StreamResponse:
        query = request.query
        if request.method == "GET":
            if _flag(query, "watch"):
                return await self._watch(request, res, namespace)
            return web.json_response(self._list(res, namespace, query))
        if request.method == "POST":
            if res.namespaced and namespace is None:
                return self._not_found()
            body = await self._body(request)
            created = self.cluster.create(res, namespace, body, dry_run=bool(query.get("dryRun")))
            return web.json_response(created, status=201)
        if request.method == "DELETE":
            if res.namespaced and namespace is None:
                return self._not_found()
            options = await self._delete_options(request)
            listed = self._list(res, namespace, query)
            for item in listed["items"]:
                with contextlib.suppress(ApiError):
                    self.cluster.delete(res, namespace, item["metadata"]["name"], **options)
            return web.json_response(listed)
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    def _selected(self, res: Resource, namespace: str | None, query: Any) -> list[JSON]:
        labels = label_matcher(query.get("labelSelector"))
        fields = field_matcher(query.get("fieldSelector"), res.fields)
        items = [o for o in self.store.items(res, namespace)
                 if labels(o["metadata"].get("labels") or {}) and fields(o)]
        return sorted(items, key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))

    def _list(self, res: Resource, namespace: str | None, query: Any) -> JSON:
        items = self._selected(res, namespace, query)
        meta: JSON = {"resourceVersion": self.store.resource_version}
        limit, start = _int(query, "limit") or 0, 0
        if query.get("continue"):
            try:
                token = json.loads(base64.b64decode(query["continue"]))
                start, meta["resourceVersion"] = int(token["start"]), token["rv"]
            except (ValueError, KeyError, TypeError):
                raise bad_request("continue key is not valid")
        if limit > 0:
            rest = items[start + limit:]
            items = items[start:start + limit]
            if rest:
                meta["continue"] = base64.b64encode(json.dumps(
                    {"start": start + limit, "rv": meta["resourceVersion"]}).encode()).decode()
                meta["remainingItemCount"] = len(rest)
        else:
            items = items[start:]
        listed = []
        for obj in items:
            item = deep(obj)
            item.pop("kind", None)
            item.pop("apiVersion", None)
            listed.append(item)
        return {"kind": f"{res.kind}List", "apiVersion": res.api_version, "metadata": meta, "items": listed}

    async def _watch(self, request: web.Request, res: Resource, namespace: str | None) -> web.StreamResponse:
        query = request.query
        watcher = Watcher(res, namespace, label_matcher(query.get("labelSelector")),
                          field_matcher(query.get("fieldSelector"), res.fields))
        since = query.get("resourceVersion")
        if _flag(query, "sendInitialEvents"):
            since = None
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        try:
            self.store.watch(watcher, since)
        except ApiError as exc:
            if exc.code != 410:
                raise
            await response.prepare(request)
            await response.write(json.dumps({"type": "ERROR", "object": exc.status()}).encode() + b"\n")
            await response.write_eof()
            return response
        timeout = _int(query, "timeoutSeconds")
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        bookmarks = _flag(query, "allowWatchBookmarks")
        try:
            await response.prepare(request)
            if _flag(query, "sendInitialEvents"):
                while not watcher.queue.empty():
                    await self._send(response, watcher.queue.get_nowait())
                await self._bookmark(response, res, initial_end=True)
            while not self.closing:
                wait = 3600.0 if deadline is None else deadline - loop.time()
                if wait <= 0:
                    break
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), wait)
                except asyncio.TimeoutError:
                    break
                if item is None:
                    break
                await self._send(response, item)
            if bookmarks and not self.closing:
                await self._bookmark(response, res)
            await response.write_eof()
        except ConnectionResetError:
            pass
        finally:
            self.store.unwatch(watcher)
        return response

    async def _send(self, response: web.StreamResponse, item: tuple[str, JSON] | None) -> None:
        if item is not None:
            await response.write(json.dumps({"type": item[0], "object": item[1]}).encode() + b"\n")

    async def _bookmark(self, response: web.StreamResponse, res: Resource, *, initial_end: bool = False) -> None:
        meta: JSON = {"resourceVersion": self.store.resource_version}
        if initial_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        obj = {"kind": res.kind, "apiVersion": res.api_version, "metadata": meta}
        await response.write(json.dumps({"type": "BOOKMARK", "object": obj}).encode() + b"\n")

    # ----- single objects ---------------------------------------------------------------------------

    async def _item(self, request: web.Request, res: Resource, namespace: str | None, name: str,
                    sub: str | None) -> web.StreamResponse:
        method, query = request.method, request.query
        if method == "GET":
            return web.json_response(self.store.get(res, namespace, name))
        if method == "DELETE" and sub is None:
            options, orphan_false = await self._item_delete_options(request)
            obj, gone = self.cluster.delete(res, namespace, name, **options)
            if gone and res is not PODS:
                details = {"name": name, "group": res.group, "kind": res.plural, "uid": obj["metadata"]["uid"]}
                return web.json_response({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                                          "details": details})
            accepted = not gone and orphan_false
            return web.json_response(obj, status=202 if accepted else 200)
        if method in ("PUT", "PATCH"):
            current = self.store.peek(res, namespace, name)
            if method == "PATCH":
                if current is None and "apply-patch" in request.content_type:
                    body = await self._body(request)
                    return web.json_response(self.cluster.create(res, namespace, body), status=201)
                if current is None:
                    raise res.not_found(name)
                updated = self._patched(res, current, await self._patch_body(request), request.content_type)
            else:
                if current is None:
                    raise res.not_found(name)
                updated = await self._body(request)
                if not isinstance(updated, dict):
                    raise bad_request("the body of the request was in an unknown format")
                updated.setdefault("metadata", {})
                if (updated["metadata"].get("name") or name) != name:
                    raise bad_request("the name of the object does not match the name on the URL")
            if query.get("dryRun"):
                return web.json_response(updated)
            return web.json_response(self._update(res, current, updated, status_only=sub == "status"))
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    def _patched(self, res: Resource, current: JSON, patch: Any, content_type: str) -> JSON:
        base = deep(current)
        base["metadata"].pop("resourceVersion", None)
        if content_type == "application/json-patch+json":
            if not isinstance(patch, list):
                raise bad_request("json: cannot unmarshal object into Go value of type jsonpatch.Patch")
            base["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            result = json_patch(base, patch)
            if result["metadata"].get("resourceVersion") == current["metadata"]["resourceVersion"]:
                result["metadata"].pop("resourceVersion")
            return result
        if not isinstance(patch, dict):
            raise bad_request("the body of the request was in an unknown format")
        if content_type == "application/merge-patch+json":
            return merge_patch(base, patch)
        if content_type in ("application/strategic-merge-patch+json", "application/apply-patch+yaml"):
            return strategic_merge_patch(base, patch)
        raise ApiError(415, "UnsupportedMediaType", 'the body of the request was in an unknown format - accepted '
                                                    'media types include: application/json-patch+json, '
                                                    'application/merge-patch+json, '
                                                    'application/strategic-merge-patch+json')

    def _update(self, res: Resource, current: JSON, updated: JSON, *, status_only: bool) -> JSON:
        """PUT/PATCH semantics: the status subresource changes only status; the main resource keeps it."""
        meta = updated.setdefault("metadata", {})
        name = current["metadata"]["name"]
        if status_only:
            new = deep(current)
            new["status"] = updated.get("status", current.get("status"))
            new["metadata"]["resourceVersion"] = meta.get("resourceVersion") or current["metadata"]["resourceVersion"]
            return self.store.replace(res, new)
        if "status" in current:
            updated["status"] = deep(current["status"])
        updated["kind"], updated["apiVersion"] = res.kind, res.api_version
        if res is JOBS:
            for key in ("selector", "template", "completions", "completionMode", "podFailurePolicy"):
                if updated.get("spec", {}).get(key) != current["spec"].get(key) and key in current["spec"]:
                    raise invalid("Job", "batch", name, [(f"spec.{key}", "Invalid value: field is immutable")])
        if res is PODS:
            mutable = ("activeDeadlineSeconds", "tolerations")
            old = {k: v for k, v in current["spec"].items() if k not in mutable}
            new = {k: v for k, v in (updated.get("spec") or {}).items() if k not in mutable}
            for spec in (old, new):
                spec["containers"] = [{k: v for k, v in c.items() if k != "image"} for c in spec.get("containers", [])]
            if old != new:
                raise invalid("Pod", "", name, [("spec", "Forbidden: pod updates may not change fields other than "
                                                         "`spec.containers[*].image`, `spec.activeDeadlineSeconds` "
                                                         "or `spec.tolerations` (only additions to existing "
                                                         "tolerations)")])
        if updated.get("spec") != current.get("spec") and "generation" in current["metadata"]:
            meta["generation"] = current["metadata"]["generation"] + 1
        if not meta.get("resourceVersion"):
            meta["resourceVersion"] = current["metadata"]["resourceVersion"]
        return self.store.replace(res, updated)

    async def _raw_json(self, request: web.Request) -> Any:
        if not request.can_read_body:
            return None
        text = await request.text()
        if not text.strip():
            return None
        try:
            return json.loads(text)
        except ValueError:
            raise bad_request("the body of the request was in an unknown format")

    async def _body(self, request: web.Request) -> Any:
        if "yaml" in request.content_type:
            import yaml

            return yaml.safe_load(await request.text())
        body = await self._raw_json(request)
        if body is None:
            raise bad_request("the body of the request was in an unknown format")
        return body

    async def _patch_body(self, request: web.Request) -> Any:
        return await self._body(request)

    async def _delete_options(self, request: web.Request) -> dict[str, Any]:
        body = await self._raw_json(request) or {}
        query = request.query
        propagation = query.get("propagationPolicy") or body.get("propagationPolicy")
        orphan = query.get("orphanDependents", body.get("orphanDependents"))
        if propagation is None and orphan is not None:
            propagation = "Orphan" if str(orphan).lower() in _TRUE else "Background"
        grace = _int(query, "gracePeriodSeconds")
        if grace is None and body.get("gracePeriodSeconds") is not None:
            grace = int(body["gracePeriodSeconds"])
        return {"propagation": propagation, "grace": grace, "preconditions": body.get("preconditions"),
                "dry_run": bool(query.get("dryRun") or body.get("dryRun"))}

    async def _item_delete_options(self, request: web.Request) -> tuple[dict[str, Any], bool]:
        """Options plus whether ``orphanDependents: false`` was sent (the API then answers 202)."""
        body = await self._raw_json(request) or {}
        orphan = request.query.get("orphanDependents", body.get("orphanDependents"))
        return await self._delete_options(request), orphan is not None and str(orphan).lower() not in _TRUE

    # ----- pod logs ---------------------------------------------------------------------------------

    async def _log(self, request: web.Request, namespace: str, name: str) -> web.StreamResponse:
        if request.method != "GET":
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        query = request.query
        pod = self.store.get(PODS, namespace, name)
        mains = [c["name"] for c in pod["spec"].get("containers") or []]
        inits = [c["name"] for c in pod["spec"].get("initContainers") or []]
        container = query.get("container")
        if not container:
            if len(mains) != 1:
                extra = f" or one of the init containers: [{' '.join(inits)}]" if inits else ""
                raise bad_request(f"a container name must be specified for pod {name}, choose one of: "
                                  f"[{' '.join(mains)}]{extra}")
            container = mains[0]
        if container not in mains + inits:
            raise bad_request(f"container {container} is not valid for pod {name}")
        if not pod["spec"].get("nodeName"):
            raise bad_request(f"pod {name} does not have a host assigned")
        runtime = self.cluster.kubelet.runtimes.get(pod["metadata"]["uid"])
        runs = runtime.runs.get(container, []) if runtime else []
        previous = _flag(query, "previous")
        run = (runs[-2] if len(runs) > 1 else None) if previous else (runs[-1] if runs else None)
        if run is None:
            if previous:
                raise bad_request(f'previous terminated container "{container}" in pod "{name}" not found')
            statuses = (pod["status"].get("containerStatuses") or []) + (pod["status"].get(
                "initContainerStatuses") or [])
            waiting = next((s["state"].get("waiting") for s in statuses if s["name"] == container), None) or {}
            reason = waiting.get("reason", "ContainerCreating")
            if reason in ("ErrImagePull", "ImagePullBackOff"):
                reason = "trying and failing to pull image"
            raise bad_request(f'container "{container}" in pod "{name}" is waiting to start: {reason}')
        lines = list(run.logs.lines)  # the current log file only: rotated files are not served
        cutoff = None
        if _int(query, "sinceSeconds") is not None:
            cutoff = utcnow() - timedelta(seconds=_int(query, "sinceSeconds") or 0)
        elif query.get("sinceTime"):
            cutoff = parse_timestamp(query["sinceTime"])
        stamps, limit = _flag(query, "timestamps"), _int(query, "limitBytes")
        tail = _int(query, "tailLines")

        def render(batch: list[tuple[Any, bytes]]) -> bytes:
            kept = [(when, line) for when, line in batch if cutoff is None or when >= cutoff]
            return b"".join((timestamp_nano(when).encode() + b" " if stamps else b"") + line for when, line in kept)

        first = lines[-tail:] if tail is not None and tail >= 0 else lines
        if tail == 0:
            first = []
        data = render(first)
        if limit is not None:
            data = data[:limit]
        if not _flag(query, "follow"):
            return web.Response(body=data, content_type="text/plain", charset="utf-8")
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        sent, seen, disconnects = len(data), run.logs.base + len(lines), run.logs.disconnects
        try:
            await response.prepare(request)
            if data:
                await response.write(data)
            while not self.closing and (limit is None or sent < limit):
                await run.logs.wait(seen, timeout=0.5)
                if run.logs.disconnects != disconnects:
                    break
                fresh = run.logs.since(seen)
                seen = run.logs.end
                chunk = render(fresh)
                if limit is not None:
                    chunk = chunk[:limit - sent]
                if chunk:
                    await response.write(chunk)
                    sent += len(chunk)
                if run.logs.closed and seen >= run.logs.end:
                    break
            await response.write_eof()
        except ConnectionResetError:
            pass
        return response
