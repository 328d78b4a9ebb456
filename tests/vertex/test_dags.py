"""Vertex steps through Airflow's own ``dag.test()``: XComs, GCS artifacts, mapping, the example DAG."""

from __future__ import annotations

import pytest

pytest.importorskip("google.cloud.aiplatform_v1")

from tests.dags import flavor_pipelines

from ..flavorjobs import render, run_example, run_pipeline

pytestmark = pytest.mark.usefixtures("airflow_db", "vx_emulator")


def _jobs(vx, task_id: str, dag_id: str) -> list[dict]:
    return [j for j in vx.jobs if j["labels"].get("stepops-task") == task_id
            and j["labels"].get("stepops-dag") == dag_id]


def test_pipeline_with_xcoms_gcs_artifacts_and_mapping(vx_emulator):
    _, _, ref, record = run_pipeline(flavor_pipelines.vx_pipeline, "vertex")
    assert ref.uri.startswith("gs://google_cloud_default@stepops-tests/artifacts/vx_pipeline/")
    train_job = _jobs(vx_emulator, "train", "vx_pipeline")[-1]
    assert train_job["jobSpec"]["workerPoolSpecs"][0]["machineSpec"] == {"machineType": "e2-standard-8"}
    evaluate_job = _jobs(vx_emulator, "evaluate", "vx_pipeline")[-1]
    assert evaluate_job["labels"]["stage"] == "eval"
    assert evaluate_job["jobSpec"]["workerPoolSpecs"][0]["machineSpec"]["acceleratorType"] == "NVIDIA_TESLA_A100"
    assert record["machine_type"] == "e2-standard-8"
    assert record["console_url"].endswith(f"/training/{record['job_id']}/cpu?project={vx_emulator.project}")


def test_vertex_example_dag_runs_on_the_emulator(vx_emulator):
    run_example("vertex_training", train_on_vertex={"w": 1.5, "b": 0.25, "epochs": 20}, evaluate=0.0)
    train = _jobs(vx_emulator, "train_on_vertex", "vertex_training")[-1]
    assert train["jobSpec"]["scheduling"]["strategy"] == "SPOT"
    assert train["jobSpec"]["workerPoolSpecs"][0]["machineSpec"] == {
        "machineType": "n1-standard-8", "acceleratorType": "NVIDIA_TESLA_V100", "acceleratorCount": 2}
    evaluate = _jobs(vx_emulator, "evaluate", "vertex_training")[-1]
    assert evaluate["jobSpec"]["workerPoolSpecs"][0]["machineSpec"]["machineType"] == "g2-standard-4"


def test_stepops_render_prints_the_custom_job_body(vx_emulator):
    request = render(vx_emulator, "vertex", "vx_pipeline", "train")["request"]
    assert request["displayName"].startswith("vx-pipeline-train-")
    assert request["jobSpec"]["workerPoolSpecs"][0]["machineSpec"]["machineType"] == "e2-standard-8"
