"""What a step does when capacity fails it, and what it may spend: the preemption budget, escalation to on-demand
capacity, how long a job may queue before the step moves on to its next step operator, and ``max_cost``.

The same fields are arguments of the operators and ``@task.step_operator`` and settings of every flavor; an
argument wins over the flavor's setting, which wins over the default.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from airflow_stepops.runtime.protocol import Env

#: ``retry``: the same capacity every time; ``on_demand_last``: the budget's last attempt on on-demand capacity (the
#: default with spot); ``on_demand``: every attempt after the first preemption; ``fail``: no new attempt
OnPreemption = Literal["retry", "on_demand_last", "on_demand", "fail"]
DEFAULT_PREEMPTION_RETRIES = 3


class CapacityFields(BaseModel):
    """The fields, shared by the flavors' settings and ``CapacityPolicy``."""

    preemption_retries: int | None = Field(
        default=None, ge=0, description="Preempted jobs submitted again within one Airflow try, each a new job "
        f"resuming from {Env.CHECKPOINT_DIR} (default {DEFAULT_PREEMPTION_RETRIES}); Airflow's retries stay for "
        "the step's own errors.")
    on_preemption: OnPreemption | None = Field(
        default=None, description="After a preemption: 'retry' on the same capacity, 'on_demand_last' (the last "
        "attempt on on-demand capacity; the default with spot), 'on_demand' (every attempt after the first "
        "preemption) or 'fail'.")
    max_queue_seconds: float | None = Field(
        default=None, gt=0, description="How long a job may wait for capacity before that counts as a capacity "
        "failure (the next step operator of a list is tried).")
    max_cost: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, strict=True, description="The most the step may cost, every attempt and retry "
        "included, in the currency of the step operator's prices: refused before submitting when it cannot fit or its price "
        "is unknown; stopped (StepCostLimitError) when its accrued cost reaches it.")


class CapacityPolicy(CapacityFields):
    """One step's policy on one step operator."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def over(self, other: CapacityFields | None) -> CapacityPolicy:
        """This policy's fields where set, else ``other``'s."""
        if other is None:
            return self
        names = CapacityFields.model_fields
        return CapacityPolicy(**{n: v if (v := getattr(self, n)) is not None else getattr(other, n) for n in names})

    @property
    def retries(self) -> int:
        if self.on_preemption == "fail":
            return 0
        return DEFAULT_PREEMPTION_RETRIES if self.preemption_retries is None else self.preemption_retries

    def on_demand_after(self, preemptions: int, spot: bool) -> bool:
        """Whether the attempt that follows ``preemptions`` preemptions runs on on-demand capacity."""
        if not spot or preemptions == 0:
            return False
        policy = self.on_preemption or "on_demand_last"
        return policy == "on_demand" or (policy == "on_demand_last" and preemptions >= self.retries)
