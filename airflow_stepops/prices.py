"""What an hour of a step costs: the flavors' price tables, the prices a connection overrides them with, and
the ``Price`` of one attempt that estimates, ``max_cost`` and the recorded cost are computed from.

A flavor's table is its machine table (``airflow_stepops.machines``) with on-demand and spot prices, and a
``PriceTable`` saying where and when they were read and how the service bills time. A price this module cannot
know is ``Price.unknown``, with the reason: never a number that might be wrong.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from airflow_stepops.machines import Machine

Amount = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class PriceTable(NamedTuple):
    """The provenance and billing rules of one flavor's prices."""

    region: str
    date: str  # when the prices were read from ``source``
    source: str
    currency: str = "USD"
    #: billed time is rounded up to this many seconds, and is at least ``minimum_seconds``
    increment_seconds: int = 1
    minimum_seconds: int = 0

    def describe(self) -> str:
        return f"list prices, {self.region}, {self.date} ({self.source})"


class ResourceRates(BaseModel):
    """Prices per hour of what a step reserves: a flat rate, each CPU, each GiB of memory, each GPU by type
    (``"*"``: any type not named)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hour: Amount = 0.0
    cpu_hour: Amount | None = None
    memory_gib_hour: Amount | None = None
    gpu_hour: dict[str, Amount] = {}


class MachinePrice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    on_demand: Amount
    spot: Amount | None = None


class Prices(BaseModel):
    """A connection's ``prices``: negotiated rates, another region's prices, another currency, or the rates of
    resources that have no list price (Kubernetes, local)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$", description="ISO 4217 code; a currency other "
                          "than the tables' (USD) uses only the prices given here")
    discount: float = Field(default=0.0, ge=0, lt=1, description="A fraction off every list price of the table")
    machines: dict[str, MachinePrice] = Field(default={}, description="Price per hour by instance type, machine "
                                              "type, accelerator type or VM size, replacing the table's")
    on_demand: ResourceRates | None = None
    spot: ResourceRates | None = None

    def rates(self, spot: bool) -> ResourceRates | None:
        return (self.spot or self.on_demand) if spot else self.on_demand


@lru_cache(maxsize=32)
def _read_file(uri: str, modified: float | None) -> Prices:
    from pydantic import ValidationError

    from airflow_stepops.artifacts import store_path
    from airflow_stepops.settings.base import format_validation_error

    path = store_path(uri if "://" in uri else f"file://{uri}")
    try:
        return Prices.model_validate(json.loads(path.read_text()))
    except ValidationError as err:
        raise ValueError(format_validation_error(err, f"prices (the price file {uri!r})")) from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"prices: cannot read the price file {uri!r}: {exc}") from None


def overrides(value: Prices | dict[str, Any] | str | None) -> Prices | None:
    """A connection's ``prices``: given inline, or the path (or fsspec URI) of a JSON file of the same shape (a
    local file is read again when it changes)."""
    if value is None or isinstance(value, Prices):
        return value
    if isinstance(value, dict):
        return Prices.model_validate(value)
    local = value[len("file://"):] if value.startswith("file://") else None if "://" in value else value
    try:
        modified = os.stat(local).st_mtime if local else None
    except OSError:
        modified = None
    return _read_file(value, modified)


@dataclass(frozen=True)
class Price:
    """One attempt's price: ``per_hour`` in ``currency`` (None: unknown, ``unknown`` says why)."""

    per_hour: float | None
    currency: str = "USD"
    basis: str = ""  # what is priced: "ml.g5.xlarge x 1, spot"
    source: str = ""  # the table, or the connection's prices
    increment_seconds: int = 1
    minimum_seconds: int = 0
    unknown: str = ""

    @classmethod
    def missing(cls, why: str, basis: str = "") -> Price:
        return cls(None, basis=basis, unknown=why)

    def billed_seconds(self, seconds: float) -> int:
        """``seconds`` of run time as the service bills them."""
        if seconds <= 0:
            return 0
        step = max(self.increment_seconds, 1)
        return max(math.ceil(seconds / step - 1e-9) * step, self.minimum_seconds)

    def cost(self, billed_seconds: float) -> float | None:
        return None if self.per_hour is None else round(self.per_hour * billed_seconds / 3600, 9)

    def seconds_within(self, budget: float) -> int:
        """The longest billed run time that costs at most ``budget`` (0: not even the minimum charge fits)."""
        if self.per_hour is None:
            return 0
        if self.per_hour == 0:
            return 2**31
        step = max(self.increment_seconds, 1)
        seconds = math.floor(budget * 3600 / self.per_hour / step + 1e-9) * step
        return seconds if seconds >= max(self.minimum_seconds, 1) else 0

    def to_json(self) -> dict[str, Any]:
        if self.per_hour is None:
            return {"rate_per_hour": "unknown", "basis": self.basis, "why": self.unknown}
        return {"rate_per_hour": round(self.per_hour, 6), "currency": self.currency, "basis": self.basis,
                "source": self.source, "billing": f"per {self.increment_seconds} s"
                + (f", at least {self.minimum_seconds} s" if self.minimum_seconds else "")}


def machine_price(table: PriceTable, machine: Machine | None, name: str, *, spot: bool, count: int = 1,
                  prices: Prices | None = None, spot_billing: str = "") -> Price:
    """The price of ``count`` machines ``name`` (the table's row ``machine``, None when not in it): the
    connection's price where it names the machine, else the table's, less its discount. ``spot_billing`` says how
    the service bills spot time where it has no spot price of its own (SageMaker)."""
    capacity = "spot" if spot else "on-demand"
    basis = f"{name} x {count}, {capacity}" if count != 1 else f"{name}, {capacity}"
    billing: dict[str, Any] = {"increment_seconds": table.increment_seconds, "minimum_seconds": table.minimum_seconds}
    own = prices.machines.get(name) if prices else None
    if own is not None:
        hourly = own.on_demand if not spot or spot_billing else own.spot
        if hourly is None:
            return Price.missing(f"the connection's prices give {name} no spot price", basis)
        return Price(hourly * count, prices.currency if prices else "USD", basis + spot_billing, "connection prices",
                     **billing)
    if prices is not None and prices.currency != table.currency:
        return Price.missing(f"the connection's prices are in {prices.currency} and name no price for {name}; the "
                             f"table's are in {table.currency}", basis)
    if machine is None:
        return Price.missing(f"{name} is not in the price table; give its price in the connection's prices", basis)
    hourly = machine.price if not spot or spot_billing else machine.spot_price
    if hourly is None:
        return Price.missing(f"the price table has no spot price for {name}; give one in the connection's prices",
                             basis)
    discount = prices.discount if prices else 0.0
    source = table.describe() + (f", less {discount:.0%}" if discount else "")
    return Price(hourly * count * (1 - discount), table.currency, basis + spot_billing, source, **billing)


def resource_price(prices: Prices | None, *, spot: bool, cpus: float | None, memory_gib: float | None,
                   gpus: int = 0, gpu_type: str | None = None, where: str = "the connection",
                   increment_seconds: int = 1) -> Price:
    """The price of what a step reserves, from the connection's resource rates (Kubernetes, local)."""
    capacity = "spot" if spot else "on-demand"
    parts = [f"{cpus:g} CPU" if cpus else "", f"{memory_gib:g} GiB" if memory_gib else "",
             f"{gpus} x {gpu_type or 'GPU'}" if gpus else ""]
    basis = ", ".join(p for p in (*parts, capacity) if p)
    rates = prices.rates(spot) if prices else None
    if rates is None:
        return Price.missing(f"{where} gives no {capacity} prices (prices.{'spot' if spot else 'on_demand'}: "
                             "cpu_hour, memory_gib_hour, gpu_hour)", basis)
    if spot and prices is not None and prices.spot is None:
        basis += " (at on-demand rates: the prices give no spot rates)"
    hourly = rates.hour
    for amount, rate, field, ask in ((cpus, rates.cpu_hour, "cpu_hour", "resources.cpu_count"),
                                     (memory_gib, rates.memory_gib_hour, "memory_gib_hour", "resources.memory")):
        if rate:
            if not amount:
                return Price.missing(f"prices.{field} is set but the step reserves none: set {ask}", basis)
            hourly += amount * rate
        elif amount and rate is None:
            return Price.missing(f"the step reserves what prices.{field} prices, and it is not given", basis)
    if gpus:
        rate = rates.gpu_hour.get(gpu_type or "", rates.gpu_hour.get("*"))
        if rate is None:
            return Price.missing(f"prices.gpu_hour names no price for {gpu_type or 'any GPU'} (nor '*')", basis)
        hourly += gpus * rate
    return Price(hourly, prices.currency if prices else "USD", basis, f"the prices of {where}",
                 increment_seconds=increment_seconds)
