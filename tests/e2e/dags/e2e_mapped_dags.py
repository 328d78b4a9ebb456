"""Mapping and ``multiple_outputs`` with step tasks (run with ``airflow dags test``).

Independent branches, so one failing branch does not hide what the others do:

- ``numbers -> square.partial(offset=100).expand(x=...) -> collect``: a ``.expand()``-mapped step task;
- ``kw_step(a=..., b=...)``: a step task called with keyword arguments;
- ``double.expand(x=[1, 2, 3]) -> gather -> stats -> report``: a ``multiple_outputs=True`` step task
  whose outputs are read key by key downstream;
- ``double.expand(...) -> lazy_total``: a step task given a mapped task's results as they come
  (a lazy XCom sequence).
"""

from __future__ import annotations

from airflow.sdk import dag, task

from airflow_stepops import ResourceSettings


@dag(dag_id="stepops_e2e_mapped", schedule=None, catchup=False, tags=["stepops-e2e"])
def stepops_e2e_mapped():
    # --- a mapped step task -------------------------------------------------------------------
    @task
    def numbers():
        return [1, 2, 3]

    # settings={"resources": ...} rather than resources=...: see test_regressions.py
    @task.step_operator(step_operator="local_step_operator",
                        settings={"resources": ResourceSettings(cpu_count=1)})
    def square(x, offset, run_id=None):
        import os

        print(f"e2e-square x={x}", flush=True)
        return {"x": x, "square": x * x + offset, "pid": os.getpid(), "run_id": run_id}

    @task
    def collect(values):
        return sorted(v["square"] for v in values)

    collect(square.partial(offset=100).expand(x=numbers()))

    # --- keyword arguments ----------------------------------------------------------------------
    @task.step_operator(step_operator="local_step_operator")
    def kw_step(a, b):
        return f"{a}-{b}"

    kw_step(a=1, b="two")

    # --- multiple_outputs=True ----------------------------------------------------------------
    @task
    def double(x):
        return 2 * x

    @task.step_operator(step_operator="local_step_operator", multiple_outputs=True)
    def stats(values):
        values = list(values)
        return {"total": sum(values), "count": len(values), "maximum": max(values)}

    @task
    def report(total, count, maximum):
        return [total, count, maximum]

    @task
    def gather(values):
        return list(values)

    # the mapped results are made a list first: see lazy_total below and test_known_bugs.py
    doubles = double.expand(x=[1, 2, 3])
    summary = stats(gather(doubles))
    report(summary["total"], summary["count"], summary["maximum"])

    # --- a step task consuming mapped results directly (a lazy XCom sequence) ------------------
    @task.step_operator(step_operator="local_step_operator")
    def lazy_total(values):
        return sum(values)

    lazy_total(doubles)


stepops_e2e_mapped()
