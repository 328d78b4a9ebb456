"""What a step costs: the estimate before launch, the share of ``max_cost`` an attempt may spend, and the charge of
each attempt once it ended, as the job summary and ``stepops cost`` record it.

An attempt's price is fixed when it is submitted (``hooks.base.StepOperatorHook.price``) and travels in its job
handle (``handle["cost"]``), so the trigger can stop the job when it has spent its share and the charge is computed
with the price the attempt was started at.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from airflow_stepops.prices import Price

if TYPE_CHECKING:
    from airflow_stepops.hooks.base import JobHandle, StepOperatorHook, StepSpec

#: task_state_store key of the charges of the task instance's earlier tries (XComs do not outlive a try)
CHARGES_KEY = "stepops_charges"
_T = TypeVar("_T")


def estimate(hook: StepOperatorHook, spec: StepSpec) -> dict[str, Any]:
    """The rate of the attempt ``spec`` describes and the most it can cost: the rate over its maximum runtime."""
    price = spec.price or hook.price(spec)
    runtime = hook.max_runtime(spec)
    found = {**price.to_json(), "max_runtime_seconds": runtime}
    if price.per_hour is not None:
        found["most"] = price.cost(price.billed_seconds(runtime)) if runtime else "unbounded (no maximum runtime)"
    return found


def describe(found: dict[str, Any]) -> str:
    """An estimate as a log line."""
    if found["rate_per_hour"] == "unknown":
        return f"{found['basis']}: price unknown ({found['why']})"
    most = found["most"]
    most = f"{most:.4f} {found['currency']} over its {found['max_runtime_seconds']} s maximum runtime" \
        if isinstance(most, float) else most
    return f"{found['basis']}: {found['rate_per_hour']:g} {found['currency']}/h, at most {most}"


def handle_cost(spec: StepSpec, max_cost: float | None, spent: float, max_runtime: int | None) -> dict[str, Any]:
    """What an attempt's handle carries: its price and, under ``max_cost``, the run time its share allows."""
    price = spec.price
    return {"price": dataclasses.asdict(price) if price else None, "max_cost": max_cost, "spent_before": spent,
            "limit_seconds": spec.cost_seconds,
            # the backend's own runtime limit is max_cost's: its "timed out" is the cost limit
            "backend_limit_is_cost": spec.cost_seconds is not None and spec.cost_seconds == max_runtime}


def price_of(handle: JobHandle) -> Price | None:
    found = (handle.get("cost") or {}).get("price")
    return Price(**found) if found else None


def charge(handle: JobHandle, details: dict[str, Any], *, ended: float | None = None) -> dict[str, Any] | None:
    """What the attempt of ``handle`` was billed: the service's billed seconds where it reports them (SageMaker's
    ``BillableTimeInSeconds``), else its run time rounded as the service bills it; None without a price."""
    price = price_of(handle)
    if price is None:
        return None
    started = details.get("started_at")
    billable = details.get("billable_seconds")
    if billable is not None:
        seconds = int(billable)
    elif started:  # a job that ran is billed at least one increment (timestamps of a second's resolution may tie)
        seconds = price.billed_seconds(max(float(details.get("finished_at") or ended or time.time()) - float(started),
                                           1e-3))
    elif details.get("start_unknown"):  # the trigger lost track before it saw the job: it may have run
        return {"amount": None, "currency": price.currency, "billed_seconds": 0, "rate_per_hour": price.per_hour,
                "basis": price.basis, "why": "whether the job ran is not known"}
    else:
        seconds = 0  # it never started: nothing was billed
    found = {"amount": price.cost(seconds), "currency": price.currency, "billed_seconds": seconds,
             "rate_per_hour": price.per_hour, "basis": price.basis}
    return found if price.per_hour is not None else {**found, "why": price.unknown}


def attempt_charge(handle: JobHandle, flavor: str, details: dict[str, Any], ended: float) -> dict[str, Any]:
    """One ended attempt as the ledger keeps it: which job, where, and what it was billed."""
    billed = charge(handle, details, ended=ended) or {
        "amount": None, "billed_seconds": 0, "why": "the job's price was not recorded (it was found by its name, "
        "without a stored handle)"}
    return {"try": int(handle.get("attached_by_try") or handle.get("try_number") or 1),
            "attempt": handle.get("attempt", 1), "step_operator": handle.get("conn_id"), "flavor": flavor,
            "job_id": handle.get("job_id"), "on_demand": bool(handle.get("on_demand")), "ended_at": round(ended, 3),
            **billed}


def _in_store(call: Callable[[], _T]) -> _T:
    """A task state store call. Airflow's in-process runner (``airflow dags test``) unsets its supervisor comms
    while it serves another thread's request (``InProcessSupervisorComms.send``), and a call landing then fails to
    import them: it is made again."""
    for _ in range(49):
        try:
            return call()
        except ImportError:
            time.sleep(0.02)
    return call()


def record_charge(store: Any, found: dict[str, Any]) -> list[dict[str, Any]]:
    """``found`` added to the task instance's charges in the task state store (one per job: a job re-attached by a
    later try is counted once); every charge kept."""
    charges = [c for c in stored_charges(store) if c.get("job_id") != found.get("job_id")] + [found]
    if store is not None:
        _in_store(lambda: store.set(CHARGES_KEY, charges))
    return charges


def stored_charges(store: Any) -> list[dict[str, Any]]:
    kept = _in_store(lambda: store.get(CHARGES_KEY)) if store is not None else None
    return [c for c in kept if isinstance(c, dict)] if isinstance(kept, list) else []


def spent(charges: list[dict[str, Any]]) -> float:
    """What the attempts so far cost (their known charges)."""
    return round(sum(float(c.get("amount") or 0) for c in charges), 9)


def total(charges: list[dict[str, Any]]) -> dict[str, Any]:
    """The sum of charges, or why there is none: a price was unknown, or they are in several currencies."""
    charges = [c for c in charges if c.get("job_id")]  # a refusal at create had no job
    known = [c for c in charges if c.get("amount") is not None]
    currencies = sorted({c["currency"] for c in known})
    if len(known) < len(charges):
        why = next((c.get("why") for c in charges if c.get("amount") is None and c.get("why")), None)
        return {"amount": "unknown", "why": why or "the price of an attempt is unknown; give prices in the connection"}
    if len(currencies) > 1:
        return {"amount": "mixed", "by_currency": {cur: round(sum(c["amount"] for c in known if c["currency"] == cur),
                                                              9) for cur in currencies}}
    return {"amount": round(sum(c["amount"] for c in known), 9), "currency": currencies[0] if currencies else "USD",
            "billed_seconds": sum(c["billed_seconds"] for c in known)}
