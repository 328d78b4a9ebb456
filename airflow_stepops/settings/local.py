"""Settings and configuration of the ``local`` flavor (a detached subprocess on the worker host)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, field_validator

from airflow_stepops.settings.base import BaseStepOperatorConfig, BaseStepOperatorSettings, EnvVars


class LocalStepOperatorSettings(BaseStepOperatorSettings):
    """Per-step options of the local flavor."""

    flavor: ClassVar[str] = "local"

    nice: int = Field(default=0, ge=0, le=19, description="Scheduling niceness added to the step process.")
    cancel_grace_period_seconds: float = Field(
        default=10.0, ge=0, description="Time between SIGTERM and SIGKILL when the step is stopped.")


class LocalStepOperatorConfig(BaseStepOperatorConfig):
    """Connection extras of a ``stepops_local`` step operator."""

    flavor: ClassVar[str] = "local"

    python: str | None = Field(
        title="Python interpreter", default=None, description="Python interpreter for steps (same major.minor as the "
        "worker, with cloudpickle); default: the worker's own.")
    jobs_dir: str | None = Field(
        title="Jobs directory", default=None, description="Directory of job state; default: "
        "$AIRFLOW_HOME/stepops/local/jobs.")
    nvidia_smi: str = Field(
        title="nvidia-smi executable", default="nvidia-smi", description="nvidia-smi executable used to discover GPUs.")
    environment: EnvVars = Field(title="Environment variables", default_factory=dict,
                                 description="Environment variables for every step of this operator.")
    job_retention_days: float = Field(
        title="Job retention (days)", default=7, ge=0, description="Job directories (state and logs) of finished "
        "steps are removed after this many days; 0 keeps them forever. Results in the artifact store are not "
        "touched.")

    @field_validator("artifact_store")
    @classmethod
    def _local_store(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value.startswith("/"):
            return "file://" + value
        if not value.startswith("file://"):
            raise ValueError(
                "the local flavor runs steps on this host and needs a file:// artifact store "
                f"(or an absolute path), got {value!r}"
            )
        return value

    def credentials_source(self) -> str:
        return "none (runs on the worker host)"
