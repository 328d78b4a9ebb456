"""Which accelerators a CustomJob's machine may carry, as Google publishes it (not the hook's table).

Sources, encoded here on their own terms:
- Compute Engine, "GPU machine types" (https://cloud.google.com/compute/docs/gpus): N1 general-purpose VMs
  take T4, P4, V100 or P100 GPUs, each count up to a vCPU and a memory ceiling (the "N1 + GPU" tables).
- Compute Engine, "Accelerator-optimized machine family"
  (https://cloud.google.com/compute/docs/accelerator-optimized-machines): A2, A3 and A4 types name their GPU
  count in the type (``a2-highgpu-4g``: 4 x A100 40GB); G2 types carry 1, 2, 4 or 8 L4s by size.
- Vertex AI, "Configure compute resources for custom training"
  (https://cloud.google.com/vertex-ai/docs/training/configure-compute#specifying_gpus): other general-purpose
  families (E2, N2, C2, ...) take no GPUs; K80s have reached end of support.
- The errors Vertex answers: ``Accelerator "NVIDIA_TESLA_K80" is not supported for machine type
  "n1-standard-4"`` (GoogleCloudPlatform/vertex-ai-samples#213) and ``Both `accelerator_type` and
  `accelerator_count` should be specified or none.`` on ``machine_spec.accelerator_type``
  (PrefectHQ/prefect-gcp#175). The text for a wrong count is not quoted anywhere; ours names the field.
Families none of these pages cover (TPU hosts, ...) are accepted unchecked.
"""

from __future__ import annotations

import re
from typing import Any

#: N1 + GPU: GPU -> (count, most vCPUs, most memory in GB) rows of Compute Engine's tables
_N1_GPU_ROWS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "NVIDIA_TESLA_T4": ((1, 48, 312), (2, 48, 312), (4, 96, 624)),
    "NVIDIA_TESLA_P4": ((1, 24, 156), (2, 48, 312), (4, 96, 624)),
    "NVIDIA_TESLA_V100": ((1, 12, 78), (2, 24, 156), (4, 48, 312), (8, 96, 624)),
    "NVIDIA_TESLA_P100": ((1, 16, 104), (2, 32, 208), (4, 64, 208)),
}
#: memory per vCPU of the N1 shapes (Compute Engine, "General-purpose machine family")
_N1_GB_PER_VCPU = {"standard": 3.75, "highmem": 6.5, "highcpu": 0.9}
#: accelerator-optimized families: ``<family>-<kind>-<count>g`` -> the GPU they carry
_OPTIMIZED_GPU = {("a2", "highgpu"): "NVIDIA_TESLA_A100", ("a2", "megagpu"): "NVIDIA_TESLA_A100",
                  ("a2", "ultragpu"): "NVIDIA_A100_80GB", ("a3", "highgpu"): "NVIDIA_H100_80GB",
                  ("a3", "edgegpu"): "NVIDIA_H100_80GB", ("a3", "megagpu"): "NVIDIA_H100_MEGA_80GB",
                  ("a3", "ultragpu"): "NVIDIA_H200_141GB", ("a4", "highgpu"): "NVIDIA_B200",
                  ("a4x", "highgpu"): "NVIDIA_GB200"}
#: G2 sizes with more than one L4; every other g2-standard size has one
_G2_L4S = {24: 2, 48: 4, 96: 8}
_GENERAL_PURPOSE = {"e2", "n2", "n2d", "n4", "c2", "c2d", "c3", "c3d", "c4", "m1", "m2", "m3", "t2d", "t2a"}
_TYPE = re.compile(r"^(?P<family>[a-z][a-z0-9]*)-(?P<kind>[a-z]+)-(?P<size>\d+)(?P<g>g?)$")


def machine_spec_errors(spec: dict[str, Any], where: str) -> list[tuple[str, str]]:
    """Vertex's field errors for one ``machineSpec`` (camelCase JSON, enum names)."""
    machine = spec.get("machineType") or ""
    accelerator = spec.get("acceleratorType") or "ACCELERATOR_TYPE_UNSPECIFIED"
    count = int(spec.get("acceleratorCount") or 0)
    if (accelerator == "ACCELERATOR_TYPE_UNSPECIFIED") != (count == 0):
        return [(f"{where}.accelerator_type", "Both `accelerator_type` and `accelerator_count` should be "
                                              "specified or none.")]
    if count == 0 or not machine:
        return []
    unsupported = [(f"{where}.accelerator_type",
                    f'Accelerator "{accelerator}" is not supported for machine type "{machine}"')]
    if accelerator == "NVIDIA_TESLA_K80":
        return unsupported
    shape = _TYPE.match(machine)
    if shape is None:
        return []
    family, kind, size = shape["family"], shape["kind"], int(shape["size"])
    if (family, kind) in _OPTIMIZED_GPU:
        if _OPTIMIZED_GPU[family, kind] != accelerator:
            return unsupported
        return [] if count == size else _wrong_count(where, machine, accelerator, count)
    if (family, kind) == ("g2", "standard"):
        if accelerator != "NVIDIA_L4":
            return unsupported
        return [] if count == _G2_L4S.get(size, 1) else _wrong_count(where, machine, accelerator, count)
    if family == "n1" and kind in _N1_GB_PER_VCPU:
        rows = {n: (cpus, gb) for n, cpus, gb in _N1_GPU_ROWS.get(accelerator, ())}
        if not rows:
            return unsupported
        if count not in rows or size > rows[count][0] or size * _N1_GB_PER_VCPU[kind] > rows[count][1]:
            return _wrong_count(where, machine, accelerator, count)
        return []
    return unsupported if family in _GENERAL_PURPOSE else []


def _wrong_count(where: str, machine: str, accelerator: str, count: int) -> list[tuple[str, str]]:
    return [(f"{where}.accelerator_count",
             f'{count} x "{accelerator}" is not a supported configuration for machine type "{machine}"')]
