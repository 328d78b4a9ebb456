"""Regressions found by the end-to-end suite: each test states the behaviour users need."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.timeout(420)
def test_step_task_consumes_mapped_results_directly(airflow_env, dags_test):
    run = dags_test("stepops_e2e_mapped")  # branch double.expand(x=[1, 2, 3]) -> lazy_total
    ti = airflow_env.ti("stepops_e2e_mapped", run.run_id, "lazy_total")
    assert ti["state"] == "success", run.output_tail(40)
    assert airflow_env.xcom("stepops_e2e_mapped", run.run_id, "lazy_total") == 12


MAPPED_WITH_RESOURCES = '''
from airflow.sdk import dag, task
from airflow_stepops import ResourceSettings


@dag(dag_id="resources_as_dict", schedule=None)
def resources_as_dict():
    @task.step_operator(step_operator="local_step_operator", resources={"cpu_count": 1})
    def square(x):
        return x * x

    square.expand(x=[1, 2])


@dag(dag_id="resources_as_model", schedule=None)
def resources_as_model():
    @task.step_operator(step_operator="local_step_operator", resources=ResourceSettings(cpu_count=1))
    def square(x):
        return x * x

    square.expand(x=[1, 2])


resources_as_dict()
resources_as_model()
print("parsed")
'''


@pytest.mark.timeout(240)
def test_mapped_step_task_with_resources_argument_parses(airflow_env, tmp_path):
    dag_file = tmp_path / "mapped_with_resources.py"
    dag_file.write_text(textwrap.dedent(MAPPED_WITH_RESOURCES))
    proc = subprocess.run([sys.executable, str(dag_file)], env=airflow_env.env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("parsed"), proc.stderr[-3000:]
