"""Injectable faults: what Vertex AI does to a custom job (or an API call) that its code did not cause.

The errors a job ends with are ``google.rpc.Status`` values (``error.code`` is the numeric code). Where
the wording comes from (public reports of real jobs; where none was found, the emulator's own words):

* non-zero exit (code 3): "The replica workerpool0-0 exited with a non-zero status of 1. To find out more
  about why your job exited please check the logs: https://console.cloud.google.com/logs/viewer?..."
  as Vertex logs it (github.com/tensorflow/models/issues/10735);
* stockout (code 8, RESOURCE_EXHAUSTED): "Resources are insufficient in region: us-central1."
  (github.com/openreview/openreview-expertise/issues/401);
* quota at create time (HTTP 429 RESOURCE_EXHAUSTED): "The following quota metrics exceed quota limits:
  aiplatform.googleapis.com/custom_model_training_nvidia_l4_gpus"
  (github.com/GoogleCloudPlatform/stable-diffusion-on-gcp/issues/12, google-deepmind/xmanager#29);
* Spot preemption: Vertex's Spot VM page says a preempted job "fails with a STOCKOUT error"
  (cloud.google.com/vertex-ai/docs/predictions/use-spot-vms, "Preemption handling"; the training page says
  the same), so code 8 with the stockout sentence plus which replica was preempted;
* cancel (code 1): "CANCELED"; a job past ``scheduling.timeout`` is cancelled the same way (see
  ``_runner``); a lost on-demand VM (code 13, INTERNAL): no real wording was found, the message is the
  emulator's.
"""

from __future__ import annotations

from dataclasses import dataclass

from airflow_stepops.testing import _kit
from airflow_stepops.testing.vertex._errors import RPC_CODE

REPLICA = "workerpool0-0"
LOGS_URL = ("https://console.cloud.google.com/logs/viewer?project={project_number}&resource=ml_job%2Fjob_id%2F"
            "{job_id}&advancedFilter=resource.type%3D%22ml_job%22%0Aresource.labels.job_id%3D%22{job_id}%22")
NON_ZERO_EXIT = (f"The replica {REPLICA} exited with a non-zero status of {{exit_code}}. To find out more about "
                 f"why your job exited please check the logs: {LOGS_URL}")
STOCKOUT = "Resources are insufficient in region: {location}. Please try a different region."
PREEMPTED = ("Resources are insufficient in region: {location}. The Spot VM of replica " + REPLICA
             + " was preempted (STOCKOUT).")
CANCELED = "CANCELED"
INTERNAL = "Internal error occurred for the current attempt. The VM of replica " + REPLICA + " was lost."
QUOTA = "The following quota metrics exceed quota limits: {metric}"
DEFAULT_QUOTA_METRIC = "aiplatform.googleapis.com/custom_model_training_nvidia_t4_gpus"

#: kinds that strike ``after`` seconds into RUNNING
RUNNING_KINDS = frozenset({"preemption", "failure", "restart"})
KINDS = RUNNING_KINDS | {"stockout", "slow_start", "quota_exceeded", "lost_create_reply"}


@dataclass(frozen=True)
class Fault(_kit.Fault):
    """One injected failure.

    kind:
        ``preemption`` — ``after`` seconds into RUNNING the Spot VM is reclaimed: the process gets SIGTERM
        (SIGKILL after ``stop_grace_period``), the ``/gcs`` files are uploaded, and a job whose
        ``jobSpec.scheduling.strategy`` is ``SPOT`` ends JOB_STATE_FAILED with code 8 (RESOURCE_EXHAUSTED,
        the documented STOCKOUT). A job not on Spot VMs cannot be preempted: for it the same fault is a lost
        VM, JOB_STATE_FAILED with code 13 (INTERNAL). Vertex retries preempted jobs a few times by itself;
        the emulator reports the attempt that finally failed.
        ``failure`` — ``after`` seconds into RUNNING the process is killed and the job ends JOB_STATE_FAILED
        with ``message`` and ``code`` (default 13, INTERNAL), even if the process ended sooner.
        ``stockout`` — the job stays PENDING ``after`` seconds more (no process runs) and ends
        JOB_STATE_FAILED with code 8 "Resources are insufficient in region: ...".
        ``slow_start`` — the job stays QUEUED ``duration`` seconds more.
        ``quota_exceeded`` — the create call itself answers HTTP 429 RESOURCE_EXHAUSTED "The following
        quota metrics exceed quota limits: ``metric``"; no job is made.
        ``restart`` — VM maintenance: ``after`` seconds into RUNNING (or, with ``on_exit``, the moment the
        process ends, before Vertex records it) the replica is stopped and started again with the same
        hostname and ``/gcs`` files, once; the job goes on. Vertex does this also with
        ``scheduling.disableRetries`` (cloud.google.com/vertex-ai/docs/training/understanding-training-service,
        "Restart workers during the training job": "VM maintenance ... restarts the worker on another VM").
        ``lost_create_reply`` — the next create call makes the job but its connection is dropped before the
        reply is sent.
    """

    KINDS = KINDS

    duration: float = 2.0
    code: int | None = None
    metric: str = DEFAULT_QUOTA_METRIC
    on_exit: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.code is not None and self.code not in RPC_CODE.values():
            raise ValueError(f"code {self.code} is not a google.rpc.Code")


FaultRule = _kit.FaultRule


@dataclass
class ApiFault:
    """Answer the next ``times`` matching API requests (None: all) with HTTP ``status_code`` and ``status``.

    ``path_contains`` (e.g. ``"customJobs"``, ``":cancel"``, ``"entries:list"``, ``"/token"``) and
    ``method`` narrow which requests; both None match every request.
    """

    status_code: int
    status: str
    times: int | None = 1
    path_contains: str | None = None
    method: str | None = None
    message: str = ""
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return ((self.method is None or self.method.upper() == method.upper())
                and (self.path_contains is None or self.path_contains in path))
