"""Injectable faults: what SageMaker does to a training job that its code did not cause.

A fault reaches a job through a rule registered on the emulator (``SageMakerEmulator.inject``), taken
when the job is created, or strikes a running job at once (``SageMakerEmulator.disrupt``).
"""

from __future__ import annotations

from dataclasses import dataclass

from airflow_stepops.testing import _kit

#: The FailureReason SageMaker gives when it cannot get the instances.
CAPACITY_ERROR = ("CapacityError: Unable to provision requested ML compute capacity. "
                  "Please retry using a different ML instance type.")
#: The FailureReason of SageMaker's own failures, e.g. an on-demand instance lost mid-training.
INTERNAL_ERROR = "InternalServerError: We encountered an internal error. Please try again."

#: Kinds that strike ``after`` seconds into the training process.
RUNNING_KINDS = frozenset({"spot_interruption", "failure"})
KINDS = RUNNING_KINDS | {"insufficient_capacity", "slow_start"}


@dataclass(frozen=True)
class Fault(_kit.Fault):
    """One injected failure.

    kind:
        ``spot_interruption`` — the instance is reclaimed ``after`` seconds into training: the process
        gets SIGTERM (SIGKILL after the grace period). A managed spot job goes ``Interrupted`` and
        restarts on a fresh instance (``Starting``, ``Downloading``, ``Training``) with its checkpoints
        restored from ``CheckpointConfig.S3Uri``, within ``MaxWaitTimeInSeconds``; any other job fails
        with ``InternalServerError``. Each fault interrupts one run: inject two for two interruptions.
        ``insufficient_capacity`` — the job fails while ``Starting`` with a ``CapacityError``.
        ``failure`` — the job fails with ``message`` ``after`` seconds into training, killing the process
        if it still runs (a job whose process ended sooner fails all the same).
        ``slow_start`` — the job stays ``Starting`` for ``duration`` seconds.
    after: seconds after the training process started, for ``spot_interruption`` and ``failure``.
    duration: seconds in ``Starting`` for ``slow_start``.
    message: the FailureReason for ``failure`` (default ``InternalServerError: ...``) and
        ``insufficient_capacity`` (default SageMaker's ``CapacityError`` text).
    """

    KINDS = KINDS

    duration: float = 2.0

    @property
    def reason(self) -> str:
        if self.message:
            return self.message
        return CAPACITY_ERROR if self.kind == "insufficient_capacity" else INTERNAL_ERROR


@dataclass
class FaultRule(_kit.FaultRule):
    """A registered fault for the jobs named ``job`` or starting with ``job_prefix`` (None: any)."""

    job_prefix: str | None = None

    def matches(self, name: str, **facts: object) -> bool:
        return super().matches(name) and (self.job_prefix is None or name.startswith(self.job_prefix))
