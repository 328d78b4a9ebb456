"""Hardware a step asks for, independent of the backend that provides it.

Field names follow ZenML's ``ResourceSettings`` so DAGs written from its docs work unchanged; every
flavor maps these fields onto its own knobs (requests/limits, instance types, accelerators, ...).
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "PB": 10**15,
    "K": 2**10,
    "KI": 2**10,
    "KIB": 2**10,
    "M": 2**20,
    "MI": 2**20,
    "MIB": 2**20,
    "G": 2**30,
    "GI": 2**30,
    "GIB": 2**30,
    "T": 2**40,
    "TI": 2**40,
    "TIB": 2**40,
    "PI": 2**50,
    "PIB": 2**50,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_UNITS_HELP = "B, KB, MB, GB, TB, PB (powers of 1000) and KiB, MiB, GiB, TiB, PiB or K, M, G, T (powers of 1024)"
SIZE_FORMAT_HELP = f'a size such as "512MiB", "32GB", "1.5TB" or a number of bytes; units: {_UNITS_HELP}'
#: ZenML's newer names for fields this model spells the way ZenML's step operator docs do
_ZENML_NAMES = {"accelerator_count": "gpu_count", "accelerator": "gpu_type",
                "instance_type": "the flavor's own settings (e.g. instance_type of SageMaker's)"}

# Canonical GPU model names and the spellings users bring from the clouds' own APIs.
GPU_TYPES: dict[str, tuple[str, ...]] = {
    "T4": ("NVIDIA_TESLA_T4", "TESLA_T4", "NVIDIA-TESLA-T4"),
    "L4": ("NVIDIA_L4", "NVIDIA-L4"),
    "A10": ("NVIDIA_A10",),
    "A10G": ("NVIDIA_A10G",),
    "L40S": ("NVIDIA_L40S",),
    "V100": ("NVIDIA_TESLA_V100", "TESLA_V100", "NVIDIA-TESLA-V100"),
    "P100": ("NVIDIA_TESLA_P100", "TESLA_P100"),
    "P4": ("NVIDIA_TESLA_P4", "TESLA_P4"),
    "K80": ("NVIDIA_TESLA_K80", "TESLA_K80"),
    "A100": ("NVIDIA_TESLA_A100", "A100-40GB", "NVIDIA_A100_40GB", "NVIDIA-TESLA-A100"),
    "A100-80GB": ("NVIDIA_A100_80GB", "A100_80GB", "NVIDIA-A100-80GB"),
    "H100": ("NVIDIA_H100_80GB", "H100-80GB", "NVIDIA_H100", "NVIDIA-H100-80GB"),
    "H200": ("NVIDIA_H200_141GB", "NVIDIA_H200"),
    "B200": ("NVIDIA_B200",),
}
_GPU_ALIASES: dict[str, str] = {
    alias.upper(): name for name, aliases in GPU_TYPES.items() for alias in (name, *aliases)
}


@lru_cache(maxsize=1024)
def parse_size(value: str | int | float, *, field: str = "size") -> int:
    """Return a size in bytes; raise ``ValueError`` naming ``field`` and the accepted format."""
    if isinstance(value, bool):
        raise ValueError(f"{field}: expected {SIZE_FORMAT_HELP}, got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        match = _SIZE_RE.match(str(value))
        if not match:
            raise ValueError(f"{field}: expected {SIZE_FORMAT_HELP}, got {value!r}")
        number, unit = float(match.group(1)), match.group(2).upper()
    if unit not in _SIZE_UNITS:
        raise ValueError(f"{field}: unknown unit {unit!r} in {value!r}; expected {SIZE_FORMAT_HELP}")
    if number <= 0 or not math.isfinite(number):
        raise ValueError(f"{field}: must be greater than zero, got {value!r}")
    return int(number * _SIZE_UNITS[unit])


def normalize_gpu_type(value: str) -> str:
    """Return the canonical GPU name for any known spelling, or raise listing the known ones."""
    canonical = _GPU_ALIASES.get(value.strip().upper().replace(" ", ""))
    if canonical is None:
        raise ValueError(f"gpu_type: unknown GPU type {value!r}; allowed: {', '.join(GPU_TYPES)}")
    return canonical


class ResourceSettings(BaseModel):
    """CPU, memory, GPU and disk one step needs; every flavor honours all of them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu_count: float | None = Field(default=None, gt=0, description="CPU cores (fractions allowed).")
    memory: str | None = Field(default=None, description='Memory, e.g. "32GB" or "512MiB".')
    gpu_count: int | None = Field(default=None, ge=0, strict=True, description="Whole GPUs, >= 0.")
    gpu_type: str | None = Field(default=None, description='GPU model, e.g. "A100", "T4", "H100".')
    disk_size: str | None = Field(default=None, description='Local disk, e.g. "100GB".')

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        unknown = [key for key in data if key not in cls.model_fields] if isinstance(data, dict) else []
        if unknown:
            hints = "".join(f"; for {k!r} use {_ZENML_NAMES[k]}" for k in unknown if k in _ZENML_NAMES)
            raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))} of ResourceSettings; allowed: "
                             f"{', '.join(cls.model_fields)}{hints}")
        return data

    @field_validator("gpu_count", mode="before")
    @classmethod
    def _whole_gpus(cls, value: Any) -> Any:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, (float, bool, str)):
            raise ValueError("gpu_count must be a whole number >= 0 written as an int, e.g. gpu_count=1 "
                             "(not a string or a fraction)")
        return value

    @field_validator("memory", "disk_size", mode="before")
    @classmethod
    def _valid_size(cls, value: Any, info: Any) -> Any:
        if value is None:
            return None
        match = _SIZE_RE.match(value) if isinstance(value, str) else None
        if (not isinstance(value, bool) and isinstance(value, (int, float))) or (match and not match.group(2)):
            # ZenML's format is a number with a unit; a bare number would mean bytes and starve the step
            number, name = str(value).strip(), info.field_name
            raise ValueError(f"{name}={value!r} has no unit (it would mean {number} bytes); write the unit as ZenML "
                             f'does, e.g. {name}="{number}GB" or {name}="{number}MiB" (units: {_UNITS_HELP})')
        parse_size(value, field=info.field_name)
        return str(value)

    @field_validator("gpu_type")
    @classmethod
    def _known_gpu(cls, value: str | None) -> str | None:
        return None if value is None else normalize_gpu_type(value)

    @model_validator(mode="after")
    def _gpu_type_needs_gpus(self) -> ResourceSettings:
        if self.gpu_type is not None and self.gpu_count == 0:
            raise ValueError(f"gpu_type={self.gpu_type!r} with gpu_count=0: ask for at least one GPU or drop gpu_type")
        return self

    @property
    def memory_bytes(self) -> int | None:
        return None if self.memory is None else parse_size(self.memory, field="memory")

    @property
    def disk_bytes(self) -> int | None:
        return None if self.disk_size is None else parse_size(self.disk_size, field="disk_size")

    def get_memory(self, unit: str = "GiB") -> float | None:
        """Memory in ``unit`` (ZenML's helper of the same name)."""
        total = self.memory_bytes
        return None if total is None else total / _SIZE_UNITS[unit.upper()]

    @property
    def wants_gpu(self) -> bool:
        return bool(self.gpu_count) or self.gpu_type is not None

    @property
    def effective_gpu_count(self) -> int:
        """GPUs to allocate: ``gpu_type`` alone means one GPU of that type."""
        if self.gpu_count is not None:
            return self.gpu_count
        return 1 if self.gpu_type else 0

    @property
    def empty(self) -> bool:
        return all(getattr(self, name) is None for name in type(self).model_fields)
