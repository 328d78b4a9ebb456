"""What a step Job's state means for Airflow: Job and pod JSON in, ``JobStatus`` out (no cluster I/O).

Kubernetes keeps retrying what cannot heal (image pulls, missing secrets, pods no node can take);
we fail fast on those, naming the reason Kubernetes gave, and ask the caller to delete the Job
(``details["stop_job"]``) so nothing lingers. Disruptions (eviction, preemption, node shutdown) are
preemption, not a user error.
"""

from __future__ import annotations

from typing import Any

from airflow_stepops.hooks.base import JobState, JobStatus, capacity_failure
from airflow_stepops.timestamps import epoch

#: container waiting reasons that do not heal by waiting (ImagePullBackOff: a pull failed and was retried)
FAIL_FAST_REASONS = ("ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError")
#: a first ErrImagePull fails at once only when the registry said the image is not there or not allowed
PERMANENT_PULL_ERRORS = ("not found", "manifest unknown", "unauthorized", "denied", "authentication required",
                         "repository does not exist", "invalid reference format")
DISRUPTION_REASONS = ("PreemptionByScheduler", "DeletionByTaintManager", "EvictionByEvictionAPI",
                      "DeletionByPodGC", "TerminationByKubelet")


def _conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"}


def container_status(pod: dict[str, Any]) -> dict[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return next((s for s in statuses if s.get("name") == "step"), statuses[0] if statuses else {})


def latest_pod(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    return max(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "", default=None)


def _times(job: dict[str, Any], pod: dict[str, Any] | None) -> dict[str, Any]:
    status = job.get("status") or {}
    started = None
    if pod is not None:
        running = (container_status(pod).get("state") or {})
        started = epoch((running.get("running") or running.get("terminated") or {}).get("startedAt"))
    return {"started_at": started or epoch(status.get("startTime")), "finished_at": epoch(status.get("completionTime"))
            or epoch(next((c.get("lastTransitionTime") for c in (status.get("conditions") or [])
                           if c.get("type") == "Failed" and c.get("status") == "True"), None)),
            "pod": pod["metadata"]["name"] if pod else None,
            "node": (pod.get("spec") or {}).get("nodeName") if pod else None}


def _disruption(pod: dict[str, Any] | None) -> str | None:
    if pod is None:
        return None
    status = pod.get("status") or {}
    target = _conditions(pod).get("DisruptionTarget")
    if target is not None:
        return f"{target.get('reason')}: {target.get('message') or ''}".rstrip(": ")
    if status.get("reason") in ("Evicted", "Preempting", "Terminated", "NodeShutdown", "Shutdown"):
        return f"{status.get('reason')}: {status.get('message') or ''}".rstrip(": ")
    return None


def _failure(pod: dict[str, Any] | None, memory_limit: str | None) -> tuple[str, dict[str, Any]]:
    if pod is None:
        return "its pod is gone", {}
    terminated = (container_status(pod).get("state") or {}).get("terminated") or {}
    code, reason = terminated.get("exitCode"), terminated.get("reason")
    details = {"exit_code": code, "reason": reason}
    if reason == "OOMKilled":
        limit = f" (memory limit {memory_limit})" if memory_limit else ""
        return (f"pod {pod['metadata']['name']} was OOMKilled: the step used more memory than its limit{limit}; "
                "ask for more with ResourceSettings(memory=...)"), {**details, "reason": "oom_killed"}
    text = f"pod {pod['metadata']['name']} failed with exit code {code}" + (f" ({reason})" if reason else "")
    message = [line for line in (terminated.get("message") or "").strip().splitlines()
               if line.strip() and "::stepops-output:" not in line]  # a log tail may end in the output block
    if message:
        text += ": " + message[-1][:500]
    return text, details


def _cannot_start(waiting: dict[str, Any]) -> bool:
    reason = waiting.get("reason")
    if reason in FAIL_FAST_REASONS:
        return True
    message = (waiting.get("message") or "").lower()
    return reason == "ErrImagePull" and any(text in message for text in PERMANENT_PULL_ERRORS)


def _queue_limit(unschedulable_timeout: float, max_queue: float | None) -> tuple[float, str, str]:
    """How long a pod may wait for a node: (seconds, the capacity reason when it waited that long, the setting)."""
    if max_queue is not None and max_queue < unschedulable_timeout:
        return max_queue, "queue_timeout", f"max_queue_seconds={max_queue:g}"
    return unschedulable_timeout, "unschedulable", f"unschedulable_timeout_seconds={unschedulable_timeout:g}"


def interpret(job: dict[str, Any] | None, pods: list[dict[str, Any]], *, name: str, now: float,
              unschedulable_timeout: float, start_timeout: float = 1800,
              memory_limit: str | None = None, max_queue: float | None = None) -> JobStatus:
    if job is None:
        return JobStatus(JobState.FAILED, f"Job {name} no longer exists: it was deleted outside Airflow or "
                         "removed by its ttlSecondsAfterFinished", {"reason": "job_missing"})
    pod = latest_pod(pods)
    details = _times(job, pod)
    conditions = _conditions(job)
    if "Complete" in conditions or "SuccessCriteriaMet" in conditions:
        return JobStatus(JobState.SUCCEEDED, "", details)
    failed = conditions.get("Failed") or conditions.get("FailureTarget")
    if failed is not None:
        reason, message = failed.get("reason") or "", failed.get("message") or ""
        if reason == "DeadlineExceeded":
            deadline = (job.get("spec") or {}).get("activeDeadlineSeconds")
            return JobStatus(JobState.FAILED, f"the Job ran longer than its time limit (activeDeadlineSeconds="
                             f"{deadline}, from max_runtime_in_seconds or execution_timeout) and Kubernetes "
                             "stopped it",
                             {**details, "reason": "timed_out"})
        disruption = _disruption(pod)
        if disruption or (reason == "PodFailurePolicy" and "DisruptionTarget" in message):
            return JobStatus(JobState.PREEMPTED, disruption or message, {**details, "reason": "preempted"})
        text, extra = _failure(pod, memory_limit)
        return JobStatus(JobState.FAILED, text, {**details, **extra})
    if (job.get("metadata") or {}).get("deletionTimestamp"):
        return JobStatus(JobState.CANCELLED, f"Job {name} is being deleted", details)
    limit, reason, setting = _queue_limit(unschedulable_timeout, max_queue)
    if pod is None:
        created = epoch((job.get("metadata") or {}).get("creationTimestamp")) or now
        if now - created >= limit:
            # the Job's status says nothing structured about why (a ResourceQuota refusal is only an Event's
            # text), so this is "unschedulable", not "quota_exceeded"
            return capacity_failure(f"Job {name} has had no pod for {now - created:.0f}s ({setting}): the Job "
                                    "controller cannot create it; a quota, an admission policy or a missing service "
                                    "account is the usual cause", reason, {**details, "stop_job": True})
        return JobStatus(JobState.QUEUED, "waiting for the Job controller to create the pod", details)
    phase = (pod.get("status") or {}).get("phase")
    waiting = (container_status(pod).get("state") or {}).get("waiting") or {}
    if _cannot_start(waiting):
        return JobStatus(JobState.FAILED, f"pod {pod['metadata']['name']} cannot start: {waiting['reason']}: "
                         f"{waiting.get('message') or ''}".rstrip(": "),
                         {**details, "reason": waiting["reason"], "stop_job": True})
    scheduled = next((c for c in (pod.get("status") or {}).get("conditions") or []
                      if c.get("type") == "PodScheduled"), None)
    if phase == "Pending" and scheduled is not None and scheduled.get("status") == "False" \
            and scheduled.get("reason") == "Unschedulable":
        since = epoch(pod["metadata"].get("creationTimestamp")) or now
        message = scheduled.get("message") or "no node can run the pod"
        if now - since >= limit:
            # PodScheduled=False with reason Unschedulable: "the scheduler cannot schedule the Pod right now, for
            # example due to lack of resources" (https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/
            # #pod-conditions)
            return capacity_failure(f"pod {pod['metadata']['name']} stayed unschedulable for {now - since:.0f}s "
                                    f"({setting}): {message}", reason, {**details, "stop_job": True})
        return JobStatus(JobState.QUEUED, f"unschedulable: {message}", details)
    if phase == "Pending":
        since = epoch(scheduled.get("lastTransitionTime") if scheduled else None) or \
            epoch(pod["metadata"].get("creationTimestamp")) or now
        what = f"{waiting.get('reason') or 'pending'}: {waiting.get('message') or ''}".rstrip(": ")
        if now - since >= start_timeout:
            return JobStatus(JobState.FAILED, f"pod {pod['metadata']['name']} was scheduled {now - since:.0f}s ago "
                             f"but has not started (start_timeout_seconds={start_timeout:g}): {what}",
                             {**details, "reason": "start_timeout", "stop_job": True})
        return JobStatus(JobState.QUEUED, what, details)
    disruption = _disruption(pod)
    if disruption:  # the Job controller will fail the Job through the pod failure policy in a moment
        return JobStatus(JobState.RUNNING, f"disrupted: {disruption}", details)
    return JobStatus(JobState.RUNNING, "", details)
