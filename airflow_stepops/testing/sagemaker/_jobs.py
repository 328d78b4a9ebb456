"""``TrainingJob``: one training job's request and state, shaped like SageMaker's API answers.

moto's own ``FakeTrainingJob`` is born ``Completed`` and drops fields it has no parameter for
(``Environment``, ``RetryStrategy``, ...), so the emulator stores its own object in moto's
``training_jobs`` dict instead. The runner thread moves it through the statuses; API threads read it.
Every read and write holds the job's lock, so a describe never sees a half-made transition
(``Completed`` without its ``ModelArtifacts``, say).
"""

from __future__ import annotations

import copy
import threading
from datetime import datetime, timezone
from typing import Any

JSON = dict[str, Any]

#: TrainingJobStatus values a job never leaves.
TERMINAL = frozenset({"Completed", "Failed", "Stopped"})

#: SecondaryStatus values that end a job; their transition gets an EndTime at once.
TERMINAL_SECONDARY = frozenset({"Completed", "Failed", "Stopped", "MaxRuntimeExceeded", "MaxWaitTimeExceeded"})

#: StatusMessage texts, as close to SageMaker's as its public logs and docs show them.
MESSAGES = {
    "created": "Starting the training job",
    "launching": "Launching requested ML instances",
    "preparing": "Preparing the instances for training",
    "restarting": "Restarting the training job after the spot interruption",
    "downloading": "Downloading input data",
    "image": "Downloading the training image",
    "training": "Training image download completed. Training in progress.",
    "uploading": "Uploading generated training model",
    "completed": "Training job completed",
    "failed": "Training job failed",
    "stopping": "Stopping the training job",
    "stopped": "Training job stopped",
    "max_runtime": "Training job exceeded MaxRuntimeInSeconds provided",
    "max_wait": "Training job exceeded MaxWaitTimeInSeconds provided",
    "max_pending": "Training job exceeded MaxPendingTimeInSeconds provided",
    "interrupted": "Spot instance interrupted; waiting for capacity to restart the training job",
}

#: Request fields that DescribeTrainingJob does not echo.
_NOT_DESCRIBED = frozenset({"Tags", "TrainingJobName"})


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class JobStateError(Exception):
    """The job is in a status that does not allow the request (the API answers ValidationException)."""


class TrainingJob:
    """A training job as the API shows it; ``describe()`` is a DescribeTrainingJob answer.

    The attributes named like moto's (``training_job_name``, ``arn``, ``tags``, ``training_job_status``,
    ``creation_time``, ...) let moto's generic ``ListTags``/``AddTags``/``DeleteTags`` and ``Search``
    code treat it like its own objects.
    """

    def __init__(self, request: JSON, arn: str) -> None:
        self.lock = threading.RLock()
        self.request: JSON = copy.deepcopy(request)
        self.training_job_name: str = request["TrainingJobName"]
        self.arn = arn
        self.tags: list[dict[str, str]] = list(request.get("Tags") or [])
        now = utcnow()
        self.creation_time = self.last_modified_time = now
        self.training_job_status = "InProgress"
        self.secondary_status = "Starting"
        self.transitions: list[JSON] = [{"Status": "Starting", "StartTime": now, "StatusMessage": MESSAGES["created"]}]
        self.training_start_time: datetime | None = None
        self.training_end_time: datetime | None = None
        self.training_time_in_seconds: int | None = None
        self.billable_time_in_seconds: int | None = None
        self.failure_reason: str | None = None
        self.model_artifacts: str | None = None
        self.stop_requested = False

    # ----- what the request asked for ------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.training_job_name

    @property
    def spot(self) -> bool:
        return bool(self.request.get("EnableManagedSpotTraining"))

    @property
    def max_runtime(self) -> float:
        """MaxRuntimeInSeconds; SageMaker's default is one day."""
        return float((self.request.get("StoppingCondition") or {}).get("MaxRuntimeInSeconds") or 86400)

    @property
    def max_pending(self) -> float | None:
        """StoppingCondition.MaxPendingTimeInSeconds: how long the job may wait for its instances."""
        value = (self.request.get("StoppingCondition") or {}).get("MaxPendingTimeInSeconds")
        return float(value) if value else None

    @property
    def max_wait(self) -> float | None:
        """MaxWaitTimeInSeconds of a managed spot job (waiting plus running), None otherwise."""
        value = (self.request.get("StoppingCondition") or {}).get("MaxWaitTimeInSeconds")
        return float(value) if value and self.spot else None

    @property
    def terminal(self) -> bool:
        with self.lock:
            return self.training_job_status in TERMINAL

    # ----- state changes (runner thread and StopTrainingJob) -------------------------------------

    def transition(self, secondary: str, message: str, status: str | None = None) -> None:
        """Enter ``secondary`` (or only update its message if already there), optionally the primary status."""
        with self.lock:
            now = utcnow()
            last = self.transitions[-1] if self.transitions else None
            if last is not None and last["Status"] == secondary and "EndTime" not in last:
                last["StatusMessage"] = message
            else:
                if last is not None:
                    last.setdefault("EndTime", now)
                last = {"Status": secondary, "StartTime": now, "StatusMessage": message}
                self.transitions.append(last)
            if secondary in TERMINAL_SECONDARY:
                last["EndTime"] = now
            self.secondary_status = secondary
            if status is not None:
                self.training_job_status = status
            self.last_modified_time = now

    def request_stop(self) -> bool:
        """StopTrainingJob: True if the job now stops, False if it was already stopping."""
        with self.lock:
            if self.training_job_status in TERMINAL:
                raise JobStateError(
                    f"The request was rejected because the training job is in status {self.training_job_status}.")
            if self.stop_requested or self.training_job_status == "Stopping":
                return False
            self.stop_requested = True
            self.transition("Stopping", MESSAGES["stopping"], status="Stopping")
            return True

    def mark_training_started(self) -> None:
        with self.lock:
            if self.training_start_time is None:
                self.training_start_time = utcnow()
                self.last_modified_time = self.training_start_time

    def finish(self, status: str, secondary: str, message: str, *, failure_reason: str | None = None,
               model_artifacts: str | None = None, billable_seconds: float | None = None) -> None:
        """Enter a terminal status with the end time, durations and (if any) failure reason and model."""
        with self.lock:
            if self.training_job_status in TERMINAL:
                return
            now = utcnow()
            if self.training_start_time is not None:
                self.training_end_time = now
                elapsed = (now - self.training_start_time).total_seconds()
                self.training_time_in_seconds = max(1, round(elapsed))
                billed = elapsed if billable_seconds is None else billable_seconds
                self.billable_time_in_seconds = max(1, round(billed))
            if failure_reason is not None:
                self.failure_reason = failure_reason[:1024]
            if model_artifacts is not None:
                self.model_artifacts = model_artifacts
            self.transition(secondary, message, status=status)

    # ----- API views -------------------------------------------------------------------------------

    def describe(self) -> JSON:
        """A DescribeTrainingJob answer (a deep copy: the caller may serialise it at leisure)."""
        with self.lock:
            out: JSON = {k: copy.deepcopy(v) for k, v in self.request.items() if k not in _NOT_DESCRIBED}
            out["AlgorithmSpecification"] = {"EnableSageMakerMetricsTimeSeries": False,
                                             **out.get("AlgorithmSpecification", {})}
            out.setdefault("EnableNetworkIsolation", False)
            out.setdefault("EnableInterContainerTrafficEncryption", False)
            out.setdefault("EnableManagedSpotTraining", False)
            out.update({
                "TrainingJobName": self.training_job_name,
                "TrainingJobArn": self.arn,
                "TrainingJobStatus": self.training_job_status,
                "SecondaryStatus": self.secondary_status,
                "CreationTime": self.creation_time,
                "LastModifiedTime": self.last_modified_time,
                "SecondaryStatusTransitions": copy.deepcopy(self.transitions),
            })
            optional = {"TrainingStartTime": self.training_start_time, "TrainingEndTime": self.training_end_time,
                        "TrainingTimeInSeconds": self.training_time_in_seconds,
                        "BillableTimeInSeconds": self.billable_time_in_seconds,
                        "FailureReason": self.failure_reason}
            out.update({k: v for k, v in optional.items() if v is not None})
            if self.model_artifacts is not None:
                out["ModelArtifacts"] = {"S3ModelArtifacts": self.model_artifacts}
            return out

    def summary(self) -> JSON:
        """A ListTrainingJobs ``TrainingJobSummary``."""
        with self.lock:
            out: JSON = {"TrainingJobName": self.training_job_name, "TrainingJobArn": self.arn,
                         "CreationTime": self.creation_time, "LastModifiedTime": self.last_modified_time,
                         "TrainingJobStatus": self.training_job_status, "SecondaryStatus": self.secondary_status}
            if self.training_end_time is not None:
                out["TrainingEndTime"] = self.training_end_time
            return out

    # moto's Search calls this on every object it finds
    def gen_response_object(self) -> JSON:
        return {**self.describe(), "Tags": list(self.tags)}

    @property
    def response_object(self) -> JSON:
        return self.describe()
