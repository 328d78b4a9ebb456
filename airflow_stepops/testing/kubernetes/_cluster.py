"""The control plane without HTTP: create and delete with API semantics, events, garbage collection.

The server, the Job controller and the kubelet all go through here, so a pod deleted by the Job
controller dies exactly like one deleted by a client.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from airflow_stepops.testing.kubernetes._admission import prepare
from airflow_stepops.testing.kubernetes._config import EmulatorConfig
from airflow_stepops.testing.kubernetes._faults import FaultRule
from airflow_stepops.testing.kubernetes._store import (
    EVENTS,
    NAMESPACES,
    NODES,
    PODS,
    RESOURCES,
    SERVICEACCOUNTS,
    Event,
    Resource,
    Store,
)
from airflow_stepops.testing.kubernetes._util import JSON, ApiError, bad_request, deep, timestamp

if TYPE_CHECKING:
    from airflow_stepops.testing.kubernetes._jobs import JobController
    from airflow_stepops.testing.kubernetes._kubelet import Kubelet

_GC_FINALIZERS = ("foregroundDeletion", "orphan")
_PROPAGATION = {"Foreground": ("foregroundDeletion",), "Orphan": ("orphan",), "Background": ()}


class Cluster:
    """Store + config + the controllers, wired on one event loop."""

    def __init__(self, store: Store, config: EmulatorConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.store, self.config, self.loop = store, config, loop
        self.fault_rules: list[FaultRule] = []
        self.kubelet: Kubelet
        self.jobs: JobController
        self._changed = asyncio.Event()
        self._event_clock = 0
        self._event_index: dict[tuple[str, str, str], str] = {}  # (uid, reason, message) -> Event name
        store.subscribe(self._on_event)

    def bootstrap(self) -> None:
        for name in dict.fromkeys(("default", "kube-system", "kube-public", "kube-node-lease", *self.config.namespaces)):
            self.create(NAMESPACES, None, {"metadata": {"name": name}})
        self.store.create(NODES, self.config.node.to_object())

    # ----- API verbs ----------------------------------------------------------------------------

    def create(self, res: Resource, namespace: str | None, body: Any, *, dry_run: bool = False) -> JSON:
        obj = prepare(self.store, res, deep(body), namespace, default_grace=self.config.default_grace_period)
        if dry_run:
            if self.store.peek(res, namespace, obj["metadata"]["name"]) is not None:
                raise res.already_exists(obj["metadata"]["name"])
            obj.update(kind=res.kind, apiVersion=res.api_version)
            return obj
        created = self.store.create(res, obj)
        if res is NAMESPACES:
            self.store.create(SERVICEACCOUNTS, {"metadata": {"name": "default", "namespace": obj["metadata"]["name"]}})
        return created

    def delete(self, res: Resource, namespace: str | None, name: str, *, propagation: str | None = None,
               grace: int | None = None, preconditions: JSON | None = None, dry_run: bool = False) -> tuple[JSON, bool]:
        """Delete with API semantics; returns the object and whether it is gone already."""
        current = self.store.peek(res, namespace, name)
        if current is None:
            raise res.not_found(name)
        meta = current["metadata"]
        for key in ("uid", "resourceVersion"):
            wanted = (preconditions or {}).get(key)
            if wanted and wanted != meta.get(key):
                raise ApiError(409, "Conflict", f"Precondition failed: {key.replace('resourceVersion', 'ResourceVersion').replace('uid', 'UID')} "
                                                f"in precondition: {wanted}, {key} in object meta: {meta.get(key)}")
        propagation = propagation or res.default_propagation
        if propagation not in _PROPAGATION:
            raise bad_request(f"unsupported propagationPolicy {propagation!r}: use Foreground, Background or Orphan")
        if dry_run:
            return deep(current), False
        if res is PODS:
            grace = self.kubelet.grace_for_delete(current, grace)
        if res is NAMESPACES:
            self._empty_namespace(name)
        obj, gone = self.store.delete(res, namespace, name, grace=grace or 0,
                                      add_finalizers=_PROPAGATION[propagation])
        return obj, gone

    def _empty_namespace(self, namespace: str) -> None:
        for res in RESOURCES:
            if res.namespaced:
                for obj in list(self.store.items(res, namespace)):
                    if not obj["metadata"].get("deletionTimestamp"):
                        self.delete(res, namespace, obj["metadata"]["name"], propagation="Background")

    def record_event(self, involved: JSON, reason: str, message: str, *, warning: bool = False,
                     component: str = "kubelet") -> None:
        """A core/v1 Event about an object, counted up when the same reason and message repeat."""
        meta = involved["metadata"]
        namespace = meta.get("namespace") or "default"
        key = (meta.get("uid", ""), reason, message)
        existing = self._event_index.get(key)
        if existing is not None and self.store.peek(EVENTS, namespace, existing) is not None:
            def bump(event: JSON) -> None:
                event["count"] = event.get("count", 1) + 1
                event["lastTimestamp"] = timestamp()
            self.store.mutate(EVENTS, namespace, existing, bump)
            return
        now = timestamp()
        host = self.config.node.name if component == "kubelet" else None
        self._event_clock = max(time.time_ns(), self._event_clock + 1)  # names sort in time order, as real ones do
        self._event_index[key] = f"{meta['name']}.{self._event_clock:x}"
        self.store.create(EVENTS, {
            "metadata": {"name": self._event_index[key], "namespace": namespace},
            "involvedObject": {"kind": involved.get("kind"), "namespace": meta.get("namespace"),
                               "name": meta["name"], "uid": meta.get("uid"), "apiVersion": involved.get("apiVersion"),
                               "resourceVersion": meta.get("resourceVersion")},
            "reason": reason, "message": message, "type": "Warning" if warning else "Normal",
            "source": {"component": component, **({"host": host} if host else {})},
            "firstTimestamp": now, "lastTimestamp": now, "count": 1, "eventTime": None,
            "reportingComponent": component, "reportingInstance": host or "",
        })

    # ----- change notification and garbage collection -------------------------------------------

    async def changed(self, timeout: float, stop: asyncio.Event) -> None:
        """Wait until something that could make a pending pod schedulable happened, ``stop`` or ``timeout``."""
        waiters = {asyncio.ensure_future(self._changed.wait()), asyncio.ensure_future(stop.wait())}
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    def _on_event(self, event: Event) -> None:
        if event.resource is EVENTS:
            return
        self._changed.set()
        self._changed = asyncio.Event()
        meta = event.obj["metadata"]
        if event.type == "DELETED":
            self.loop.call_soon(self._collect_dependents, meta["uid"])
            for ref in meta.get("ownerReferences") or []:
                self.loop.call_soon(self._process_owner, ref["uid"])
        elif meta.get("deletionTimestamp") and set(meta.get("finalizers") or ()) & set(_GC_FINALIZERS):
            self.loop.call_soon(self._process_owner, meta["uid"])

    def _find_uid(self, uid: str) -> tuple[Resource, JSON] | None:
        for res in RESOURCES:
            for obj in self.store.items(res):
                if obj["metadata"]["uid"] == uid:
                    return res, obj
        return None

    def _collect_dependents(self, uid: str) -> None:
        """Background propagation: dependents whose owner is gone are deleted."""
        for res, obj in self.store.owned_by(uid):
            meta = obj["metadata"]
            owners = [ref["uid"] for ref in meta.get("ownerReferences") or []]
            if any(self._find_uid(owner) for owner in owners if owner != uid) or meta.get("deletionTimestamp"):
                continue
            self.delete(res, meta.get("namespace"), meta["name"], propagation="Background")

    def _process_owner(self, uid: str) -> None:
        """Foreground: delete dependents, release the owner when none is left. Orphan: cut the references."""
        found = self._find_uid(uid)
        if found is None:
            return
        res, owner = found
        meta = owner["metadata"]
        if not meta.get("deletionTimestamp"):
            return
        finalizers = meta.get("finalizers") or []
        dependents = self.store.owned_by(uid)
        if "orphan" in finalizers:
            for dep_res, dep in dependents:
                self.store.mutate(dep_res, dep["metadata"].get("namespace"), dep["metadata"]["name"],
                                  lambda o: _drop_owner(o, uid))
            dependents = []
            self._drop_finalizer(res, owner, "orphan")
        if "foregroundDeletion" in finalizers:
            for dep_res, dep in dependents:
                if not dep["metadata"].get("deletionTimestamp"):
                    self.delete(dep_res, dep["metadata"].get("namespace"), dep["metadata"]["name"],
                                propagation="Background")
            if not self.store.owned_by(uid):
                self._drop_finalizer(res, owner, "foregroundDeletion")

    def _drop_finalizer(self, res: Resource, obj: JSON, finalizer: str) -> None:
        def drop(o: JSON) -> None:
            o["metadata"]["finalizers"] = [f for f in o["metadata"].get("finalizers") or [] if f != finalizer]
            if not o["metadata"]["finalizers"]:
                del o["metadata"]["finalizers"]
        self.store.mutate(res, obj["metadata"].get("namespace"), obj["metadata"]["name"], drop)


def _drop_owner(obj: JSON, uid: str) -> None:
    refs = [ref for ref in obj["metadata"].get("ownerReferences") or [] if ref.get("uid") != uid]
    if refs:
        obj["metadata"]["ownerReferences"] = refs
    else:
        obj["metadata"].pop("ownerReferences", None)
