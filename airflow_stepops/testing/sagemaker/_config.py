"""Emulator settings."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EmulatorConfig:
    """How the SageMaker emulator behaves; pass fields as keywords to ``SageMakerEmulator(...)``.

    region: the region clients should use (moto serves every region; jobs run in whichever is asked).
    access_key_id / secret_access_key: the dummy credentials of ``client()``, ``env()`` and job processes.
    stop_grace_period: seconds between SIGTERM and SIGKILL when a job is stopped, times out or is
        interrupted. SageMaker waits 120 s; the default is short so tests of stopping stay fast.
    spot_restart_delay: seconds a managed spot job stays ``Interrupted`` before it restarts.
    log_flush_interval: seconds between puts of a job's output to CloudWatch Logs.
    late_log_every / late_log_delay: every Nth line of a job's output (0: none) reaches CloudWatch Logs
        ``late_log_delay`` seconds late, after lines stamped later than it (late ingestion).
    checkpoint_sync_interval: seconds between uploads of changed checkpoint files while a job runs.
    phase_delay: extra seconds spent in ``Starting`` and again in ``Downloading``, for pollers that
        want to see them (SageMaker takes minutes; the emulator none by default).
    reset_moto: wipe moto's in-process state on start, so each emulator begins empty. moto keeps its
        state per process: this also wipes any ``mock_aws`` state of the same process.
    job_root: directory for job directories; default a temporary one removed by ``stop()``.
    env: extra environment variables of every job process (the job's ``Environment`` wins).
    """

    region: str = "us-east-1"
    access_key_id: str = "testing"
    secret_access_key: str = "testing"
    stop_grace_period: float = 2.0
    spot_restart_delay: float = 0.5
    log_flush_interval: float = 0.5
    late_log_every: int = 0
    late_log_delay: float = 2.0
    checkpoint_sync_interval: float = 1.0
    phase_delay: float = 0.0
    reset_moto: bool = True
    job_root: str | None = None
    env: dict[str, str] = field(default_factory=dict)
