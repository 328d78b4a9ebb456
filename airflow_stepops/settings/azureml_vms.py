"""Azure VM sizes for Azure ML serverless jobs: what each offers, and the cheapest one that fits a step.

Prices are approximate East US pay-as-you-go Linux prices per hour; they only rank the candidates (name
the size yourself to pin a choice). The table covers the general purpose (D), memory optimised (E) and
compute optimised (F) families and the GPU families Azure ML offers for training: NCasT4_v3 (T4), NCv3
(V100), NC A100 v4 (A100 80GB), ND A100 v4 (8 x A100 40GB), NDm A100 v4 (8 x A100 80GB), NCads H100 v5,
ND H100 v5 and NVadsA10 v5 (A10, partly as GPU fractions). Sizes are matched case-insensitively, as Azure
does; a size not in the table is refused before submitting (with the sizes of its family), since Azure ML
would only refuse it after the job was created.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from airflow_stepops.resources import ResourceSettings

#: what an Azure VM size name looks like (``Standard_NC24ads_A100_v4``); checked at parse time
VM_SIZE_NAME = re.compile(r"^Standard_[A-Za-z]+\d+[A-Za-z]*(_[A-Za-z0-9]+)*$", re.I)


@dataclass(frozen=True)
class VmSize:
    name: str
    vcpus: int
    memory_gib: float
    gpus: Fraction = Fraction(0)  # NVadsA10_v5 sizes below 36 vCPUs have a fraction of one A10
    gpu_type: str | None = None
    price: float = 0.0  # USD per hour, approximate

    @property
    def family(self) -> str:
        """``Standard_NC24ads_A100_v4`` -> ``NCads_A100_v4`` (letters of the size, and what follows)."""
        found = re.match(r"(?i)^standard_([a-z]+)\d+([a-z]*)((?:_[a-z0-9]+)*)$", self.name)
        return f"{found.group(1)}{found.group(2)}{found.group(3)}" if found else self.name

    def describe(self) -> str:
        gpu = f", {self.gpus} x {self.gpu_type}" if self.gpus else ""
        return f"{self.name} ({self.vcpus} vCPU, {self.memory_gib:g} GiB{gpu}, ~${self.price:.2f}/h)"


_ROWS: list[tuple[str, int, float, Fraction | int, str | None, float]] = [
    # general purpose
    ("Standard_D2s_v3", 2, 8, 0, None, 0.096), ("Standard_D4s_v3", 4, 16, 0, None, 0.192),
    ("Standard_D8s_v3", 8, 32, 0, None, 0.384), ("Standard_D16s_v3", 16, 64, 0, None, 0.768),
    ("Standard_D32s_v3", 32, 128, 0, None, 1.536), ("Standard_D48s_v3", 48, 192, 0, None, 2.304),
    ("Standard_D64s_v3", 64, 256, 0, None, 3.072),
    ("Standard_DS1_v2", 1, 3.5, 0, None, 0.073), ("Standard_DS2_v2", 2, 7, 0, None, 0.146),
    ("Standard_DS3_v2", 4, 14, 0, None, 0.293), ("Standard_DS4_v2", 8, 28, 0, None, 0.585),
    ("Standard_DS5_v2", 16, 56, 0, None, 1.17),
    # memory optimised
    ("Standard_E2s_v3", 2, 16, 0, None, 0.126), ("Standard_E4s_v3", 4, 32, 0, None, 0.252),
    ("Standard_E8s_v3", 8, 64, 0, None, 0.504), ("Standard_E16s_v3", 16, 128, 0, None, 1.008),
    ("Standard_E32s_v3", 32, 256, 0, None, 2.016), ("Standard_E48s_v3", 48, 384, 0, None, 3.024),
    ("Standard_E64s_v3", 64, 432, 0, None, 3.629),
    # compute optimised
    ("Standard_F2s_v2", 2, 4, 0, None, 0.085), ("Standard_F4s_v2", 4, 8, 0, None, 0.169),
    ("Standard_F8s_v2", 8, 16, 0, None, 0.338), ("Standard_F16s_v2", 16, 32, 0, None, 0.677),
    ("Standard_F32s_v2", 32, 64, 0, None, 1.353), ("Standard_F48s_v2", 48, 96, 0, None, 2.03),
    ("Standard_F64s_v2", 64, 128, 0, None, 2.706), ("Standard_F72s_v2", 72, 144, 0, None, 3.045),
    # NCasT4_v3: T4
    ("Standard_NC4as_T4_v3", 4, 28, 1, "T4", 0.526), ("Standard_NC8as_T4_v3", 8, 56, 1, "T4", 0.752),
    ("Standard_NC16as_T4_v3", 16, 110, 1, "T4", 1.204), ("Standard_NC64as_T4_v3", 64, 440, 4, "T4", 4.352),
    # NCv3: V100 16GB
    ("Standard_NC6s_v3", 6, 112, 1, "V100", 3.06), ("Standard_NC12s_v3", 12, 224, 2, "V100", 6.12),
    ("Standard_NC24s_v3", 24, 448, 4, "V100", 12.24), ("Standard_NC24rs_v3", 24, 448, 4, "V100", 13.46),
    # NC A100 v4: A100 80GB PCIe
    ("Standard_NC24ads_A100_v4", 24, 220, 1, "A100-80GB", 3.673),
    ("Standard_NC48ads_A100_v4", 48, 440, 2, "A100-80GB", 7.346),
    ("Standard_NC96ads_A100_v4", 96, 880, 4, "A100-80GB", 14.692),
    # ND A100 v4 (8 x A100 40GB) and NDm A100 v4 (8 x A100 80GB)
    ("Standard_ND96asr_v4", 96, 900, 8, "A100", 27.197),
    ("Standard_ND96amsr_A100_v4", 96, 1900, 8, "A100-80GB", 32.77),
    # NCads H100 v5 and ND H100 v5
    ("Standard_NC40ads_H100_v5", 40, 320, 1, "H100", 6.98),
    ("Standard_NC80adis_H100_v5", 80, 640, 2, "H100", 13.96),
    ("Standard_ND96isr_H100_v5", 96, 1900, 8, "H100", 98.32),
    # NVadsA10 v5: A10, the smaller sizes a fraction of one
    ("Standard_NV6ads_A10_v5", 6, 55, Fraction(1, 6), "A10", 0.454),
    ("Standard_NV12ads_A10_v5", 12, 110, Fraction(1, 3), "A10", 0.908),
    ("Standard_NV18ads_A10_v5", 18, 220, Fraction(1, 2), "A10", 1.6),
    ("Standard_NV36ads_A10_v5", 36, 440, 1, "A10", 3.2),
    ("Standard_NV36adms_A10_v5", 36, 880, 1, "A10", 4.52),
    ("Standard_NV72ads_A10_v5", 72, 880, 2, "A10", 6.52),
]
VM_SIZES: dict[str, VmSize] = {row[0].lower(): VmSize(row[0], row[1], row[2], Fraction(row[3]), row[4], row[5])
                               for row in _ROWS}
GPU_TYPES = sorted({v.gpu_type for v in VM_SIZES.values() if v.gpu_type})


def check_vm_name(value: str, field: str = "instance_type") -> str:
    """Parse time: the shape of a VM size name (``Standard_<family><vCPUs>...``)."""
    if not VM_SIZE_NAME.match(value):
        raise ValueError(f"{field}: {value!r} is not an Azure VM size (e.g. Standard_D4s_v3, Standard_NC6s_v3, "
                         "Standard_NC24ads_A100_v4)")
    return value


def lookup(value: str, field: str = "instance_type") -> VmSize:
    """The table's VM size (case-insensitive), or an error naming the known sizes of its family."""
    check_vm_name(value, field)
    found = VM_SIZES.get(value.lower())
    if found is not None:
        return found
    family = VmSize(value, 0, 0).family.lower()
    series = re.match(r"(?i)^standard_([a-z]+)", value)
    letters = series.group(1).lower() if series else ""
    same = [v.name for v in VM_SIZES.values() if v.family.lower() == family] or \
        [v.name for v in VM_SIZES.values() if letters and v.family.lower().startswith(letters)]
    hint = f"; sizes of that family: {', '.join(same)}" if same else \
        f"; known families: {', '.join(sorted({v.family for v in VM_SIZES.values()}))}"
    raise ValueError(f"{field}: unknown Azure ML VM size {value!r}{hint}")


def _gpu_matches(vm: VmSize, wanted: str) -> bool:
    if vm.gpu_type is None:
        return False
    if wanted == "A100":  # any A100; "A100-80GB" asks for the 80 GB model only
        return vm.gpu_type in ("A100", "A100-80GB")
    return vm.gpu_type == wanted


def fits(vm: VmSize, resources: ResourceSettings) -> bool:
    if resources.cpu_count is not None and vm.vcpus < resources.cpu_count:
        return False
    if resources.memory_bytes is not None and vm.memory_gib * 2**30 < resources.memory_bytes:
        return False
    if resources.gpu_count == 0 and vm.gpus:
        return False
    if resources.wants_gpu:
        if vm.gpus < resources.effective_gpu_count:  # a fraction of a GPU is not a GPU
            return False
        if resources.gpu_type and not _gpu_matches(vm, resources.gpu_type):
            return False
    return True


def _shortfall(vm: VmSize, resources: ResourceSettings) -> float:
    """How far a size is from fitting (0 when it fits): summed relative shortfalls."""
    short = 0.0
    if resources.cpu_count:
        short += max(resources.cpu_count - vm.vcpus, 0) / resources.cpu_count
    if resources.memory_bytes:
        short += max(resources.memory_bytes - vm.memory_gib * 2**30, 0) / resources.memory_bytes
    if resources.wants_gpu:
        count = resources.effective_gpu_count
        short += float(max(Fraction(count) - vm.gpus, Fraction(0))) / count
        if resources.gpu_type and not _gpu_matches(vm, resources.gpu_type):
            short += 1.0
    return short


def choose_vm_size(resources: ResourceSettings) -> VmSize:
    """The cheapest VM size of the table with the CPU, memory, GPU count and GPU type asked for."""
    if resources.gpu_type and resources.gpu_type not in GPU_TYPES and resources.gpu_type != "A100":
        raise ValueError(f"gpu_type: {resources.gpu_type} is not offered by Azure ML VM sizes in the table; GPU "
                         f"types: {', '.join(GPU_TYPES)}. Set instance_type to choose a size yourself")
    fitting = sorted((v for v in VM_SIZES.values() if fits(v, resources)), key=lambda v: (v.price, v.name))
    if fitting:
        return fitting[0]
    nearest = sorted(VM_SIZES.values(), key=lambda v: (_shortfall(v, resources), v.price))[:3]
    wanted = resources.model_dump(exclude_none=True)
    raise ValueError(f"resources {wanted}: no Azure ML VM size fits; nearest: "
                     + "; ".join(v.describe() for v in nearest)
                     + ". Ask for less, or set instance_type to choose a size yourself")
