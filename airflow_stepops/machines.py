"""Which machine of a cloud's table a step's ``ResourceSettings`` get: the same rule for every flavor.

A flavor's table is data (a row per machine: vCPUs, memory, GPUs, on-demand and spot list prices, whose
provenance is the table's ``prices.PriceTable``); this module says which rows fit, picks the cheapest, and when
none fits names the nearest, so the error shows what exists.
Imported while DAGs are parsed (settings are checked then): standard library only, besides ``resources``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import NamedTuple

from airflow_stepops.resources import GPU_TYPES, ResourceSettings

_UNIT_BYTES = {"GiB": 2**30, "GB": 10**9}
#: a request for "A100" takes either model; "A100-80GB" asks for the 80 GB model only
_ALSO = {"A100": ("A100-80GB",)}


class Machine(NamedTuple):
    """One row of a table: a machine type, with the GPUs it carries (or has attached). A named tuple, not a
    dataclass: the tables are built while DAGs are parsed, and tuples are made several times faster."""

    name: str
    vcpus: int
    memory: float  # in ``unit``, as the cloud states it
    gpus: Fraction | int = 0  # a fraction on Azure's smaller NVadsA10_v5 sizes: not a GPU
    gpu_type: str | None = None  # the cloud's own name
    price: float = 0.0  # on-demand list price per hour, in the table's currency (prices.PriceTable)
    unit: str = "GiB"
    burstable: bool = False  # CPU credits run out under load: not for a step that asks for CPUs
    named_only: bool = False  # an older GPU: chosen only when its type is asked for by name
    spot_price: float | None = None  # spot/preemptible list price per hour (None: not in the table)

    def describe(self) -> str:
        gpu = f", {self.gpus} x {self.gpu_type}" if self.gpus else ""
        return f"{self.name} ({self.vcpus} vCPU, {self.memory:g} {self.unit}{gpu}, ~${self.price:.2f}/h)"


class Catalogue(NamedTuple):
    """A cloud's table and the words its errors use (``"Azure ML"``, ``"VM size"``, ``"instance_type"``)."""

    cloud: str
    kind: str
    setting: str  # the field that names a machine directly
    machines: tuple[Machine, ...]
    gpu_names: Mapping[str, str] = {}  # ResourceSettings' GPU name -> the cloud's, where they differ
    exact_gpus: bool = False  # choose exactly the GPU count asked for (else at least as many)

    def _gpu_names(self, wanted: str) -> set[str]:
        return {self.gpu_names.get(name, name) for name in (wanted, *_ALSO.get(wanted, ()))}

    def offers(self, gpu_type: str) -> bool:
        return any(m.gpu_type in self._gpu_names(gpu_type) for m in self.machines)

    def shortfall(self, resources: ResourceSettings, exact: bool = False) -> Callable[[Machine], float]:
        """How far a machine is from fitting, 0 when it fits: the relative shortfall of each resource, plus 1
        for each thing no size makes up for (another GPU type, GPUs not wanted, burstable CPUs, another count
        where it must be ``exact``). The request is read once: this runs for every row, at parse time."""
        cpus, memory, gpus = resources.cpu_count or 0, resources.memory_bytes or 0, resources.effective_gpu_count
        types = self._gpu_names(resources.gpu_type) if resources.gpu_type else None
        no_gpus = resources.gpu_count == 0

        def short(m: Machine) -> float:
            have = m.memory * _UNIT_BYTES[m.unit]
            return (max(cpus - m.vcpus, 0) / cpus if cpus else 0) + (max(memory - have, 0) / memory if memory else 0) \
                + (float(max(gpus - m.gpus, 0) / gpus) if gpus else 0) + (types is not None and m.gpu_type not in types) \
                + (no_gpus and m.gpus > 0) + bool(cpus and m.burstable) + (exact and m.gpus != gpus)
        return short

    def fits(self, machine: Machine, resources: ResourceSettings) -> bool:
        return self.shortfall(resources)(machine) == 0

    def choose(self, resources: ResourceSettings) -> Machine:
        """The cheapest machine that fits; else an error naming the field, what is offered, or the nearest."""
        gpus, gpu_type, short = resources.effective_gpu_count, resources.gpu_type, self.shortfall(resources, self.exact_gpus)
        rows = [m for m in self.machines if m.gpus == gpus] if self.exact_gpus else self.machines
        fitting = [m for m in rows if short(m) == 0 and not (m.named_only and gpu_type is None)]
        if fitting:
            return min(fitting, key=lambda m: (m.price, m.vcpus, m.name))
        failed = f"resources {resources.model_dump(exclude_none=True)}: no {self.cloud} {self.kind} fits"
        if gpu_type is not None and not self.offers(gpu_type):
            raise ValueError(f"{failed}; gpu_type: {gpu_type} is not offered by {self.cloud} {self.kind}s in the table; "
                             f"GPU types: {', '.join(sorted(filter(self.offers, GPU_TYPES)))}. Set {self.setting} to "
                             "choose one yourself")
        counts = sorted({m.gpus for m in self.machines if m.gpus and (gpu_type is None or m.gpu_type in self._gpu_names(
            gpu_type))})
        if self.exact_gpus and gpus and gpus not in counts:
            raise ValueError(f"gpu_count={gpus}: {self.cloud} offers {self.gpu_names.get(gpu_type or '', gpu_type or 'GPUs')} "
                             f"in counts of {', '.join(map(str, counts))} per machine")
        nearest = sorted(self.machines, key=lambda m: (short(m), m.price))[:3]
        raise ValueError(f"{failed}; nearest: {'; '.join(m.describe() for m in nearest)}. Ask for less, or set "
                         f"{self.setting} to choose one yourself")
