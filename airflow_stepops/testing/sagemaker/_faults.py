"""Injectable faults: what SageMaker does to a training job that its code did not cause.

A fault reaches a job through a rule registered on the emulator (``SageMakerEmulator.inject``), taken
when the job is created, or strikes a running job at once (``SageMakerEmulator.disrupt``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: The FailureReason SageMaker gives when it cannot get the instances.
CAPACITY_ERROR = ("CapacityError: Unable to provision requested ML compute capacity. "
                  "Please retry using a different ML instance type.")
#: The FailureReason of SageMaker's own failures, e.g. an on-demand instance lost mid-training.
INTERNAL_ERROR = "InternalServerError: We encountered an internal error. Please try again."

#: Kinds that strike ``after`` seconds into the training process.
RUNNING_KINDS = frozenset({"spot_interruption", "failure"})
KINDS = RUNNING_KINDS | {"insufficient_capacity", "slow_start"}


@dataclass(frozen=True)
class Fault:
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

    kind: str
    after: float = 0.0
    duration: float = 2.0
    message: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {sorted(KINDS)}")

    @property
    def reason(self) -> str:
        if self.message:
            return self.message
        return CAPACITY_ERROR if self.kind == "insufficient_capacity" else INTERNAL_ERROR


@dataclass
class FaultRule:
    """A registered fault waiting for the jobs it matches; ``count`` None matches every job."""

    fault: Fault
    job: str | None = None
    job_prefix: str | None = None
    count: int | None = 1
    applied: list[str] = field(default_factory=list)

    def matches(self, job_name: str) -> bool:
        if self.count is not None and self.count <= 0:
            return False
        if self.job is not None and job_name != self.job:
            return False
        return self.job_prefix is None or job_name.startswith(self.job_prefix)


def faults_for(rules: list[FaultRule], job_name: str) -> list[Fault]:
    """The faults a new job gets, in registration order, each matching rule consuming one use."""
    found: list[Fault] = []
    for rule in rules:
        if rule.matches(job_name):
            if rule.count is not None:
                rule.count -= 1
            rule.applied.append(job_name)
            found.append(rule.fault)
    return found
