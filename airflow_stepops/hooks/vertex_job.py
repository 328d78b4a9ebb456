"""The Vertex AI CustomJob of one step try: its body, its validation, and its state as a JobStatus.

The body is the REST (camelCase JSON) form of ``google.cloud.aiplatform_v1.CustomJob``; it is parsed
into that proto message before it is sent, so a field or enum Vertex would refuse is refused here.
"""

from __future__ import annotations

import re
from typing import Any

from airflow_stepops.bundle import StepIdentity
from airflow_stepops.exceptions import StepOperatorConfigError
from airflow_stepops.hooks.base import JobHandle, JobState, JobStatus, capacity_failure
from airflow_stepops.settings.vertex import LABEL_PREFIX, check_labels
from airflow_stepops.timestamps import epoch

GCS_MOUNT = "/gcs/"
#: the step try's identity, looked up before submitting (Vertex assigns job ids itself)
STEP_LABEL = f"{LABEL_PREFIX}step"
MAX_DISPLAY_NAME = 128
#: google.rpc.Code values that mean there was no capacity, not that the step failed: a job that never got its VMs
#: ends RESOURCE_EXHAUSTED ("Resources are insufficient in region", the stockout of
#: https://cloud.google.com/vertex-ai/docs/general/troubleshooting, github.com/openreview/openreview-expertise/
#: issues/401) and a preempted Spot job "fails with a STOCKOUT error" too
#: (https://cloud.google.com/vertex-ai/docs/training/use-spot-vms): a job that had started (``startTime``) on Spot
#: VMs was preempted, any other is a capacity failure. Outcomes are told apart by error.code, state and times only:
#: messages can carry user output.
CAPACITY_CODES = (8, 14)  # RESOURCE_EXHAUSTED, UNAVAILABLE
DEADLINE_EXCEEDED = 4


def display_name(identity: StepIdentity) -> str:
    return identity.job_name(max_length=MAX_DISPLAY_NAME, allowed=r"[^a-z0-9-]")


def label_value(text: str) -> str:
    """A GCP label value: lowercase letters, digits, '_' and '-', at most 63 characters."""
    return re.sub(r"[^a-z0-9_-]", "_", text.lower())[:63]


def identity_labels(identity: StepIdentity) -> dict[str, str]:
    return {STEP_LABEL: identity.digest[:40], f"{LABEL_PREFIX}try": str(identity.try_number),
            f"{LABEL_PREFIX}dag": label_value(identity.dag_id), f"{LABEL_PREFIX}task": label_value(identity.task_id),
            f"{LABEL_PREFIX}run": label_value(identity.run_id),
            f"{LABEL_PREFIX}map-index": str(identity.map_index).replace("-", "n")}


def step_filter(identity: StepIdentity) -> str:
    return f'labels.{STEP_LABEL}="{identity.digest[:40]}"'


def mount_path(uri: str) -> str | None:
    """``gs://bucket/key`` -> ``/gcs/bucket/key`` (Vertex mounts every bucket there with Cloud Storage FUSE)."""
    if not uri.startswith("gs://"):
        return None
    path = uri[len("gs://"):].rstrip("/")
    bucket, _, key = path.partition("/")
    return GCS_MOUNT + "/".join(p for p in (bucket.rpartition("@")[2], key) if p)  # without a conn_id@


def validate_body(body: dict[str, Any]) -> Any:
    """Parse the REST body into the aiplatform CustomJob proto (unknown fields and bad enums refused)."""
    from google.cloud.aiplatform_v1.types import CustomJob
    from google.protobuf import json_format

    message = CustomJob.pb(CustomJob())
    try:
        json_format.ParseDict(body, message, ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        raise StepOperatorConfigError(f"the CustomJob body is invalid: {exc}") from None
    pools = body.get("jobSpec", {}).get("workerPoolSpecs") or []
    problems = [] if body.get("displayName") else ["displayName is required"]
    if len(body.get("displayName", "")) > MAX_DISPLAY_NAME:
        problems.append(f"displayName is longer than {MAX_DISPLAY_NAME} characters")
    if not pools:
        problems.append("jobSpec.workerPoolSpecs needs at least one worker pool")
    for index, pool in enumerate(pools):
        if not (pool.get("machineSpec") or {}).get("machineType"):
            problems.append(f"jobSpec.workerPoolSpecs[{index}].machineSpec.machineType is required")
        if not (pool.get("containerSpec") or {}).get("imageUri"):
            problems.append(f"jobSpec.workerPoolSpecs[{index}].containerSpec.imageUri is required")
    try:  # the merged labels: the connection's, the step's and the identity's together
        check_labels(body.get("labels") or {}, "labels", reserved=False)
    except ValueError as exc:
        problems.append(str(exc))
    if problems:
        raise StepOperatorConfigError("the CustomJob body is invalid: " + "; ".join(problems))
    return CustomJob.wrap(message)


def job_state(job: dict[str, Any] | None, handle: JobHandle) -> JobStatus:
    """A CustomJob (REST JSON, camelCase) -> JobStatus."""
    if job is None:
        return JobStatus(JobState.FAILED, f"CustomJob {handle['job_id']} does not exist", {"reason": "job_missing"})
    state = str(job.get("state") or "JOB_STATE_UNSPECIFIED")
    error = job.get("error") or {}
    code, text = int(error.get("code") or 0), str(error.get("message") or "")
    spot = (job.get("jobSpec", {}).get("scheduling") or {}).get("strategy") == "SPOT"
    machine = ((job.get("jobSpec", {}).get("workerPoolSpecs") or [{}])[0].get("machineSpec") or {})
    details = {"vertex_state": state, "spot": spot, "machine_type": machine.get("machineType"),
               "accelerator": f"{machine.get('acceleratorCount', 1)} x {machine['acceleratorType']}"
               if machine.get("acceleratorType") else None, "started_at": epoch(job.get("startTime")),
               "finished_at": epoch(job.get("endTime")), "update_time": job.get("updateTime")}
    if state == "JOB_STATE_SUCCEEDED":
        return JobStatus(JobState.SUCCEEDED, "", details)
    if state in ("JOB_STATE_CANCELLED", "JOB_STATE_FAILED") and (_ran_past_timeout(job) or code == DEADLINE_EXCEEDED):
        return JobStatus(JobState.FAILED, f"the job ran past scheduling.timeout "
                         f"({(job.get('jobSpec', {}).get('scheduling') or {}).get('timeout')}) and Vertex stopped it",
                         {**details, "reason": "timed_out", "error_code": code})
    if state == "JOB_STATE_CANCELLED":
        return JobStatus(JobState.CANCELLED, text or "cancelled", details)
    if state in ("JOB_STATE_FAILED", "JOB_STATE_PARTIALLY_SUCCEEDED", "JOB_STATE_EXPIRED"):
        if code in CAPACITY_CODES and spot and job.get("startTime"):
            return JobStatus(JobState.PREEMPTED, f"the Spot VM was reclaimed: {text}",
                             {**details, "reason": "preempted", "error_code": code})
        if code in CAPACITY_CODES:  # no VM was ever had: nothing of the step ran
            return capacity_failure(f"no capacity for the job (stockout): {text}", "stockout",
                                    {**details, "error_code": code})
        if state == "JOB_STATE_EXPIRED":
            return JobStatus(JobState.FAILED, f"the job waited past scheduling.maxWaitDuration for resources: "
                             f"{text}", {**details, "reason": "expired"})
        return JobStatus(JobState.FAILED, text or state, {**details, "error_code": code})
    if state in ("JOB_STATE_QUEUED", "JOB_STATE_PENDING", "JOB_STATE_PAUSED"):
        return JobStatus(JobState.QUEUED, state.removeprefix("JOB_STATE_").lower(), details)
    if state == "JOB_STATE_CANCELLING":
        return JobStatus(JobState.RUNNING, "cancelling", details)
    return JobStatus(JobState.RUNNING, state.removeprefix("JOB_STATE_").lower(), details)


def _ran_past_timeout(job: dict[str, Any]) -> bool:
    """Whether the job ran (startTime to endTime) for its whole scheduling.timeout. Vertex cancels a job
    still running then, like a cancel we ask for ("If the training job is still running after this
    duration, AI Platform Training cancels it", https://cloud.google.com/ai-platform/training/docs/reference/
    rest/v1/projects.jobs#Scheduling; a CustomJob past its default 7-day timeout ends cancelled,
    github.com/tensorflow/tfx/issues/6223) and with the same error, code 1 (CANCELLED, https://cloud.google.com/
    vertex-ai/docs/reference/rest/v1/projects.locations.customJobs/cancel), so the timestamps tell the two
    apart. A FAILED job with code 4 (DEADLINE_EXCEEDED) counts as timed out too."""
    timeout = str((job.get("jobSpec", {}).get("scheduling") or {}).get("timeout") or "")
    started, ended = epoch(job.get("startTime")), epoch(job.get("endTime"))
    if not timeout.endswith("s") or started is None or ended is None:
        return False
    try:
        return ended - started >= float(timeout[:-1])
    except ValueError:
        return False

