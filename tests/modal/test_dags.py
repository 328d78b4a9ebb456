"""Modal steps through Airflow's own ``dag.test()``: XComs, artifacts, mapping, the example DAG."""

from __future__ import annotations

import pytest

pytest.importorskip("modal")

from tests.dags import flavor_pipelines

from ..flavorjobs import render, run_example, run_pipeline
from ..unit.test_operator import _xcom

pytestmark = pytest.mark.usefixtures("airflow_db", "md_emulator", "modal_step_operator")


def _function(md, ti) -> dict:
    record = _xcom(ti, key="stepops_job")
    assert record["flavor"] == "modal" and record["job_id"].startswith("fc-")
    return md.function(record["app_name"], "run_step")


def test_pipeline_with_xcoms_artifacts_and_mapping(md_emulator):
    _, tis, _, _ = run_pipeline(flavor_pipelines.md_pipeline, "modal")
    train = _function(md_emulator, tis["train"])
    assert train["milli_cpu"] == 2000 and train["memory_mb"] == 4096
    evaluate = _function(md_emulator, tis["evaluate"])
    assert evaluate["gpu"] == ["A100-80GB:2"] and evaluate["timeout_secs"] == 900
    record = _xcom(tis["evaluate"], key="stepops_job")
    assert record["console_url"] == f"https://modal.com/id/{record['job_id']}"


def test_modal_example_dag_runs_on_the_emulator(md_emulator):
    _, tis = run_example("modal_training", train_on_modal={"w": 1.5, "b": 0.25, "epochs": 20}, evaluate=0.0)
    train = _function(md_emulator, tis["train_on_modal"])
    assert train["gpu"] == ["ANY"] and train["milli_cpu"] == 4000 and train["memory_mb"] == 16384
    evaluate = _function(md_emulator, tis["evaluate"])
    assert evaluate["gpu"] == ["L4"] and evaluate["memory_mb"] == 7630
    featurize = _function(md_emulator, tis["featurize"])
    assert featurize["gpu"] == ["H100", "A100-80GB"]


def test_stepops_render_prints_the_function_options(md_emulator):
    request = render(md_emulator, "modal", "md_pipeline", "evaluate")["request"]
    assert request["function"] == "run_step"
    assert request["options"]["gpu"] == "A100-80GB:2" and request["options"]["timeout"] == 900
