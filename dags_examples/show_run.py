"""Print what each task of a DAG's latest run did (used by ``make demo``).

``python dags_examples/show_run.py DAG_ID [LOG]``: for every task, where it ran and what it returned; for
a delegated step also what it ran on (the flavor's job summary: host and CPUs, instance type, machine and
accelerator, VM size, GPU, node...) and, given the ``airflow dags test`` log (at INFO level), the output
lines the step streamed. ArtifactRef results are printed with their whole URI.
"""

from __future__ import annotations

import re
import sys

#: job summary keys that say when or how it ended, not what it ran on (those are printed on their own)
_NOT_PLACE = {"flavor", "step_operator", "job_id", "console_url", "started_at", "finished_at", "reason", "exit_code"}
_START = re.compile(r"\[DAG TEST\] starting task_id=(\S+)")
#: a line the step streamed: the trigger logs it as "[<flavor>] <line>" (triggers/base.py)
_STREAMED = re.compile(r"\[info\s*\] \[(?:local|kubernetes|sagemaker|vertex|azureml|modal)\] (.*?) \[airflow_stepops\.")


def streamed_lines(log_text: str) -> dict[str, list[str]]:
    """Task id -> the step output lines logged while that task ran."""
    lines: dict[str, list[str]] = {}
    task = None
    for line in log_text.splitlines():
        if (start := _START.search(line)) is not None:
            task = start.group(1)
        elif task is not None and (out := _STREAMED.search(line)) is not None:
            lines.setdefault(task, []).append(out.group(1))
    return lines


def _ran_on(job: dict) -> str:
    place = ", ".join(f"{k}={v}" for k, v in job.items() if k not in _NOT_PLACE and v not in (None, "", [], {}))
    return (f"{job['flavor']} step operator {job['step_operator']!r}, job {job['job_id']}"
            + (f"\n{'':<27}ran as: {place}" if place else "")
            + (f"\n{'':<27}console: {job['console_url']}" if job.get("console_url") else ""))


def _result(value) -> str:
    from airflow_stepops.artifacts import ArtifactRef

    if isinstance(value, ArtifactRef):
        return f"ArtifactRef of {value.type}, {value.size} bytes\n{'':<27}uri: {value.uri}"
    if isinstance(value, dict):  # strings (URIs) whole, other values shortened
        return "{" + ", ".join(f"{k!r}: {v!r}" if isinstance(v, str) else f"{k!r}: {_short(v, 60)}"
                               for k, v in value.items()) + "}"
    return _short(value, 160)


def _short(value, limit: int) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def main(dag_id: str, log_path: str | None = None) -> int:
    from airflow.models import DagRun, TaskInstance
    from airflow.models.xcom import XComModel
    from airflow.sdk.serde import deserialize
    from airflow.utils.session import create_session

    import airflow_stepops.artifacts  # noqa: F401  (lets serde rebuild ArtifactRef results)

    streamed = {}
    if log_path:
        with open(log_path, encoding="utf-8", errors="replace") as fh:
            streamed = streamed_lines(fh.read())
    with create_session() as session:
        run = session.query(DagRun).filter(DagRun.dag_id == dag_id).order_by(DagRun.id.desc()).first()
        if run is None:
            print(f"no run of {dag_id}")
            return 1
        print(f"\n{dag_id} run {run.run_id}: {run.state}")
        tis = session.query(TaskInstance).filter(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run.run_id)
        for ti in sorted(tis, key=lambda t: t.start_date or t.queued_dttm or run.start_date):
            xcoms = {x.key: x.value for x in session.query(XComModel).filter(
                XComModel.dag_id == dag_id, XComModel.run_id == run.run_id, XComModel.task_id == ti.task_id)}
            job = XComModel.deserialize_value(_Row(xcoms["stepops_job"])) if "stepops_job" in xcoms else None
            result = XComModel.deserialize_value(_Row(xcoms["return_value"])) if "return_value" in xcoms else None
            if isinstance(result, dict) and "__classname__" in result:
                result = deserialize(result)
            print(f"  {ti.task_id:<24} {ti.state:<8} ran on: {_ran_on(job) if job else f'Airflow worker ({ti.hostname})'}")
            for line in streamed.get(ti.task_id, []):
                print(f"  {'':<24} | {line}")
            print(f"  {'':<24} result: {_result(result)}")
        return 0 if run.state == "success" else 1


class _Row:
    def __init__(self, value):
        self.value = value


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
