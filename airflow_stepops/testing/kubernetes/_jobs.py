"""The Job controller (NonIndexed Jobs) and the TTL-after-finished controller.

Level-triggered like the real one: every change to a Job or its pods re-runs ``reconcile``, which
counts finished pods (through the ``batch.kubernetes.io/job-tracking`` finalizer), applies
``podFailurePolicy``, ``backoffLimit`` and ``activeDeadlineSeconds``, creates or deletes pods and
writes the status with the conditions of Kubernetes 1.31+ (SuccessCriteriaMet/FailureTarget first,
Complete/Failed once no pod is left running).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from airflow_stepops.testing.kubernetes._admission import FINALIZER_JOB_TRACKING
from airflow_stepops.testing.kubernetes._cluster import Cluster
from airflow_stepops.testing.kubernetes._kubelet import TERMINAL
from airflow_stepops.testing.kubernetes._store import JOBS, PODS, Event
from airflow_stepops.testing.kubernetes._util import (
    JSON,
    ApiError,
    deep,
    parse_timestamp,
    selector_from_match,
    timestamp,
    utcnow,
)


@dataclass
class _JobState:
    counted: set[str] = field(default_factory=set)
    failure: tuple[str, str] | None = None
    next_pod_at: float = 0.0
    not_failures: set[str] = field(default_factory=set)
    started: float | None = None  # loop time of startTime, which the API only keeps to the second  # pods the controller itself stopped (suspend, done)


def _controller_uid(obj: JSON) -> str | None:
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == "Job":
            return ref.get("uid")
    return None


def _has_condition(job: JSON, kind: str) -> bool:
    return any(c["type"] == kind and c["status"] == "True" for c in job["status"].get("conditions") or [])


def _set_condition(status: JSON, kind: str, reason: str, message: str, value: bool = True) -> None:
    conditions = status.setdefault("conditions", [])
    now, wanted = timestamp(), "True" if value else "False"
    for existing in conditions:
        if existing["type"] == kind:
            if existing["status"] != wanted:
                existing.update(status=wanted, reason=reason, message=message, lastProbeTime=now,
                                lastTransitionTime=now)
            return
    if value:
        conditions.append({"type": kind, "status": wanted, "reason": reason, "message": message,
                           "lastProbeTime": now, "lastTransitionTime": now})


class JobController:
    """Reconciles every Job on the event loop; ``enqueue`` coalesces repeated triggers."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster, self.store, self.config = cluster, cluster.store, cluster.config
        self._states: dict[str, _JobState] = {}
        self._queued: set[tuple[str, str]] = set()
        self.store.subscribe(self._on_event)

    def _on_event(self, event: Event) -> None:
        meta = event.obj["metadata"]
        if event.resource is JOBS:
            if event.type == "DELETED":
                self._states.pop(meta["uid"], None)
            self.enqueue(meta["namespace"], meta["name"])
        elif event.resource is PODS:
            job_name = (meta.get("labels") or {}).get("batch.kubernetes.io/job-name")
            if job_name:
                self.enqueue(meta["namespace"], job_name)
            if FINALIZER_JOB_TRACKING in (meta.get("finalizers") or ()):
                self.cluster.loop.call_soon(self._release_orphan, meta["namespace"], meta["name"])

    def enqueue(self, namespace: str, name: str, delay: float = 0.0) -> None:
        key = (namespace, name)
        if delay > 0:
            self.cluster.loop.call_later(delay, self.enqueue, namespace, name)
        elif key not in self._queued:
            self._queued.add(key)
            self.cluster.loop.call_soon(self._run, key)

    def _run(self, key: tuple[str, str]) -> None:
        self._queued.discard(key)
        job = self.store.peek(JOBS, *key)
        if job is not None:
            self.reconcile(job)

    # ----- pods -------------------------------------------------------------------------------------

    def _release_orphan(self, namespace: str, name: str) -> None:
        """Pods whose Job is gone or being deleted lose the tracking finalizer once they stop."""
        pod = self.store.peek(PODS, namespace, name)
        if pod is None or FINALIZER_JOB_TRACKING not in (pod["metadata"].get("finalizers") or ()):
            return
        uid = (pod["metadata"].get("labels") or {}).get("batch.kubernetes.io/controller-uid")
        job = self.store.peek(JOBS, namespace, (pod["metadata"].get("labels") or {}).get(
            "batch.kubernetes.io/job-name", ""))
        alive = job is not None and job["metadata"]["uid"] == uid and not job["metadata"].get("deletionTimestamp")
        stopped = pod["status"].get("phase") in TERMINAL or pod["metadata"].get("deletionGracePeriodSeconds") == 0
        if not alive and stopped:
            self._drop_tracking(pod)

    def _drop_tracking(self, pod: JSON) -> None:
        def drop(obj: JSON) -> None:
            rest = [f for f in obj["metadata"].get("finalizers") or [] if f != FINALIZER_JOB_TRACKING]
            if rest:
                obj["metadata"]["finalizers"] = rest
            else:
                obj["metadata"].pop("finalizers", None)
        self.store.mutate(PODS, pod["metadata"]["namespace"], pod["metadata"]["name"], drop)

    def _create_pod(self, job: JSON) -> JSON | None:
        meta, template = job["metadata"], deep(job["spec"]["template"])
        pod_meta = template.get("metadata") or {}
        pod_meta.update(generateName=f"{meta['name']}-", namespace=meta["namespace"],
                        finalizers=[FINALIZER_JOB_TRACKING],
                        ownerReferences=[{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"],
                                          "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}])
        pod_meta.pop("name", None)
        try:
            pod = self.cluster.create(PODS, meta["namespace"], {"metadata": pod_meta, "spec": template["spec"]})
        except ApiError as exc:
            self.cluster.record_event(job, "FailedCreate", f'Error creating: {exc.message}', warning=True,
                                      component="job-controller")
            self.enqueue(meta["namespace"], meta["name"], delay=1.0)
            return None
        self.cluster.record_event(job, "SuccessfulCreate", f"Created pod: {pod['metadata']['name']}",
                                  component="job-controller")
        return pod

    def _delete_pods(self, job: JSON, pods: list[JSON], spare: set[str] | None = None) -> None:
        """Delete pods; those listed in ``spare`` will not count as failed once they stop."""
        for pod in pods:
            if pod["metadata"].get("deletionTimestamp"):
                continue
            if spare is not None:
                spare.add(pod["metadata"]["uid"])
            with contextlib.suppress(ApiError):
                self.cluster.delete(PODS, pod["metadata"]["namespace"], pod["metadata"]["name"])
                self.cluster.record_event(job, "SuccessfulDelete", f"Deleted pod: {pod['metadata']['name']}",
                                          component="job-controller")

    # ----- reconcile --------------------------------------------------------------------------------

    def reconcile(self, job: JSON) -> None:
        meta, spec = job["metadata"], job["spec"]
        state = self._states.setdefault(meta["uid"], _JobState())
        select = selector_from_match(spec.get("selector"))
        pods = [p for p in self.store.items(PODS, meta["namespace"])
                if _controller_uid(p) == meta["uid"] and select(p["metadata"].get("labels") or {})]
        status = deep(job["status"])
        status.setdefault("succeeded", 0)
        status.setdefault("failed", 0)
        for pod in pods:
            self._count(job, pod, state, status)
        if meta.get("deletionTimestamp"):
            for pod in pods:
                if pod["status"].get("phase") in TERMINAL or pod["metadata"].get("deletionGracePeriodSeconds") == 0:
                    self._drop_tracking(pod)
            return
        active = [p for p in pods if p["status"].get("phase") not in TERMINAL and not p["metadata"].get(
            "deletionTimestamp")]
        terminating = [p for p in pods if p["status"].get("phase") not in TERMINAL and p["metadata"].get(
            "deletionTimestamp")]
        finished = _has_condition(job, "Complete") or _has_condition(job, "Failed")
        loop, now = self.cluster.loop, utcnow()
        if not finished:
            if spec.get("suspend"):
                self._delete_pods(job, active, state.not_failures)
                terminating, active = terminating + active, []
                _set_condition(status, "Suspended", "JobSuspended", "Job suspended")
                status.pop("startTime", None)
                state.started = None
            else:
                if any(c["type"] == "Suspended" for c in status.get("conditions") or []):
                    _set_condition(status, "Suspended", "JobResumed", "Job resumed", value=False)
                if "startTime" not in status:
                    status["startTime"], state.started = timestamp(now), loop.time()
            restarts = sum(s.get("restartCount", 0) for p in active
                           for s in p["status"].get("containerStatuses") or [])
            if state.failure is None and status["failed"] + restarts > spec.get("backoffLimit", 6):
                state.failure = ("BackoffLimitExceeded", "Job has reached the specified backoff limit")
            deadline = spec.get("activeDeadlineSeconds")
            if state.failure is None and deadline and "startTime" in status:
                elapsed = (loop.time() - state.started if state.started is not None
                           else (now - parse_timestamp(status["startTime"])).total_seconds())
                left = deadline - elapsed
                if left <= 0:
                    state.failure = ("DeadlineExceeded", "Job was active longer than specified deadline")
                else:
                    self.enqueue(meta["namespace"], meta["name"], delay=left + 0.01)
            if state.failure is not None:
                reason, message = state.failure
                if not _has_condition(job, "FailureTarget"):
                    self.cluster.record_event(job, reason, message, warning=True, component="job-controller")
                _set_condition(status, "FailureTarget", reason, message)
                self._delete_pods(job, active)  # counted as failed once they have stopped
                terminating, active = terminating + active, []
                if not terminating:
                    _set_condition(status, "Failed", reason, message)
            elif status["succeeded"] >= spec.get("completions", 1):
                message = "Reached expected number of succeeded pods"
                _set_condition(status, "SuccessCriteriaMet", "CompletionsReached", message)
                self._delete_pods(job, active, state.not_failures)
                terminating, active = terminating + active, []
                if not terminating:
                    _set_condition(status, "Complete", "CompletionsReached", message)
                    status["completionTime"] = timestamp(now)
                    self.cluster.record_event(job, "Completed", "Job completed", component="job-controller")
            elif not spec.get("suspend"):
                wanted = min(spec.get("parallelism", 1), spec.get("completions", 1) - status["succeeded"])
                missing = wanted - len(active) - len(terminating)
                if missing > 0 and loop.time() < state.next_pod_at:
                    self.enqueue(meta["namespace"], meta["name"], delay=state.next_pod_at - loop.time())
                else:
                    for _ in range(max(missing, 0)):
                        created = self._create_pod(job)
                        if created is not None:
                            active.append(created)
        status["active"] = len(active) if not finished else 0
        status["ready"] = sum(1 for p in active if any(
            c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions") or []))
        status["terminating"] = len(terminating)
        status["uncountedTerminatedPods"] = {}
        for key in ("active", "succeeded", "failed"):  # omitempty in the API
            if not status[key]:
                del status[key]
        if status != job["status"]:
            self.store.mutate(JOBS, meta["namespace"], meta["name"], lambda j: j.update(status=status))
        self._schedule_ttl(job, status)

    def _count(self, job: JSON, pod: JSON, state: _JobState, status: JSON) -> None:
        """Account a finished pod once (and release its finalizer); apply the pod failure policy."""
        uid, phase = pod["metadata"]["uid"], pod["status"].get("phase")
        gone = pod["metadata"].get("deletionTimestamp") and pod["metadata"].get("deletionGracePeriodSeconds") == 0
        if uid in state.counted or not (phase in TERMINAL or gone):
            if uid in state.counted and FINALIZER_JOB_TRACKING in (pod["metadata"].get("finalizers") or ()):
                self._drop_tracking(pod)
            return
        state.counted.add(uid)
        if phase == "Succeeded":
            status["succeeded"] += 1
        elif uid in state.not_failures:
            pass
        else:
            action = self._failure_policy(job, pod, state)
            if action != "Ignore":
                status["failed"] += 1
                backoff = self.config.job_backoff * 2 ** max(status["failed"] - 1, 0)
                state.next_pod_at = self.cluster.loop.time() + min(backoff, 360.0)
        self._drop_tracking(pod)

    def _failure_policy(self, job: JSON, pod: JSON, state: _JobState) -> str:
        policy = job["spec"].get("podFailurePolicy") or {}
        where = f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
        for index, rule in enumerate(policy.get("rules") or []):
            matched = None
            codes = rule.get("onExitCodes")
            if codes:
                for entry in pod["status"].get("containerStatuses") or []:
                    code = (entry.get("state") or {}).get("terminated", {}).get("exitCode")
                    if code in (None, 0) or codes.get("containerName") not in (None, entry["name"]):
                        continue
                    hit = code in codes.get("values", [])
                    if hit == (codes.get("operator", "In") == "In"):
                        matched = f"Container {entry['name']} for pod {where} failed with exit code {code}"
                        break
            for pattern in rule.get("onPodConditions") or []:
                if any(c["type"] == pattern["type"] and c["status"] == pattern.get("status", "True")
                       for c in pod["status"].get("conditions") or []):
                    matched = f"Pod {where} has condition {pattern['type']}"
            if matched:
                action = rule["action"]
                if action == "FailJob" and state.failure is None:
                    state.failure = ("PodFailurePolicy", f"{matched} matching FailJob rule at index {index}")
                return action
        return "Count"

    def _schedule_ttl(self, job: JSON, status: JSON) -> None:
        ttl = job["spec"].get("ttlSecondsAfterFinished")
        ends = [c for c in status.get("conditions") or [] if c["type"] in ("Complete", "Failed")]
        if ttl is None or not ends:
            return
        left = ttl - (utcnow() - parse_timestamp(ends[0]["lastTransitionTime"])).total_seconds()
        meta = job["metadata"]
        if left > 0:
            self.enqueue(meta["namespace"], meta["name"], delay=left + 0.01)
        elif not meta.get("deletionTimestamp"):
            with contextlib.suppress(ApiError):
                self.cluster.delete(JOBS, meta["namespace"], meta["name"], propagation="Background")
