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

#: Azure ML job names: letters, digits, '_' and '-', at most 255 characters (the REST API's pattern for the job id,
#: ``^[a-zA-Z0-9][a-zA-Z0-9\-_]{0,254}$``, Jobs_CreateOrUpdate in azure-rest-api-specs' mfe.json); ours also start
#: with a letter
JOB_NAME = re.compile(r"^[a-zA-Z][a-zA-Z0-9_-]{0,254}$")
MAX_JOB_NAME = 255
STEP_TAG = f"{TAG_PREFIX}step"
QUEUED_STATES = ("NotStarted", "Starting", "Provisioning", "Preparing", "Queued")
#: AmlCompute's error code for a job whose low-priority or Spot nodes were taken back ("PreemptionError: Nodes of
#: this job got pre-empted", https://github.com/MicrosoftDocs/azure-docs/issues/66288) and for a lost node. Only
#: the error's codes are compared (root, ``innerError`` chain, ``details``), never its message: the message of a
#: failed user process quotes the process's own output (``Execution failed. User process ... Error: <output>``).
PREEMPTION_CODES = frozenset({"PreemptionError"})
NODE_FAILURE_CODES = frozenset({"NodeFailure"})
#: ``limits.timeout`` is "the max run duration ..., after which the job will be cancelled"
#: (https://learn.microsoft.com/en-us/rest/api/azureml/jobs/create-or-update#commandjoblimits): a Canceled job
#: whose run lasted that long timed out. Run history stamps the run's start a little after the service's clock
#: starts, hence the slack.
TIMEOUT_SLACK_SECONDS = 1.0

def job_name(identity: StepIdentity) -> str:
    name = identity.job_name(max_length=MAX_JOB_NAME, allowed=r"[^a-z0-9_-]")
    if not name[:1].isalpha():  # a DAG id starting with a digit or '_': the prefix must not cut the digest off
        name = "step-" + identity.job_name(max_length=MAX_JOB_NAME - 5, allowed=r"[^a-z0-9_-]")
    return name


def identity_tags(identity: StepIdentity) -> dict[str, str]:
    return {STEP_TAG: identity.digest[:40], f"{TAG_PREFIX}try": str(identity.try_number),
            f"{TAG_PREFIX}dag": identity.dag_id, f"{TAG_PREFIX}task": identity.task_id,
            f"{TAG_PREFIX}map-index": str(identity.map_index), f"{TAG_PREFIX}run": identity.run_id[:1000]}


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


def _error_of(run_error: Any) -> tuple[set[str], str]:
    """(every code, message) of run history's ``error`` (``{"error": {"code", "message", "innerError",
    "details"}}``, the RootError of https://learn.microsoft.com/en-us/rest/api/azureml/)."""
    if not run_error:
        return set(), ""
    if not isinstance(run_error, dict):
        run_error = getattr(run_error, "as_dict", lambda: {})() or {}
    error = run_error.get("error") or run_error
    codes: set[str] = set()
    pending = [error]
    while pending:
        item = pending.pop()
        if not isinstance(item, dict):
            continue
        if item.get("code"):
            codes.add(str(item["code"]))
        pending.append(item.get("innerError") or item.get("inner_error"))
        pending.extend(item.get("details") or [])
    return codes, str(error.get("message") or "")


def _ran_past(timeout: float | None, details: dict[str, Any]) -> bool:
    started, finished = details.get("started_at"), details.get("finished_at")
    return bool(timeout) and started is not None and finished is not None and \
        finished - started >= float(timeout or 0) - TIMEOUT_SLACK_SECONDS


def job_state(status: str | None, run_error: Any, handle: JobHandle, details: dict[str, Any],
              timeout: float | None = None) -> JobStatus:
    """An Azure ML job status, run history's error and times, and the job's ``limits.timeout`` -> JobStatus."""
    if status is None:
        return JobStatus(JobState.FAILED, f"Azure ML job {handle['job_id']} does not exist", {"reason": "job_missing"})
    spot = bool(handle.get("spot"))
    details = {"azureml_status": status, "spot": spot, "instance_type": handle.get("instance_type"),
               "compute": handle.get("compute") or "serverless", **details}
    if status == "Completed":
        return JobStatus(JobState.SUCCEEDED, "", details)
    codes, text = _error_of(run_error)
    code = ",".join(sorted(codes)) or None
    if status == "Canceled" and _ran_past(timeout, details):
        return JobStatus(JobState.FAILED, f"the job ran past its limits.timeout ({timeout:g} s) and Azure ML "
                         "cancelled it", {**details, "reason": "timed_out", "error_code": code})
    if status == "Canceled":
        return JobStatus(JobState.CANCELLED, text or "cancelled", details)
    if status == "Failed":
        if codes & PREEMPTION_CODES:
            where = "the Spot VM" if handle.get("job_tier") == "Spot" else \
                "the low-priority node" if spot else "the node"
            return JobStatus(JobState.PREEMPTED, f"{where} was preempted: {text}",
                             {**details, "reason": "preempted", "error_code": code})
        extra = {"reason": "node_failure"} if codes & NODE_FAILURE_CODES else {}
        return JobStatus(JobState.FAILED, text or "failed", {**details, **extra, "error_code": code})
    if status in QUEUED_STATES:
        return JobStatus(JobState.QUEUED, status, details)
    if status == "CancelRequested":
        return JobStatus(JobState.RUNNING, "cancelling", details)
    return JobStatus(JobState.RUNNING, status, details)  # Running, Finalizing, NotResponding, Paused, Unknown


def check_name(name: str) -> str:
    if not JOB_NAME.match(name):
        raise StepOperatorConfigError(f"job name {name!r} is not a valid Azure ML job name")
    return name
