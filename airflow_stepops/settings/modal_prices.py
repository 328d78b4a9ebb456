"""Modal's list prices: per second of each CPU core, GiB of memory and GPU a container reserves.

https://modal.com/pricing (read 2026-10; per second of use). Modal bills "whichever is higher: your reservation or
actual usage" of CPU and memory (https://modal.com/docs/guide/resources), so a step's rate counts its reservation
(default 0.125 cores and 128 MiB) and usage above it is billed on top. ``nonpreemptible`` triples the CPU and memory
price (https://modal.com/docs/guide/preemption); a region applies 1.5x (a broad one, e.g. ``us``) or 1.75x (a
narrow one, e.g. ``us-east``) to the whole price (https://modal.com/docs/guide/region-selection).
"""

from __future__ import annotations

from airflow_stepops.prices import Price, Prices, PriceTable

PRICES = PriceTable(region="any (region multipliers apply)", date="2026-10", source="https://modal.com/pricing")
CPU_CORE_SECOND = 0.0000131
MEMORY_GIB_SECOND = 0.00000222
#: Modal's GPU names (settings.modal.GPU_MAX_COUNT) -> price per GPU-second; "ANY" may be any of the smaller GPUs
#: (T4, L4, A10), priced as the dearest of them; "A100" is the 40 GB model unless Modal upgrades it at no charge
GPU_SECOND = {"T4": 0.000164, "L4": 0.000222, "A10": 0.000306, "A10G": 0.000306, "ANY": 0.000306, "L40S": 0.000542,
              "A100": 0.000583, "A100-40GB": 0.000583, "A100-80GB": 0.000694, "RTX-PRO-6000": 0.000842,
              "H100": 0.001097, "H100!": 0.001097, "H200": 0.001261, "B200": 0.001736}
DEFAULT_CPU, DEFAULT_MEMORY_MIB = 0.125, 128
NONPREEMPTIBLE_MULTIPLIER = 3.0
BROAD_REGION_MULTIPLIER, NARROW_REGION_MULTIPLIER = 1.5, 1.75


def region_multiplier(region: str | list[str] | None) -> float:
    if not region:
        return 1.0
    regions = [region] if isinstance(region, str) else region
    return NARROW_REGION_MULTIPLIER if any("-" in r for r in regions) else BROAD_REGION_MULTIPLIER


def function_price(options: dict, prices: Prices | None) -> Price:
    """The price of one container of a function with ``options`` (those ``function_options`` gives); a GPU
    fallback list is priced as its dearest GPU."""
    from airflow_stepops.settings.modal import parse_gpu

    cpu = float(options.get("cpu") or DEFAULT_CPU)
    memory_gib = float(options.get("memory") or DEFAULT_MEMORY_MIB) / 1024
    gpus = options.get("gpu")
    kinds = [parse_gpu(g) for g in ([gpus] if isinstance(gpus, str) else gpus or [])]
    nonpreemptible = bool(options.get("nonpreemptible"))
    basis = ", ".join([f"{cpu:g} cores", f"{memory_gib:g} GiB", *(f"{n} x {kind}" for kind, n in kinds[:1]),
                       *(["dearest of " + "/".join(k for k, _ in kinds)] if len(kinds) > 1 else []),
                       "nonpreemptible" if nonpreemptible else "preemptible"])
    rates = prices.rates(not nonpreemptible) if prices else None
    if prices is not None and (rates is not None or prices.currency != PRICES.currency):
        if rates is None:
            return Price.missing(f"the connection's prices are in {prices.currency} and give no rates", basis)
        gpu_hour = [rates.gpu_hour.get(kind, rates.gpu_hour.get("*")) for kind, _ in kinds]
        if None in gpu_hour or (cpu and rates.cpu_hour is None) or rates.memory_gib_hour is None:
            return Price.missing("the connection's prices need cpu_hour, memory_gib_hour and gpu_hour of every GPU "
                                 "type of the function", basis)
        hourly = rates.hour + cpu * (rates.cpu_hour or 0) + memory_gib * rates.memory_gib_hour + max(
            (n * float(rate or 0) for (_, n), rate in zip(kinds, gpu_hour)), default=0)
        return Price(hourly, prices.currency, basis, "connection prices")
    unknown = [kind for kind, _ in kinds if kind not in GPU_SECOND]
    if unknown:
        return Price.missing(f"the price table has no price for Modal GPU {unknown[0]}", basis)
    host = (cpu * CPU_CORE_SECOND + memory_gib * MEMORY_GIB_SECOND) * (NONPREEMPTIBLE_MULTIPLIER if nonpreemptible
                                                                      else 1.0)
    gpu = max((n * GPU_SECOND[kind] for kind, n in kinds), default=0.0)
    discount = prices.discount if prices else 0.0
    hourly = (host + gpu) * 3600 * region_multiplier(options.get("region")) * (1 - discount)
    return Price(hourly, PRICES.currency, basis + "; usage above the reservation is billed on top",
                 PRICES.describe() + (f", less {discount:.0%}" if discount else ""))
