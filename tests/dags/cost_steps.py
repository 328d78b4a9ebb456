"""Steps with a price: on a local step operator whose connection prices CPUs and memory (``priced_local``, set by
tests/conftest.py), one that finishes, one stopped when its accrued cost reaches ``max_cost``, and one ``max_cost``
cannot pay for."""

from __future__ import annotations

from airflow.sdk import DAG, task

PRICED = {"step_operator": "priced_local", "poll_interval": 0.2, "resources": {"cpu_count": 1, "memory": "1GiB"}}

with DAG("cost_steps", schedule=None) as cost_steps:
    @task.step_operator(**PRICED)
    def paid() -> int:
        import time

        time.sleep(1.5)
        return 1

    @task.step_operator(**PRICED, max_cost=0.004)  # 3.96/h: 3 s of run time
    def stopped() -> None:
        import time

        time.sleep(120)

    @task.step_operator(**PRICED, max_cost=0.000001)  # less than one billed second
    def refused() -> None:
        pass

    paid()
    stopped()
    refused()
