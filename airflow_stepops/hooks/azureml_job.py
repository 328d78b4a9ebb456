"""The Azure ML command job of one step try: its name and tags, where its data lives, and its state.

Azure ML job names are chosen by the client, so the name is derived from the step try's identity; a tag
holds the identity's digest, so a job of another step that happens to have the name is never taken for
ours. A job's status comes from the job resource (ARM); why it failed only from run history.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from airflow_stepops.bundle import StepIdentity
from airflow_stepops.exceptions import StepOperatorConfigError
from airflow_stepops.hooks.base import JobHandle, JobState, JobStatus
from airflow_stepops.settings.azureml import BLOB_URI, DATASTORE_URI, TAG_PREFIX

#: Azure ML job names: letters, digits, '_' and '-', starting with a letter, at most 255 characters
JOB_NAME = re.compile(r"^[a-zA-Z][a-zA-Z0-9_-]{0,254}$")
MAX_JOB_NAME = 255
STEP_TAG = f"{TAG_PREFIX}step"
QUEUED_STATES = ("NotStarted", "Starting", "Provisioning", "Preparing", "Queued")
#: what Azure ML says when a low-priority node or a Spot VM is taken back (AmlCompute's PreemptionError)
PREEMPTION_WORDS = ("preemptionerror", "pre-empted", "preempted", "preemption", "evicted", "eviction")
TIMEOUT_WORDS = ("jobtimeout", "limits.timeout", "timed out", "timeout", "max run duration", "maxrunduration")
NODE_FAILURE_WORDS = ("nodefailure", "node failure", "became unavailable", "node was lost")


def job_name(identity: StepIdentity) -> str:
    name = identity.job_name(max_length=MAX_JOB_NAME, allowed=r"[^a-z0-9_-]")
    if not name[:1].isalpha():  # a DAG id starting with a digit or '_'
        name = f"step-{name}"[:MAX_JOB_NAME]
    return name


def identity_tags(identity: StepIdentity) -> dict[str, str]:
    return {STEP_TAG: identity.digest[:40], f"{TAG_PREFIX}try": str(identity.try_number),
            f"{TAG_PREFIX}dag": identity.dag_id, f"{TAG_PREFIX}task": identity.task_id,
            f"{TAG_PREFIX}map-index": str(identity.map_index), f"{TAG_PREFIX}run": identity.run_id[:256]}


def experiment_name(dag_id: str) -> str:
    """The DAG id as an experiment name (letters, digits, '_' and '-')."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", dag_id).lstrip("_-") or "stepops"
    return name[:255]


@dataclass(frozen=True)
class BlobStore:
    """The artifact store as workers and jobs see it: one blob container, reached by workers through
    Airflow's object storage (``abfs://[conn@]container/prefix``) and by jobs through a datastore."""

    datastore: str
    container: str
    prefix: str
    conn_id: str | None

    @property
    def worker_uri(self) -> str:
        who = f"{self.conn_id}@" if self.conn_id else ""
        return f"abfs://{who}{self.container}/{self.prefix}".rstrip("/")

    def job_uri(self, uri: str) -> str | None:
        """``abfs://[conn@]<container>/<path>`` of this store's container -> ``azureml://datastores/<ds>/
        paths/<path>``; None for a URI elsewhere (another container, another kind of store)."""
        if uri.startswith("azureml://"):
            match = DATASTORE_URI.match(uri)
            return uri if match and match.group("datastore") == self.datastore else None
        found = BLOB_URI.match(uri)
        if not found or found.group("container") != self.container:
            return None
        path = (found.group("path") or "").strip("/")
        return f"azureml://datastores/{self.datastore}/paths/{path}"


def parse_store(uri: str, default_datastore: str, storage_conn_id: str | None,
                container_of: Any) -> BlobStore:
    """A ``BlobStore`` from an artifact_store URI; ``container_of(datastore)`` looks a datastore's container
    up (only for ``azureml://`` stores)."""
    found = DATASTORE_URI.match(uri)
    if found:
        datastore = found.group("datastore")
        return BlobStore(datastore, container_of(datastore), found.group("path").strip("/"), storage_conn_id)
    found = BLOB_URI.match(uri)
    if not found:
        raise StepOperatorConfigError(f"artifact_store: {uri!r} is not an azureml://datastores/... or abfs:// URI")
    return BlobStore(default_datastore, found.group("container"), (found.group("path") or "").strip("/"),
                     found.group("conn") or storage_conn_id)


def _error_of(run_error: Any) -> tuple[str, str, str]:
    """(code, inner code, message) of run history's ``error`` (``{"error": {"code", "message", ...}}``)."""
    if not run_error:
        return "", "", ""
    if not isinstance(run_error, dict):
        run_error = getattr(run_error, "as_dict", lambda: {})() or {}
    error = run_error.get("error") or run_error
    inner = error.get("innerError") or error.get("inner_error") or {}
    return str(error.get("code") or ""), str(inner.get("code") or ""), str(error.get("message") or "")


def job_state(status: str | None, run_error: Any, handle: JobHandle, details: dict[str, Any]) -> JobStatus:
    """An Azure ML job status (and run history's error) -> JobStatus."""
    if status is None:
        return JobStatus(JobState.FAILED, f"Azure ML job {handle['job_id']} does not exist", {"reason": "job_missing"})
    spot = bool(handle.get("spot"))
    details = {"azureml_status": status, "spot": spot, "instance_type": handle.get("instance_type"),
               "compute": handle.get("compute") or "serverless", **details}
    if status == "Completed":
        return JobStatus(JobState.SUCCEEDED, "", details)
    code, inner, text = _error_of(run_error)
    lowered = f"{code} {inner} {text}".lower()
    if status in ("Failed", "Canceled") and any(word in lowered for word in TIMEOUT_WORDS):
        return JobStatus(JobState.FAILED, f"the job ran past limits.timeout and Azure ML stopped it: {text}",
                         {**details, "reason": "timed_out", "error_code": inner or code})
    if status == "Canceled":
        return JobStatus(JobState.CANCELLED, text or "cancelled", details)
    if status == "Failed":
        if any(word in lowered for word in PREEMPTION_WORDS):
            where = "the Spot VM" if handle.get("job_tier") == "Spot" else \
                "the low-priority node" if spot else "the node"
            return JobStatus(JobState.PREEMPTED, f"{where} was preempted: {text}",
                             {**details, "reason": "preempted", "error_code": inner or code})
        reason = "node_failure" if any(word in lowered for word in NODE_FAILURE_WORDS) else None
        extra = {"reason": reason} if reason else {}
        return JobStatus(JobState.FAILED, text or "failed", {**details, **extra, "error_code": inner or code})
    if status in QUEUED_STATES:
        return JobStatus(JobState.QUEUED, status, details)
    if status == "CancelRequested":
        return JobStatus(JobState.RUNNING, "cancelling", details)
    return JobStatus(JobState.RUNNING, status, details)  # Running, Finalizing, NotResponding, Paused, Unknown


def check_name(name: str) -> str:
    if not JOB_NAME.match(name):
        raise StepOperatorConfigError(f"job name {name!r} is not a valid Azure ML job name")
    return name
