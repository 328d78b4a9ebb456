"""Print where each task of a DAG's latest run ran and what it returned (used by ``make demo``)."""

from __future__ import annotations

import sys


def main(dag_id: str) -> int:
    from airflow.models import DagRun, TaskInstance
    from airflow.models.xcom import XComModel
    from airflow.sdk.serde import deserialize
    from airflow.utils.session import create_session

    import airflow_stepops.artifacts  # noqa: F401  (lets serde rebuild ArtifactRef results)

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
            where = (f"{job['flavor']} step operator {job['step_operator']!r}, job {job['job_id']}"
                     if job else f"Airflow worker ({ti.hostname})")
            result = XComModel.deserialize_value(_Row(xcoms["return_value"])) if "return_value" in xcoms else None
            if isinstance(result, dict) and "__classname__" in result:
                result = deserialize(result)
            text = str(result)
            print(f"  {ti.task_id:<24} {ti.state:<8} ran on: {where}")
            print(f"  {'':<24} result: {text if len(text) < 160 else text[:157] + '...'}")
        return 0 if run.state == "success" else 1


class _Row:
    def __init__(self, value):
        self.value = value


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
