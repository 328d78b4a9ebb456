"""Settings and configuration of the ``modal`` flavor (steps as calls of a deployed Modal function).

Field names follow ZenML's ``ModalStepOperatorSettings`` (``gpu``, ``cpu``, ``memory`` in MiB) and the
options of ``modal.App.function`` beyond (``timeout``, ``region``, ``cloud``). What Modal would refuse
when the function is created (an unknown GPU, too many GPUs of a type, too little memory, a timeout
over 24 hours) is refused here, when the DAG file is parsed.
"""

from __future__ import annotations

import math
import re
import sys
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from airflow_stepops.settings.base import BaseStepOperatorConfig, BaseStepOperatorSettings, EnvVars, matches

#: Modal's GPU types and how many of each one container may have (Modal's GPU guide). "ANY" lets Modal
#: pick among its smaller GPUs, which include the A10 (at most 4), so 4 is the most it can promise.
GPU_MAX_COUNT: dict[str, int] = {
    "T4": 8, "L4": 8, "A10": 4, "A10G": 4, "L40S": 8, "A100": 8, "A100-40GB": 8, "A100-80GB": 8,
    "RTX-PRO-6000": 8, "H100": 8, "H100!": 8, "H200": 8, "B200": 8, "B200+": 8, "ANY": 4,
}
#: ResourceSettings' GPU names (airflow_stepops.resources) to Modal's; the rest Modal does not offer
FROM_RESOURCE_GPU: dict[str, str] = {
    "T4": "T4", "L4": "L4", "A10": "A10", "A10G": "A10", "L40S": "L40S", "A100": "A100",
    "A100-80GB": "A100-80GB", "H100": "H100", "H200": "H200", "B200": "B200",
}
#: a container's smallest reservation (Modal's default request) and the largest Modal schedules
MIN_CPU, MAX_CPU = 0.125, 64.0
MIN_MEMORY_MIB, MAX_MEMORY_MIB = 128, 344_064
#: the largest ephemeral disk Modal gives a container (3 TiB), in MiB
MAX_EPHEMERAL_DISK_MIB = 3 * 2**20
#: a Modal function's timeout: 1 s to 24 h
MIN_TIMEOUT, MAX_TIMEOUT = 1, 24 * 3600
CLOUDS = ("aws", "gcp", "oci", "auto")
_REGION = re.compile(r"^[a-z]{2,}(-[a-z0-9]+)*$")
_APP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,47}$")
_OBJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_PIN = re.compile(r"^\d+\.\d+$")
MIB = 2**20
#: where the step operator's checkpoint volume is mounted in every step's container; each step's
#: STEPOPS_CHECKPOINT_DIR is a directory under it (see hooks/modal.py)
CHECKPOINT_MOUNT = "/stepops/checkpoints"


def parse_gpu(value: str, field: str = "gpu") -> tuple[str, int]:
    """``"H100:2"`` → ``("H100", 2)``, refusing what Modal would: unknown types, bad or too high counts."""
    text = value.strip()
    kind, _, count_text = text.partition(":")
    kind = kind.strip().upper()
    if kind not in GPU_MAX_COUNT:
        raise ValueError(f"{field}: unknown Modal GPU type {kind or value!r}; allowed: "
                         f"{', '.join(t.lower() if t == 'ANY' else t for t in GPU_MAX_COUNT)}, each optionally "
                         "followed by :COUNT (e.g. \"H100:2\")")
    count = 1
    if count_text:
        if not count_text.strip().isdigit() or int(count_text) < 1:
            raise ValueError(f"{field}: {value!r}: the GPU count after ':' must be a whole number >= 1")
        count = int(count_text)
    if count > GPU_MAX_COUNT[kind]:
        raise ValueError(f"{field}: {value!r}: Modal gives a container at most {GPU_MAX_COUNT[kind]} {kind} GPUs")
    return kind, count


def gpu_string(kind: str, count: int) -> str:
    name = "any" if kind == "ANY" else kind
    return name if count == 1 else f"{name}:{count}"


def _check_gpu(value: str | list[str] | None, field: str = "gpu") -> str | list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return gpu_string(*parse_gpu(value, field))
    if not value:
        raise ValueError(f"{field}: an empty list; give one GPU type, or an ordered list of types to fall back on")
    parsed = [parse_gpu(item, f"{field}[{index}]") for index, item in enumerate(value)]
    kinds = [kind for kind, _ in parsed]
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"{field}: {value!r} names a GPU type twice; a fallback list is an order of preference")
    return [gpu_string(kind, count) for kind, count in parsed]


def _check_region(value: str | list[str] | None, field: str = "region") -> str | list[str] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    if not items:
        raise ValueError(f"{field}: an empty list; name at least one region, or leave it unset")
    for item in items:
        if not _REGION.match(item):
            raise ValueError(f"{field}: {item!r} is not a Modal region (e.g. \"us-east\", \"eu-west\", \"us\", "
                             "\"us-east-1\")")
    return value


class ModalStepOperatorSettings(BaseStepOperatorSettings):
    """Per-step options of the modal flavor: those of ``@app.function`` that shape a container."""

    flavor: ClassVar[str] = "modal"
    resources_checkable_alone: ClassVar[bool] = True

    gpu: str | list[str] | None = Field(
        default=None, description='GPU: "T4", "A100-80GB", "H100:2", "any", or an ordered list to fall back '
        "on (Modal picks the first it has capacity for); default: from ResourceSettings, else none.")
    cpu: float | None = Field(default=None, ge=MIN_CPU, le=MAX_CPU,
                              description="Physical CPU cores reserved (fractions allowed).")
    memory: int | None = Field(default=None, description="Memory reserved, in MiB (128 to 344064).")
    ephemeral_disk: int | None = Field(default=None, gt=0, le=MAX_EPHEMERAL_DISK_MIB, description="Ephemeral "
                                       "disk in MiB, at most 3 TiB (default: ResourceSettings.disk_size, else "
                                       "Modal's default).")
    timeout: int | None = Field(default=None, description="Seconds before Modal stops the call (at most 24 h); same as "
                                "max_runtime_in_seconds.")
    region: str | list[str] | None = Field(default=None, description='Region(s) to run in, e.g. "us-east".')
    cloud: Literal["aws", "gcp", "oci", "auto"] | None = Field(default=None, description="Cloud provider.")
    nonpreemptible: bool = Field(default=False, description="Run on capacity Modal does not preempt (costs "
                                 "more); by default a preempted call is restarted by Modal.")

    @field_validator("gpu")
    @classmethod
    def _gpu(cls, value: str | list[str] | None) -> str | list[str] | None:
        return _check_gpu(value)

    @field_validator("region")
    @classmethod
    def _region(cls, value: str | list[str] | None) -> str | list[str] | None:
        return _check_region(value)

    @field_validator("memory", "ephemeral_disk", mode="before")
    @classmethod
    def _mib(cls, value: Any, info: Any) -> Any:
        """``memory="16GB"`` is a natural slip (ResourceSettings takes sizes): name the unit and the number."""
        if not isinstance(value, str) or value.strip().isdigit():
            return value
        from airflow_stepops.resources import parse_size

        resource = {"memory": "memory", "ephemeral_disk": "disk_size"}[info.field_name]
        try:
            mib = math.ceil(parse_size(value, field=info.field_name) / MIB)
        except ValueError:
            raise ValueError(f"{info.field_name}: Modal's {info.field_name} is a whole number of MiB, got {value!r}") \
                from None
        raise ValueError(f"{info.field_name}: Modal's {info.field_name} is a number of MiB, not a size string; "
                         f"{value!r} is {mib} MiB: use {info.field_name}={mib}, or ResourceSettings({resource}={value!r})")

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: int | None) -> int | None:
        if value is not None and not MIN_MEMORY_MIB <= value <= MAX_MEMORY_MIB:
            raise ValueError(f"memory: {value} MiB; Modal reserves {MIN_MEMORY_MIB} MiB (its minimum) to "
                             f"{MAX_MEMORY_MIB} MiB for a container (the value is in MiB: 16384 is 16 GiB)")
        return value

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, value: int | None) -> int | None:
        if value is not None and not MIN_TIMEOUT <= value <= MAX_TIMEOUT:
            raise ValueError(f"timeout: {value} s; a Modal function's timeout is {MIN_TIMEOUT} s to {MAX_TIMEOUT} s "
                             "(24 h)")
        return value

    @model_validator(mode="after")
    def _one_timeout(self) -> ModalStepOperatorSettings:
        runtime = self.max_runtime_in_seconds
        if runtime is not None and runtime > MAX_TIMEOUT:
            raise ValueError(f"max_runtime_in_seconds: {runtime} is over Modal's longest function timeout, "
                             f"{MAX_TIMEOUT} s (24 h)")
        if runtime is not None and self.timeout is not None and runtime != self.timeout:
            raise ValueError(f"timeout={self.timeout} and max_runtime_in_seconds={runtime}: they are the same "
                             "limit; give one")
        return self

    def check_resources(self, resources: Any) -> None:
        self.function_resources(resources)

    def function_resources(self, resources: Any) -> dict[str, Any]:
        """``gpu``/``cpu``/``memory``/``ephemeral_disk`` of the step's function: the settings where given,
        else ResourceSettings mapped onto Modal's knobs. Raises ``ValueError`` naming the field."""
        out: dict[str, Any] = {"gpu": self.gpu if self.gpu is not None else resource_gpu(resources),
                               "cpu": self.cpu, "memory": self.memory, "ephemeral_disk": self.ephemeral_disk}
        if self.gpu is not None and resources.wants_gpu:
            wanted = resource_gpu(resources)
            first = self.gpu[0] if isinstance(self.gpu, list) else self.gpu
            kind, count = parse_gpu(first)
            want_kind, want_count = parse_gpu(wanted) if wanted else ("ANY", 0)
            if count != want_count or (resources.gpu_type is not None and kind != want_kind):
                raise ValueError(f"gpu: {self.gpu!r} and ResourceSettings(gpu_count={resources.gpu_count}, "
                                 f"gpu_type={resources.gpu_type!r}) ask for different GPUs; give them once")
        if self.cpu is None and resources.cpu_count is not None:
            if not MIN_CPU <= resources.cpu_count <= MAX_CPU:
                raise ValueError(f"resources.cpu_count: Modal reserves {MIN_CPU} to {MAX_CPU:g} cores, got "
                                 f"{resources.cpu_count}")
            out["cpu"] = float(resources.cpu_count)
        if self.memory is None and resources.memory_bytes is not None:
            mib = math.ceil(resources.memory_bytes / MIB)
            if not MIN_MEMORY_MIB <= mib <= MAX_MEMORY_MIB:
                raise ValueError(f"resources.memory: Modal reserves {MIN_MEMORY_MIB} MiB to {MAX_MEMORY_MIB} MiB, "
                                 f"got {resources.memory} ({mib} MiB)")
            out["memory"] = mib
        if self.ephemeral_disk is None and resources.disk_bytes is not None:
            mib = math.ceil(resources.disk_bytes / MIB)
            if mib > MAX_EPHEMERAL_DISK_MIB:
                raise ValueError(f"resources.disk_size: Modal gives a container at most 3 TiB of ephemeral disk, "
                                 f"got {resources.disk_size}")
            out["ephemeral_disk"] = mib
        return out

    @property
    def effective_timeout(self) -> int | None:
        return self.timeout or self.max_runtime_in_seconds


def resource_gpu(resources: Any) -> str | None:
    """ResourceSettings as Modal's GPU string: type and count → "H100:2"; a count alone → "any:N"."""
    if not resources.wants_gpu:
        return None
    count = resources.effective_gpu_count
    if resources.gpu_type is None:
        if count > GPU_MAX_COUNT["ANY"]:
            raise ValueError(f"resources.gpu_count: {count} GPUs without a gpu_type become Modal's gpu=\"any:"
                             f"{count}\"; \"any\" promises at most {GPU_MAX_COUNT['ANY']} (name a gpu_type for more)")
        return gpu_string("ANY", count)
    kind = FROM_RESOURCE_GPU.get(resources.gpu_type)
    if kind is None:
        raise ValueError(f"resources.gpu_type: Modal has no {resources.gpu_type} GPUs; Modal offers "
                         f"{', '.join(sorted(set(FROM_RESOURCE_GPU.values())))}")
    if count > GPU_MAX_COUNT[kind]:
        raise ValueError(f"resources.gpu_count: Modal gives a container at most {GPU_MAX_COUNT[kind]} "
                         f"{resources.gpu_type} GPUs, got {count}")
    return gpu_string(kind, count)


def default_python_version() -> str:
    return "{}.{}".format(*sys.version_info[:2])


class ModalStepOperatorConfig(BaseStepOperatorConfig):
    """Connection extras of a ``stepops_modal`` step operator."""

    flavor: ClassVar[str] = "modal"

    modal_conn_id: str | None = Field(
        title="Modal connection id", default="modal_default", description="modal provider connection (token id and "
        "secret); without it, Modal's own MODAL_TOKEN_ID/MODAL_TOKEN_SECRET or ~/.modal.toml.")
    environment: str | None = Field(title="Modal environment",
                                    default=None, description="Modal environment (default: the modal "
                                    "connection's, else Modal's own default).")
    app_name: str = Field(title="App name prefix",
                          default="airflow-stepops", description="Prefix of the Modal apps steps run in "
                          "(one deployed app per image and set of function options).")
    image: str | None = Field(default=None, description="Registry image of the steps (needs Python and "
                              "cloudpickle); default: Modal's debian_slim with python_version.")
    python_version: str | None = Field(
        title="Python version", default=None, description="Python of the default image (default: the worker's, which "
        "the bundle needs); with image, the image's Python when it has none of its own (add_python).")
    pip_packages: list[str] = Field(
        title="pip packages", default_factory=list, description="pip packages added to the image.")
    secrets: list[str] = Field(title="Modal secrets",
                               default_factory=list, description="Modal secrets (names) every step gets as "
                               "environment variables.")
    volumes: dict[str, str] = Field(
        title="Modal volumes", default_factory=dict, description="Modal volumes to mount: path → volume name.")
    checkpoint_volume: str | None = Field(title="Checkpoint volume",
                                          default=None, description="Modal volume (created if missing) mounted "
                                          f"at {CHECKPOINT_MOUNT} that holds each step's STEPOPS_CHECKPOINT_DIR "
                                          "(default: <app_name>-checkpoints).")
    region: str | list[str] | None = Field(default=None, description="Default region(s) of the steps.")
    cloud: Literal["aws", "gcp", "oci", "auto"] | None = Field(default=None, description="Default cloud.")
    environment_variables: EnvVars = Field(title="Environment variables", default_factory=dict,
                                           description="Environment of every step (no secrets: use Modal secrets).")
    console_url_template: str = Field(
        title="Console URL template", default="https://modal.com/id/{call_id}", description="Link to a step's call "
        "({call_id}, {app_name}, {function_id}, {environment}).")

    _app_name = matches(
        "app_name", _APP_NAME, "a Modal app name prefix (1-48 letters, digits, '.', '_' and '-', starting with a "
        "letter or digit)")

    @field_validator("python_version")
    @classmethod
    def _python(cls, value: str | None) -> str | None:
        if value is not None and not _PIN.match(value):
            raise ValueError(f"python_version: expected MAJOR.MINOR such as \"3.11\", got {value!r}")
        return value

    @field_validator("secrets")
    @classmethod
    def _secrets(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _OBJECT_NAME.match(name):
                raise ValueError(f"secrets: {name!r} is not a Modal secret name")
        return value

    @field_validator("volumes")
    @classmethod
    def _volumes(cls, value: dict[str, str]) -> dict[str, str]:
        for path, name in value.items():
            if not path.startswith("/") or path.rstrip("/") in ("", "/root", "/tmp"):
                raise ValueError(f"volumes: {path!r} is not a mount path Modal allows (absolute, not /, /root or "
                                 "/tmp)")
            if not _OBJECT_NAME.match(name):
                raise ValueError(f"volumes[{path!r}]: {name!r} is not a Modal volume name")
            inner, outer = path.rstrip("/") + "/", CHECKPOINT_MOUNT + "/"
            if inner.startswith(outer) or outer.startswith(inner):
                raise ValueError(f"volumes: {path!r} overlaps {CHECKPOINT_MOUNT}, where the checkpoint volume is "
                                 "mounted (name it with checkpoint_volume instead)")
        return value

    _checkpoint_volume = matches(
        "checkpoint_volume", _OBJECT_NAME, "a Modal volume name (1-64 letters, digits, '.', '_' and '-', starting "
        "with a letter or digit)")

    @model_validator(mode="after")
    def _checkpoint_volume_once(self) -> ModalStepOperatorConfig:
        if self.checkpoint_volume_name in self.volumes.values():
            raise ValueError(f"volumes: {self.checkpoint_volume_name!r} is the checkpoint volume, mounted at "
                             f"{CHECKPOINT_MOUNT} already; do not mount it a second time")
        return self

    @property
    def checkpoint_volume_name(self) -> str:
        """The volume of every step's STEPOPS_CHECKPOINT_DIR: one per step operator (its app name prefix)."""
        return self.checkpoint_volume or f"{self.app_name}-checkpoints"

    @field_validator("region")
    @classmethod
    def _region(cls, value: str | list[str] | None) -> str | list[str] | None:
        return _check_region(value)

    def credentials_source(self) -> str:
        if self.modal_conn_id:
            return f"modal connection {self.modal_conn_id!r}"
        return "Modal's own token (MODAL_TOKEN_ID / ~/.modal.toml)"
