"""DAGs used by tests/unit/test_operator.py (run with dag.test(); Airflow loads them from this folder)."""

from __future__ import annotations

import datetime as dt

import step_helpers  # a module of the DAG folder, not installed anywhere: must travel by value
from airflow.sdk import DAG, Param, task

with DAG("step_features", schedule=None, params={"scale": 10}) as step_features:
    @task
    def numbers() -> list[int]:
        return [1, 2, 3]

    @task.step_operator(step_operator="local_step_operator", multiple_outputs=True)
    def stats(values: list[int], label: str, params=None, logical_date=None) -> dict:
        import os

        return {"total": sum(values) * params["scale"], "label": label, "pid": os.getpid(),
                "tripled": step_helpers.triple(sum(values)),
                "date_type": f"{type(logical_date).__module__}.{type(logical_date).__name__}"}

    @task.step_operator(step_operator="local_step_operator", deferrable=False)
    def square(x: int) -> int:
        return x * x

    @task
    def collect(total: int, label: str, squares: list[int]) -> dict:
        return {"total": total, "label": label, "squares": sorted(squares)}

    values = numbers()
    result = stats(values, label="run {{ params.scale }}")
    collect(result["total"], result["label"], square.expand(x=values))


with DAG("step_artifacts", schedule=None) as step_artifacts:
    @task.step_operator(step_operator="local_step_operator")
    def make() -> set:
        return {"a", "b"}  # not JSON: stays in the artifact store

    @task.step_operator(step_operator="local_step_operator")
    def consume(items: set) -> list:
        return [*sorted(items), type(items).__name__]

    @task
    def inspect_ref(ref) -> dict:
        return {"is_ref": type(ref).__name__, "value": sorted(ref.load()), "size": ref.size}

    made = make()
    consume(made)
    inspect_ref(made)


with DAG("step_errors", schedule=None, params={"marker": Param("", type="string")}) as step_errors:
    @task.step_operator(step_operator="local_step_operator", retries=1, retry_delay=dt.timedelta(seconds=0))
    def flaky(path: str) -> str:
        with open(path, "a") as fh:
            fh.write("x")
        with open(path) as fh:
            if len(fh.read()) < 2:
                raise ValueError("first try fails")
        return "second try ok"

    @task.step_operator(step_operator="local_step_operator")
    def broken() -> None:
        raise ValueError("remote boom")

    flaky("{{ params.marker }}")
    broken()


with DAG("step_rerun", schedule=None, params={"marker": Param("", type="string")}) as step_rerun:
    @task.step_operator(step_operator="local_step_operator")
    def count(path: str) -> int:
        with open(path, "a") as fh:
            fh.write("x")
        with open(path) as fh:
            return len(fh.read())

    count("{{ params.marker }}")


with DAG("step_timeout", schedule=None, params={"pid_file": Param("", type="string")}) as step_timeout:
    @task.step_operator(step_operator="local_step_operator", execution_timeout=dt.timedelta(seconds=3))
    def slow(path: str) -> None:
        import os
        import time

        with open(path, "w") as fh:
            fh.write(str(os.getpid()))
        time.sleep(120)

    slow("{{ params.pid_file }}")
