"""Steps with a price: on a local step operator whose connection prices CPUs and memory (``priced_local``, set by
tests/conftest.py), one that finishes, one stopped when its accrued cost reaches ``max_cost``, and one ``max_cost``
cannot pay for."""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import DAG, task

HOURS_2 = timedelta(hours=2)
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

    @task.step_operator(**PRICED, execution_timeout=timedelta(seconds=3))
    def timed_out() -> None:  # stopped at its execution_timeout: its run is still billed
        import time

        time.sleep(120)

    @task.step_operator(**PRICED, max_cost=0.0066, retries=1, retry_delay=timedelta(0))  # 6 s
    def retried() -> None:
        """Fails after 3 s billed: its retry gets the 3 s left of its budget, and is stopped before it fails."""
        import time

        time.sleep(2.5)
        raise ValueError("the step fails")

    paid()
    stopped()
    refused()
    timed_out()
    retried()


#: one step per flavor, for ``stepops render``: its estimate, and the run time its max_cost pays for
ESTIMATED = {"local": "priced_local", "kubernetes": "k8s_priced", "sagemaker": "sagemaker_step_operator",
             "vertex": "vertex_step_operator", "azureml": "azureml_step_operator", "modal": "modal_step_operator"}


def estimated() -> int:
    return 1


with DAG("cost_estimates", schedule=None) as cost_estimates:
    for _flavor, _conn in ESTIMATED.items():
        task.step_operator(task_id=f"on_{_flavor}", step_operator=_conn, max_cost=50.0, execution_timeout=HOURS_2,
                           resources={"cpu_count": 1, "memory": "1GiB"})(estimated)()
