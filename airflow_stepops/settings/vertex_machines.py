"""Vertex AI machine types and accelerators: which combinations are valid, and the smallest that fits.

Vertex refuses a CustomJob whose accelerator does not go with its machine type only after it is
submitted (or, for some combinations, after minutes in the queue), so the combinations are checked
here, at DAG parse time. Fixed-GPU families (a2, a3, a4, g2) carry their accelerator and count in the
machine type; N1 types take T4, V100, P100 or P4 with a vCPU limit per GPU count. Prices are us-central1
on-demand list prices per hour for Vertex AI custom training, used for cost estimates as well as to choose a
machine; where and when they were read is in ``PRICES``. There are no spot prices (``spot_price`` is None):
Vertex AI's own Spot VM prices for custom training were not found, and Compute Engine's spot prices are not
Vertex's (Vertex's custom-training prices differ from Compute Engine's), so a spot step's cost is unknown unless
the connection's prices give it. Machine types of families not in the table (e.g. TPU hosts) are passed to
Vertex unchecked.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from airflow_stepops.machines import Catalogue, Machine
from airflow_stepops.prices import PriceTable
from airflow_stepops.resources import ResourceSettings, normalize_gpu_type

#: Billing increment UNVERIFIED: custom training is commonly said to be billed in 30-second increments with a
#: 1-minute minimum, but no source for it was found (a search of the stored docs and pages, 2026-12); increment 1 s
#: and no minimum until one is. The date is when the table was written (2026-11); its rows were not re-read since.
PRICES = PriceTable("us-central1", "2026-11", "https://cloud.google.com/vertex-ai/pricing", increment_seconds=1,
                    minimum_seconds=0)
#: ResourceSettings' canonical GPU names -> Vertex's AcceleratorType enum
ACCELERATORS: dict[str, str] = {
    "T4": "NVIDIA_TESLA_T4", "P4": "NVIDIA_TESLA_P4", "V100": "NVIDIA_TESLA_V100", "P100": "NVIDIA_TESLA_P100",
    "L4": "NVIDIA_L4", "A100": "NVIDIA_TESLA_A100", "A100-80GB": "NVIDIA_A100_80GB", "H100": "NVIDIA_H100_80GB",
    "H200": "NVIDIA_H200_141GB", "B200": "NVIDIA_B200",
}
#: accelerators Vertex has that no ResourceSettings name maps to: given only as accelerator_type
EXTRA_ACCELERATORS = ("NVIDIA_H100_MEGA_80GB", "NVIDIA_GB200", "NVIDIA_RTX_PRO_6000", "TPU_V2", "TPU_V3",
                      "TPU_V4_POD", "TPU_V5_LITEPOD")
#: TPUs: the machine types that carry them in a CustomJob, the chip count following from the type (Vertex AI,
#: "Configure compute resources for custom training", TPUs:
#: https://cloud.google.com/vertex-ai/docs/training/configure-compute#tpu; v2/v3 take cloud-tpu with 8)
TPU_MACHINES: dict[str, tuple[str, ...]] = {
    "TPU_V2": ("cloud-tpu",), "TPU_V3": ("cloud-tpu",), "TPU_V4_POD": ("ct4p-hightpu-4t",),
    "TPU_V5_LITEPOD": ("ct5lp-hightpu-1t", "ct5lp-hightpu-4t", "ct5lp-hightpu-8t"),
}
RETIRED_ACCELERATORS = {"NVIDIA_TESLA_K80": "K80 GPUs are retired on Vertex AI; use T4 or L4"}
#: N1 + GPU: accelerator -> {count: (max vCPUs, max memory GB)} (Compute Engine's N1 GPU limits)
N1_GPU_LIMITS: dict[str, dict[int, tuple[int, int]]] = {
    "NVIDIA_TESLA_T4": {1: (48, 312), 2: (48, 312), 4: (96, 624)},
    "NVIDIA_TESLA_P4": {1: (24, 156), 2: (48, 312), 4: (96, 624)},
    "NVIDIA_TESLA_V100": {1: (12, 78), 2: (24, 156), 4: (48, 312), 8: (96, 624)},
    "NVIDIA_TESLA_P100": {1: (16, 104), 2: (32, 208), 4: (64, 208)},
}
#: USD per GPU hour (on-demand list price, ``PRICES``), added to the N1 machine's price for N1 + GPU candidates
N1_GPU_PRICE = {"NVIDIA_TESLA_T4": 0.40, "NVIDIA_TESLA_P4": 0.69, "NVIDIA_TESLA_V100": 2.83,
                "NVIDIA_TESLA_P100": 1.67}
MACHINE_NAME = re.compile(r"^[a-z][a-z0-9]*-[a-z0-9]+(-[a-z0-9]+)?$")


class MachineChoice(NamedTuple):
    machine_type: str
    accelerator_type: str | None
    accelerator_count: int
    vcpus: int | None = None
    memory_gb: float | None = None

    def describe(self) -> str:
        size = f" ({self.vcpus} vCPU, {self.memory_gb:g} GB" if self.vcpus else " ("
        gpu = f"{', ' if self.vcpus else ''}{self.accelerator_count} x {self.accelerator_type}" \
            if self.accelerator_type else ""
        return f"{self.machine_type}{size}{gpu})".replace(" ()", "")


def _family(name: str) -> str:
    return name.split("-", 1)[0]


def _general(family: str, per_cpu_gb: float, sizes: tuple[int, ...], cpu_price: float, gb_price: float) -> list[
        Machine]:
    return [Machine(f"{family}-{n}", n, round(n * per_cpu_gb, 2),
                    price=round(n * cpu_price + n * per_cpu_gb * gb_price, 4), unit="GB") for n in sizes]


_CPU_TYPES: list[Machine] = [
    *_general("n1-standard", 3.75, (4, 8, 16, 32, 64, 96), 0.0379, 0.0051),
    *_general("n1-highmem", 6.5, (2, 4, 8, 16, 32, 64, 96), 0.0379, 0.0051),
    *_general("n1-highcpu", 0.9, (16, 32, 64, 96), 0.0379, 0.0051),
    *_general("n2-standard", 4, (4, 8, 16, 32, 48, 64, 80), 0.0363, 0.0049),
    *_general("n2-highmem", 8, (2, 4, 8, 16, 32, 48, 64, 80), 0.0363, 0.0049),
    *_general("n2-highcpu", 1, (16, 32, 48, 64, 80), 0.0363, 0.0049),
    *_general("e2-standard", 4, (4, 8, 16, 32), 0.0251, 0.0034),
    *_general("e2-highmem", 8, (2, 4, 8, 16), 0.0251, 0.0034),
    *_general("e2-highcpu", 1, (16, 32), 0.0251, 0.0034),
    *_general("c2-standard", 4, (4, 8, 16, 30, 60), 0.0401, 0.0054),
]
#: fixed-GPU families (a2, a3, a4, g2): name, vCPUs, memory GB, GPUs, accelerator, USD per hour
_GPU_TYPES: list[Machine] = [Machine(*row, unit="GB") for row in (
    ("g2-standard-4", 4, 16, 1, "NVIDIA_L4", 0.82), ("g2-standard-8", 8, 32, 1, "NVIDIA_L4", 0.99),
    ("g2-standard-12", 12, 48, 1, "NVIDIA_L4", 1.16), ("g2-standard-16", 16, 64, 1, "NVIDIA_L4", 1.33),
    ("g2-standard-32", 32, 128, 1, "NVIDIA_L4", 2.02), ("g2-standard-24", 24, 96, 2, "NVIDIA_L4", 2.31),
    ("g2-standard-48", 48, 192, 4, "NVIDIA_L4", 4.62), ("g2-standard-96", 96, 384, 8, "NVIDIA_L4", 9.24),
    ("a2-highgpu-1g", 12, 85, 1, "NVIDIA_TESLA_A100", 4.22), ("a2-highgpu-2g", 24, 170, 2, "NVIDIA_TESLA_A100", 8.44),
    ("a2-highgpu-4g", 48, 340, 4, "NVIDIA_TESLA_A100", 16.88),
    ("a2-highgpu-8g", 96, 680, 8, "NVIDIA_TESLA_A100", 33.77),
    ("a2-megagpu-16g", 96, 1360, 16, "NVIDIA_TESLA_A100", 63.27),
    ("a2-ultragpu-1g", 12, 170, 1, "NVIDIA_A100_80GB", 5.85), ("a2-ultragpu-2g", 24, 340, 2, "NVIDIA_A100_80GB", 11.70),
    ("a2-ultragpu-4g", 48, 680, 4, "NVIDIA_A100_80GB", 23.41),
    ("a2-ultragpu-8g", 96, 1360, 8, "NVIDIA_A100_80GB", 46.81),
    ("a3-highgpu-1g", 26, 234, 1, "NVIDIA_H100_80GB", 12.64), ("a3-highgpu-2g", 52, 468, 2, "NVIDIA_H100_80GB", 25.29),
    ("a3-highgpu-4g", 104, 936, 4, "NVIDIA_H100_80GB", 50.57),
    ("a3-highgpu-8g", 208, 1872, 8, "NVIDIA_H100_80GB", 101.14),
    ("a3-megagpu-8g", 208, 1872, 8, "NVIDIA_H100_MEGA_80GB", 106.0),
    ("a3-ultragpu-8g", 224, 2952, 8, "NVIDIA_H200_141GB", 123.0), ("a4-highgpu-8g", 224, 3968, 8, "NVIDIA_B200", 148.0),
)]
MACHINE_TYPES: dict[str, Machine] = {m.name: m for m in (*_CPU_TYPES, *_GPU_TYPES)}
KNOWN_FAMILIES = {_family(m) for m in MACHINE_TYPES}
#: N1 types with GPUs attached, within Compute Engine's limits: candidates like the fixed-GPU types ("any GPU"
#: means the common T4 on N1, not the older P4, P100 or V100)
_N1_WITH_GPUS = [m._replace(gpus=n, gpu_type=acc, price=round(m.price + n * N1_GPU_PRICE[acc], 4),
                            named_only=acc != "NVIDIA_TESLA_T4")
                 for acc, limits in N1_GPU_LIMITS.items() for n, (cpus, gb) in limits.items()
                 for m in _CPU_TYPES if _family(m.name) == "n1" and m.vcpus <= cpus and m.memory <= gb]
CATALOGUE = Catalogue("Vertex AI", "machine type", "machine_type", (*_CPU_TYPES, *_GPU_TYPES, *_N1_WITH_GPUS),
                      ACCELERATORS, exact_gpus=True)  # 3 GPUs would silently bill for 4: an error, not rounded up


def accelerator_enum(value: str, field: str = "accelerator_type") -> str:
    """Vertex's enum name for a ResourceSettings GPU name or an enum name; raise listing the allowed."""
    upper = value.strip().upper()
    if upper in RETIRED_ACCELERATORS:
        raise ValueError(f"{field}: {value!r}: {RETIRED_ACCELERATORS[upper]}")
    if upper in ACCELERATORS.values() or upper in EXTRA_ACCELERATORS:
        return upper
    try:
        canonical = normalize_gpu_type(value)
    except ValueError:
        canonical = None
    if canonical in ACCELERATORS:
        return ACCELERATORS[canonical]
    allowed = sorted({*ACCELERATORS.values(), *EXTRA_ACCELERATORS})
    raise ValueError(f"{field}: {value!r} is not a Vertex AI accelerator; allowed: {', '.join(allowed)} (or the "
                     f"GPU names {', '.join(ACCELERATORS)})")


def machines_for(accelerator: str) -> list[str]:
    """Machine types that take ``accelerator`` (for error messages)."""
    if accelerator in TPU_MACHINES:
        return list(TPU_MACHINES[accelerator])
    fixed = [m.name for m in _GPU_TYPES if m.gpu_type == accelerator]
    if fixed:
        return fixed
    if accelerator in N1_GPU_LIMITS:
        limit = max(v for v, _ in N1_GPU_LIMITS[accelerator].values())
        return [m.name for m in _CPU_TYPES if _family(m.name) == "n1" and m.vcpus <= limit]
    return []


def allowed_counts(machine: Machine | None, accelerator: str) -> list[int]:
    if machine is not None and machine.gpu_type:
        return [int(machine.gpus)]
    if accelerator in N1_GPU_LIMITS:
        limits = N1_GPU_LIMITS[accelerator]
        return [n for n, (cpus, _) in limits.items() if machine is None or machine.vcpus <= cpus]
    return sorted({int(m.gpus) for m in _GPU_TYPES if m.gpu_type == accelerator})


def machine_hint(accelerator: str) -> str:
    """What to set as machine_type for an accelerator no ResourceSettings GPU name stands for."""
    machines = machines_for(accelerator)
    if machines == ["cloud-tpu"]:
        return f"use machine_type='cloud-tpu' with accelerator_count=8 for {accelerator}"
    return (f"use machine_type={' or '.join(repr(m) for m in machines)}" if machines
            else "see the Vertex AI machine types for it") + f" for {accelerator}"


def check_machine(machine_type: str | None, accelerator: str | None, count: int | None,
                  field: str = "machine_type") -> MachineChoice:
    """Check a machine type / accelerator / count combination; fill in what a fixed-GPU type implies."""
    if machine_type is None:
        raise ValueError(f"{field}: a machine type is needed")
    if not MACHINE_NAME.match(machine_type):
        raise ValueError(f"{field}: {machine_type!r} is not a Compute Engine machine type name (e.g. n1-standard-8, "
                         "a2-highgpu-1g, g2-standard-8)")
    machine = MACHINE_TYPES.get(machine_type)
    family = _family(machine_type)
    if machine is None and family in KNOWN_FAMILIES:
        same = [m for m in MACHINE_TYPES if m.startswith(machine_type.rsplit("-", 1)[0] + "-")] or \
            [m for m in MACHINE_TYPES if _family(m) == family]
        raise ValueError(f"{field}: unknown Vertex AI machine type {machine_type!r}; {family} types: "
                         f"{', '.join(same)}")
    if machine is None:  # a family this table does not cover (e.g. TPU hosts): Vertex decides
        return MachineChoice(machine_type, accelerator, count or (1 if accelerator else 0))
    acc = accelerator or machine.gpu_type
    if acc is None:
        if count:
            raise ValueError(f"accelerator_count={count} without accelerator_type: name the accelerator (e.g. "
                             "NVIDIA_TESLA_T4) or use a machine type that has one (a2-*, a3-*, g2-*)")
        return MachineChoice(machine.name, None, 0, machine.vcpus, machine.memory)
    if machine.gpu_type and acc != machine.gpu_type:
        raise ValueError(f"accelerator_type={acc}: {machine.name} comes with {machine.gpus} x "
                         f"{machine.gpu_type}; machine types for {acc}: {', '.join(machines_for(acc)) or 'none'}")
    if not machine.gpu_type and (family != "n1" or acc not in N1_GPU_LIMITS):
        valid = machines_for(acc)
        raise ValueError(f"accelerator_type={acc} cannot be attached to {machine.name}; machine types for {acc}: "
                         f"{', '.join(valid) if valid else 'see the Vertex AI documentation'}")
    n = count if count is not None else (int(machine.gpus) or 1)
    counts = allowed_counts(machine, acc)
    if n not in counts:
        every = sorted(N1_GPU_LIMITS.get(acc, {}))
        hint = f"; {machine.name} has too many vCPUs for fewer GPUs" if every and n in every else ""
        raise ValueError(f"accelerator_count={n} is not allowed for {acc} on {machine.name}; allowed: "
                         f"{', '.join(map(str, counts)) or 'none'}{hint}")
    if family == "n1" and machine.memory > N1_GPU_LIMITS[acc][n][1]:
        raise ValueError(f"{machine.name} has more memory than {n} x {acc} allows ({N1_GPU_LIMITS[acc][n][1]} GB)")
    return MachineChoice(machine.name, acc, n, machine.vcpus, machine.memory)


def choose_machine(resources: ResourceSettings) -> MachineChoice:
    """The cheapest machine type (with accelerator) that has the CPU, memory and exact GPU count asked for."""
    m = CATALOGUE.choose(resources)
    return MachineChoice(m.name, m.gpu_type, int(m.gpus), m.vcpus, m.memory)


def fits(choice: MachineChoice, resources: ResourceSettings) -> bool:
    """Whether a checked choice has the resources; a machine type the table lacks is the user's to trust."""
    return choice.vcpus is None or CATALOGUE.fits(Machine(choice.machine_type, choice.vcpus, choice.memory_gb or 0,
                                                          choice.accelerator_count, choice.accelerator_type,
                                                          unit="GB"), resources)


def attached_gpu(accelerator: str) -> Machine | None:
    """One GPU attached to an N1 machine type, as a row of the price table (None: not priced)."""
    price = N1_GPU_PRICE.get(accelerator)
    return None if price is None else Machine(accelerator, 0, 0, 1, accelerator, price, unit="GB")
