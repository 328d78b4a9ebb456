"""Settings and configuration of the ``vertex`` flavor (steps as Vertex AI CustomJobs).

Field names follow ZenML's ``VertexStepOperatorSettings`` (``machine_type``, ``accelerator_type``,
``accelerator_count``, ``boot_disk_type``, ``disk_size_gb``, ``use_preemptible``) and the CustomJob
API beyond. Machine / accelerator combinations are checked here, at parse time, against the table in
``vertex_machines``.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from airflow_stepops.settings.base import BaseStepOperatorConfig, ContainerStepSettings, EnvVars, checked_by, matches

#: Labels (https://cloud.google.com/resource-manager/docs/labels-overview#requirements, linked from the
#: CustomJob.labels reference): at most 64 per resource; keys 1-63 characters starting with a lowercase or
#: international letter, values 0-63; only lowercase letters, digits, '_' and '-', international
#: characters allowed. (The CustomJob proto says "no longer than 64": the stricter 63 is used.)
MAX_LABEL_CHARS = 63
MAX_LABELS = 64
#: Unicode categories of label characters besides digits, '_' and '-': lowercase and caseless letters
_LABEL_LETTERS = ("Ll", "Lo", "Lm")
#: EnvVar.name "Must be a valid C identifier" (google.cloud.aiplatform.v1.EnvVar)
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: label keys the flavor sets itself (the step's identity, for exactly-once look-ups)
LABEL_PREFIX = "stepops-"
LOCATION = re.compile(r"^[a-z]+-[a-z]+\d+$")
PROJECT = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
MIN_DISK_GB, MAX_DISK_GB = 100, 64000
#: CustomJob's longest scheduling.timeout (7 days)
MAX_TIMEOUT_SECONDS = 7 * 24 * 3600
#: ZenML's default, and what a step with no ResourceSettings gets
DEFAULT_MACHINE_TYPE = "n1-standard-4"


def _label_text(text: str, *, key: bool) -> bool:
    import unicodedata

    def letter(ch: str) -> bool:
        return unicodedata.category(ch) in _LABEL_LETTERS

    return (1 if key else 0) <= len(text) <= MAX_LABEL_CHARS and (not key or letter(text[0])) \
        and all(letter(ch) or ch in "_-" or unicodedata.category(ch) == "Nd" for ch in text)


def check_labels(labels: dict[str, str], field: str, *, reserved: bool = True) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise ValueError(f"{field}: at most {MAX_LABELS} labels, got {len(labels)}")
    for key, value in labels.items():
        if not _label_text(key, key=True):
            raise ValueError(f"{field}: {key!r} is not a valid label key (1-{MAX_LABEL_CHARS} lowercase letters, "
                             "digits, '_' and '-', starting with a letter)")
        if reserved and key.startswith(LABEL_PREFIX):
            raise ValueError(f"{field}: {key!r}: keys starting with {LABEL_PREFIX!r} are the step operator's own")
        if not _label_text(value, key=False):
            raise ValueError(f"{field}[{key!r}]: {value!r} is not a valid label value (at most {MAX_LABEL_CHARS} "
                             "lowercase letters, digits, '_' and '-')")
    return labels


class _VertexChecks(BaseModel):
    """Checks shared by the step settings and the step operator's defaults (same field names)."""

    @field_validator("accelerator_type", check_fields=False)
    @classmethod
    def _accelerator(cls, value: str | None) -> str | None:
        from airflow_stepops.settings.vertex_machines import accelerator_enum

        return None if value is None else accelerator_enum(value)

    _labels = checked_by(check_labels, "labels")

    @field_validator("environment", mode="before", check_fields=False)
    @classmethod
    def _c_identifiers(cls, value: Any) -> Any:
        """Before the field's type, so this flavor's narrower rule is the one named."""
        bad = [n for n in value if isinstance(n, str) and not ENV_NAME.match(n)] if isinstance(value, dict) else []
        if bad:
            raise ValueError(f"environment: {bad[0]!r}: Vertex AI takes C identifiers as variable names "
                             "(letters, digits and '_', not starting with a digit)")
        return value

    @model_validator(mode="after")
    def _machine(self) -> Any:
        from airflow_stepops.settings.vertex_machines import ACCELERATORS, check_machine, machine_hint

        machine, acc, count = (getattr(self, n, None) for n in ("machine_type", "accelerator_type",
                                                                "accelerator_count"))
        if machine is not None:
            check_machine(machine, acc, count)
        elif acc is not None and acc not in ACCELERATORS.values():  # TPUs and others no machine is chosen for
            raise ValueError(f"machine_type: required with accelerator_type={acc}; {machine_hint(acc)}")
        elif count and acc is None:
            raise ValueError(f"accelerator_count={count} without accelerator_type or machine_type: name the "
                             "accelerator, or ask for GPUs with ResourceSettings(gpu_count=..., gpu_type=...)")
        return self


class VertexStepOperatorSettings(ContainerStepSettings, _VertexChecks):
    """Per-step options of the vertex flavor."""

    flavor: ClassVar[str] = "vertex"

    machine_type: str | None = Field(
        default=None, description="e.g. n1-standard-8, a2-highgpu-1g; default: the smallest that fits "
        "ResourceSettings.")
    accelerator_type: str | None = Field(
        default=None, description="Vertex accelerator enum (NVIDIA_TESLA_T4, NVIDIA_L4, ...) or GPU name (T4, A100).")
    accelerator_count: int | None = Field(default=None, ge=0, description="Accelerators per replica.")
    boot_disk_type: Literal["pd-ssd", "pd-standard", "hyperdisk-balanced"] | None = Field(
        default=None, description="Boot disk type (Vertex's default: pd-ssd).")
    disk_size_gb: int | None = Field(
        default=None, ge=MIN_DISK_GB, le=MAX_DISK_GB, description="Boot disk size in GB (default: "
        "ResourceSettings.disk_size, else 100).")
    use_spot: bool = Field(default=False, description="Scheduling strategy SPOT (cheaper, can be preempted).")
    use_preemptible: bool = Field(default=False, description="Same as use_spot (ZenML's name).")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels of the CustomJob.")
    max_runtime_in_seconds: int | None = Field(
        default=None, gt=0, le=MAX_TIMEOUT_SECONDS,
        description="scheduling.timeout: Vertex stops the job after this long (at most 7 days).")

    @property
    def spot(self) -> bool:
        return self.use_spot or self.use_preemptible

    def machine_for(self, resources: Any, default: Any = None) -> Any:
        """The machine (type, accelerator, count) of this step: ``machine_type`` if set; else the smallest
        that fits ResourceSettings and ``accelerator_type``/``accelerator_count``; else the step
        operator's default (a ``MachineChoice``) when it fits; else n1-standard-4."""
        from airflow_stepops.resources import ResourceSettings
        from airflow_stepops.settings.vertex_machines import ACCELERATORS, check_machine, choose_machine, fits

        if self.machine_type is not None:
            choice = check_machine(self.machine_type, self.accelerator_type, self.accelerator_count)
            if not fits(choice, resources):
                raise ValueError(f"machine_type: {choice.describe()} does not have the resources the step asks "
                                 f"for ({resources.model_dump(exclude_none=True)})")
            return choice
        if self.accelerator_type is not None:
            names = {v: k for k, v in ACCELERATORS.items()}
            if resources.gpu_type and ACCELERATORS.get(resources.gpu_type) != self.accelerator_type:
                raise ValueError(f"accelerator_type={self.accelerator_type} and resources.gpu_type="
                                 f"{resources.gpu_type} disagree")
            count = self.accelerator_count or resources.gpu_count or 1
            if resources.gpu_count and self.accelerator_count and resources.gpu_count != self.accelerator_count:
                raise ValueError(f"accelerator_count={self.accelerator_count} and resources.gpu_count="
                                 f"{resources.gpu_count} disagree")
            resources = ResourceSettings(**{**resources.model_dump(), "gpu_type": names[self.accelerator_type],
                                            "gpu_count": count})
            return choose_machine(resources)
        if default is not None and (resources.empty or fits(default, resources)):
            return default
        if resources.empty:
            return check_machine(DEFAULT_MACHINE_TYPE, None, None)
        return choose_machine(resources)

    def check_resources(self, resources: Any) -> None:
        self.machine_for(resources)
        if self.disk_size_gb is not None and resources.disk_bytes and self.disk_size_gb * 10**9 < resources.disk_bytes:
            raise ValueError(f"disk_size_gb={self.disk_size_gb} is smaller than resources.disk_size="
                             f"{resources.disk_size}")


class VertexStepOperatorConfig(BaseStepOperatorConfig, _VertexChecks):
    """Connection extras of a ``stepops_vertex`` step operator."""

    flavor: ClassVar[str] = "vertex"

    gcp_conn_id: str = Field(title="Google connection id",
                             default="google_cloud_default", description="Google provider connection with the "
                             "credentials.")
    project: str | None = Field(default=None, description="GCP project (default: the google connection's).")
    location: str = Field(description="Vertex AI region, e.g. us-central1.")
    image: str | None = Field(default=None, description="Container image URI, with the workers' Python (default: "
                              "python:<major.minor>-slim; cloudpickle is installed when missing).")
    service_account: str | None = Field(
        title="Service account", default=None, description="Service account the job runs as.")
    network: str | None = Field(
        title="VPC network", default=None, description="VPC network to peer, projects/<number>/global/networks/<name>.")
    reserved_ip_ranges: list[str] = Field(
        title="Reserved IP ranges", default_factory=list, description="Reserved IP ranges of the network.")
    encryption_spec_key_name: str | None = Field(
        title="KMS key (CMEK)", default=None, description="Cloud KMS key (CMEK) of the job.")
    persistent_resource_id: str | None = Field(
        title="Persistent resource id", default=None, description="Run on this persistent resource.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels of every CustomJob.")
    environment: EnvVars = Field(
        title="Environment variables", default_factory=dict, description="Environment of every step (no secrets).")
    machine_type: str | None = Field(
        title="Default machine type", default=None, description="Default machine type of this step operator.")
    accelerator_type: str | None = Field(
        title="Default accelerator", default=None, description="Default accelerator of this step operator.")
    accelerator_count: int | None = Field(
        title="Default accelerator count", default=None, ge=0, description="Default accelerator count.")
    api_endpoint: str | None = Field(title="Vertex API endpoint",
                                     default=None, description="Vertex API endpoint (default: "
                                     "<location>-aiplatform.googleapis.com).")
    logging_endpoint: str | None = Field(title="Cloud Logging endpoint",
                                         default=None, description="Cloud Logging endpoint (default: "
                                         "logging.googleapis.com).")
    api_timeout_seconds: float = Field(
        title="API call timeout (s)", default=30.0, gt=0, le=300, description="Seconds one call to Vertex AI or Cloud "
        "Logging may take; transient failures are retried for up to four times this long.")
    log_settle_seconds: float = Field(
        title="Log settle time (s)",
        default=10.0, ge=0, le=60, description="Seconds to wait after a job ends for Cloud Logging to take in its "
        "last lines (entries may arrive late; entries:tail buffers up to 60 s for them).")
    console_url_template: str = Field(
        title="Console URL template",
        default="https://console.cloud.google.com/vertex-ai/locations/{location}/training/{job_id}/cpu?project="
        "{project}", description="Console link template ({location}, {job_id}, {project}).")

    _location = matches("location", LOCATION, "a Vertex AI region (e.g. us-central1, europe-west4)")

    _project = matches(
        "project", PROJECT, "a GCP project id (6-30 lowercase letters, digits and '-', starting with a letter)")

    @field_validator("artifact_store")
    @classmethod
    def _gcs_store(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^gs://([A-Za-z0-9_.-]+@)?[a-z0-9][a-z0-9._-]{1,221}[a-z0-9](/.*)?$", value):
            raise ValueError(f"artifact_store: Vertex reads and writes Cloud Storage through /gcs/<bucket>; expected "
                             f"gs://bucket/prefix (or gs://<google conn id>@bucket/prefix), got {value!r}")
        return value

    @field_validator("service_account")
    @classmethod
    def _sa(cls, value: str | None) -> str | None:
        if value is not None and "@" not in value:
            raise ValueError(f"service_account: {value!r} is not a service account email (name@project.iam."
                             "gserviceaccount.com)")
        return value

    @field_validator("encryption_spec_key_name")
    @classmethod
    def _kms(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/]+$",
                                              value):
            raise ValueError(f"encryption_spec_key_name: {value!r} is not a Cloud KMS key name (projects/<p>/"
                             "locations/<l>/keyRings/<ring>/cryptoKeys/<key>)")
        return value

    @model_validator(mode="after")
    def _ranges(self) -> VertexStepOperatorConfig:
        if self.reserved_ip_ranges and not self.network:
            raise ValueError("reserved_ip_ranges: only used with network")
        return self

    def credentials_source(self) -> str:
        return f"google connection {self.gcp_conn_id!r}" + (f", project {self.project}" if self.project else "")
