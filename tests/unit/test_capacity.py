"""The capacity policy of a step: how many preemptions it absorbs and when it escalates to on-demand capacity."""

from __future__ import annotations

import pytest

from airflow_stepops.capacity import CapacityPolicy
from airflow_stepops.settings.vertex import VertexStepOperatorSettings


@pytest.mark.parametrize(("policy", "spot", "on_demand"), [
    # attempt 2, 3, 4 follow 1, 2, 3 preemptions: which of them run on-demand
    ({}, True, [False, False, True]),  # on_demand_last with spot: the budget's last attempt
    ({}, False, [False, False, False]),  # nothing to escalate from
    ({"on_preemption": "on_demand"}, True, [True, True, True]),
    ({"on_preemption": "retry"}, True, [False, False, False]),
    ({"preemption_retries": 1}, True, [True]),
])
def test_escalation_follows_the_budget(policy, spot, on_demand):
    capacity = CapacityPolicy(**policy)
    assert [capacity.on_demand_after(n, spot) for n in range(1, capacity.retries + 1)] == on_demand
    assert capacity.on_demand_after(0, spot) is False  # the first attempt runs as the settings say


def test_fail_allows_no_new_attempt_and_arguments_win_over_settings():
    assert CapacityPolicy(on_preemption="fail").retries == 0
    settings = VertexStepOperatorSettings(preemption_retries=1, max_queue_seconds=60)
    merged = CapacityPolicy(preemption_retries=5).over(settings)
    assert (merged.retries, merged.max_queue_seconds, merged.on_preemption) == (5, 60, None)
    assert CapacityPolicy().over(None).retries == 3
