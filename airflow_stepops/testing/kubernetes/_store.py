"""The object store behind the API: resource versions, finalizer-aware deletion and watch fan-out.

All methods run on the emulator's event loop thread; nothing here is thread-safe on its own.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from airflow_stepops.testing.kubernetes._util import (
    JSON,
    ApiError,
    Matcher,
    deep,
    label_matcher,
    new_uid,
    timestamp,
)

_META_FIELDS = frozenset({"metadata.name", "metadata.namespace"})


@dataclass(frozen=True)
class Resource:
    """One REST resource (``jobs`` in ``batch/v1``) and what the API server knows about it."""

    plural: str
    kind: str
    group: str
    version: str
    namespaced: bool = True
    short_names: tuple[str, ...] = ()
    fields: frozenset[str] = _META_FIELDS
    subresources: tuple[str, ...] = ()
    default_propagation: str = "Background"
    verbs: tuple[str, ...] = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def singular(self) -> str:
        return self.kind.lower()

    def not_found(self, name: str) -> ApiError:
        what = f"{self.plural}.{self.group}" if self.group else self.plural
        details = {"name": name, "group": self.group, "kind": self.plural} if self.group else {
            "name": name, "kind": self.plural}
        return ApiError(404, "NotFound", f'{what} "{name}" not found', details)

    def already_exists(self, name: str) -> ApiError:
        what = f"{self.plural}.{self.group}" if self.group else self.plural
        details = {"name": name, "group": self.group, "kind": self.plural} if self.group else {
            "name": name, "kind": self.plural}
        return ApiError(409, "AlreadyExists", f'{what} "{name}" already exists', details)


_POD_FIELDS = _META_FIELDS | {"spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.serviceAccountName",
                              "spec.hostNetwork", "status.phase", "status.podIP", "status.nominatedNodeName"}
_EVENT_FIELDS = _META_FIELDS | {"involvedObject.kind", "involvedObject.namespace", "involvedObject.name",
                                "involvedObject.uid", "involvedObject.apiVersion", "involvedObject.resourceVersion",
                                "involvedObject.fieldPath", "reason", "reportingComponent", "source", "type"}

NAMESPACES = Resource("namespaces", "Namespace", "", "v1", namespaced=False, short_names=("ns",),
                      fields=_META_FIELDS | {"status.phase"}, subresources=("status",))
NODES = Resource("nodes", "Node", "", "v1", namespaced=False, short_names=("no",),
                 fields=_META_FIELDS | {"spec.unschedulable"}, subresources=("status",))
PODS = Resource("pods", "Pod", "", "v1", short_names=("po",), fields=_POD_FIELDS, subresources=("log", "status"))
CONFIGMAPS = Resource("configmaps", "ConfigMap", "", "v1", short_names=("cm",))
SECRETS = Resource("secrets", "Secret", "", "v1", fields=_META_FIELDS | {"type"})
EVENTS = Resource("events", "Event", "", "v1", short_names=("ev",), fields=_EVENT_FIELDS)
SERVICEACCOUNTS = Resource("serviceaccounts", "ServiceAccount", "", "v1", short_names=("sa",))
PVCS = Resource("persistentvolumeclaims", "PersistentVolumeClaim", "", "v1", short_names=("pvc",),
                subresources=("status",))
JOBS = Resource("jobs", "Job", "batch", "v1", fields=_META_FIELDS | {"status.successful"},
                subresources=("status",), default_propagation="Orphan")

RESOURCES: tuple[Resource, ...] = (NAMESPACES, NODES, PODS, CONFIGMAPS, SECRETS, EVENTS, SERVICEACCOUNTS, PVCS, JOBS)


@dataclass
class Event:
    """One change: the object after it (the last state for DELETED) and before it."""

    rv: int
    resource: Resource
    type: str
    obj: JSON
    old: JSON | None


@dataclass(eq=False)
class Watcher:
    """One open watch: events for one resource, optionally one namespace, filtered by selectors."""

    resource: Resource
    namespace: str | None
    labels: Matcher
    fields: Callable[[JSON], bool]
    queue: asyncio.Queue[tuple[str, JSON] | None] = field(default_factory=asyncio.Queue)

    def matches(self, obj: JSON | None) -> bool:
        if obj is None:
            return False
        meta = obj["metadata"]
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        return self.labels(meta.get("labels") or {}) and self.fields(obj)

    def offer(self, event: Event) -> None:
        new, old = self.matches(event.obj), self.matches(event.old)
        if event.type == "MODIFIED" and new != old:
            # Like the API server: an object entering or leaving the selection is ADDED / DELETED.
            self.queue.put_nowait(("ADDED" if new else "DELETED", event.obj))
        elif new:
            self.queue.put_nowait((event.type, event.obj))


class Store:
    """Objects by resource, namespace and name, one resourceVersion counter, bounded event history."""

    def __init__(self, history: int = 10_000) -> None:
        self._objects: dict[str, dict[tuple[str, str], JSON]] = {r.plural: {} for r in RESOURCES}
        self._rv = 0
        self._history: deque[Event] = deque(maxlen=history)
        self._watchers: set[Watcher] = set()
        self._listeners: list[Callable[[Event], None]] = []

    @property
    def resource_version(self) -> str:
        return str(self._rv)

    def subscribe(self, listener: Callable[[Event], None]) -> None:
        self._listeners.append(listener)

    # ----- reads --------------------------------------------------------------------------------

    def peek(self, res: Resource, namespace: str | None, name: str) -> JSON | None:
        """The stored object itself (do not mutate), or None."""
        return self._objects[res.plural].get((namespace or "", name))

    def get(self, res: Resource, namespace: str | None, name: str) -> JSON:
        obj = self.peek(res, namespace, name)
        if obj is None:
            raise res.not_found(name)
        return deep(obj)

    def items(self, res: Resource, namespace: str | None = None) -> Iterator[JSON]:
        """Stored objects (do not mutate), in creation order."""
        for (ns, _), obj in list(self._objects[res.plural].items()):
            if namespace is None or ns == namespace:
                yield obj

    def select(self, res: Resource, namespace: str | None, selector: str | None = None) -> list[JSON]:
        match = label_matcher(selector)
        return [obj for obj in self.items(res, namespace) if match(obj["metadata"].get("labels") or {})]

    def owned_by(self, uid: str) -> list[tuple[Resource, JSON]]:
        found = []
        for res in RESOURCES:
            for obj in self.items(res):
                if any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or []):
                    found.append((res, obj))
        return found

    # ----- writes -------------------------------------------------------------------------------

    def create(self, res: Resource, obj: JSON) -> JSON:
        meta = obj["metadata"]
        namespace = meta.get("namespace", "") if res.namespaced else ""
        if res.namespaced:
            ns_obj = self.peek(NAMESPACES, None, namespace)
            if ns_obj is None:
                raise NAMESPACES.not_found(namespace)
            if ns_obj["metadata"].get("deletionTimestamp"):
                raise ApiError(403, "Forbidden", f"{res.plural} \"{meta['name']}\" is forbidden: unable to create new "
                                                 f"content in namespace {namespace} because it is being terminated")
        key = (namespace, meta["name"])
        if key in self._objects[res.plural]:
            raise res.already_exists(meta["name"])
        meta.setdefault("uid", new_uid())  # admission may have assigned it already
        meta["creationTimestamp"] = timestamp()
        meta.setdefault("generation", 1)
        for stale in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds", "selfLink"):
            meta.pop(stale, None)
        obj["kind"], obj["apiVersion"] = res.kind, res.api_version
        return self._write(res, obj, None, "ADDED")

    def replace(self, res: Resource, obj: JSON) -> JSON:
        """Store a new version; rejects a stale resourceVersion like optimistic concurrency does."""
        meta = obj["metadata"]
        current = self.peek(res, meta.get("namespace"), meta["name"])
        if current is None:
            raise res.not_found(meta["name"])
        sent = meta.get("resourceVersion")
        if sent and sent != current["metadata"]["resourceVersion"]:
            what = f"{res.plural}.{res.group}" if res.group else res.plural
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {what} "{meta["name"]}": the object has '
                                            "been modified; please apply your changes to the latest version and try "
                                            "again", {"name": meta["name"], "group": res.group, "kind": res.plural})
        for fixed in ("uid", "creationTimestamp", "namespace", "name"):
            if fixed in current["metadata"]:
                meta[fixed] = current["metadata"][fixed]
        if current["metadata"].get("deletionTimestamp"):
            meta["deletionTimestamp"] = current["metadata"]["deletionTimestamp"]
            meta["deletionGracePeriodSeconds"] = current["metadata"].get("deletionGracePeriodSeconds", 0)
        if {**obj, "metadata": {**meta, "resourceVersion": current["metadata"]["resourceVersion"]}} == current:
            return deep(current)  # nothing changed: no new resourceVersion, no event
        return self._commit(res, obj, current)

    def mutate(self, res: Resource, namespace: str | None, name: str, change: Callable[[JSON], Any]) -> JSON | None:
        """Apply ``change`` to a copy of the object and store it if anything changed; None if it is gone."""
        current = self.peek(res, namespace, name)
        if current is None:
            return None
        obj = deep(current)
        change(obj)
        if obj == current:
            return deep(current)
        obj["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        return self.replace(res, obj)

    def delete(self, res: Resource, namespace: str | None, name: str, *, grace: int = 0,
               add_finalizers: tuple[str, ...] = ()) -> tuple[JSON, bool]:
        """Mark for deletion; the object goes once it has no finalizers and no grace period left."""
        current = self.peek(res, namespace, name)
        if current is None:
            raise res.not_found(name)
        obj = deep(current)
        meta = obj["metadata"]
        meta.setdefault("deletionTimestamp", timestamp())
        previous = meta.get("deletionGracePeriodSeconds")
        meta["deletionGracePeriodSeconds"] = grace if previous is None else min(previous, grace)
        finalizers = meta.get("finalizers") or []
        meta["finalizers"] = finalizers + [f for f in add_finalizers if f not in finalizers]
        if not meta["finalizers"]:
            del meta["finalizers"]
        if "generation" in meta and current["metadata"].get("deletionTimestamp") is None:
            meta["generation"] += 1
        result = self._commit(res, obj, current)
        return result, self.peek(res, namespace, name) is None

    def _commit(self, res: Resource, obj: JSON, current: JSON) -> JSON:
        meta = obj["metadata"]
        gone = meta.get("deletionTimestamp") and not meta.get("finalizers") and not meta.get(
            "deletionGracePeriodSeconds")
        if gone:
            self._rv += 1
            meta["resourceVersion"] = str(self._rv)
            del self._objects[res.plural][(meta.get("namespace", ""), meta["name"])]
            self._emit(Event(self._rv, res, "DELETED", deep(obj), deep(current)))
            return deep(obj)
        return self._write(res, obj, current, "MODIFIED")

    def _write(self, res: Resource, obj: JSON, old: JSON | None, kind: str) -> JSON:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        key = (obj["metadata"].get("namespace", "") if res.namespaced else "", obj["metadata"]["name"])
        self._objects[res.plural][key] = obj
        snapshot = deep(obj)
        self._emit(Event(self._rv, res, kind, snapshot, deep(old) if old is not None else None))
        return deep(obj)

    # ----- watches ------------------------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        self._history.append(event)
        for watcher in list(self._watchers):
            if watcher.resource is event.resource:
                watcher.offer(event)
        for listener in list(self._listeners):
            listener(event)

    def watch(self, watcher: Watcher, since: str | None) -> None:
        """Register a watcher; replay history after ``since``, or the current objects as ADDED."""
        if since in (None, "", "0"):
            for obj in self.items(watcher.resource, watcher.namespace):
                if watcher.matches(obj):
                    watcher.queue.put_nowait(("ADDED", deep(obj)))
        else:
            try:
                start = int(since)  # type: ignore[arg-type]
            except ValueError:
                raise ApiError(400, "BadRequest", f"invalid resource version: {since}")
            oldest = self._history[0].rv if self._history else self._rv + 1
            if start + 1 < oldest and start < self._rv:
                raise ApiError(410, "Expired", f"too old resource version: {start} ({oldest - 1})")
            for event in self._history:
                if event.rv > start and event.resource is watcher.resource:
                    watcher.offer(event)
        self._watchers.add(watcher)

    def unwatch(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    def close_watches(self) -> None:
        for watcher in list(self._watchers):
            watcher.queue.put_nowait(None)
        self._watchers.clear()
