"""Azure ML steps through Airflow's own ``dag.test()``: XComs, blob artifacts, mapping, the example DAG."""

from __future__ import annotations

import pytest

pytest.importorskip("azure.ai.ml")

from tests.dags import flavor_pipelines

from ..flavorjobs import render, run_example, run_pipeline

pytestmark = pytest.mark.usefixtures("airflow_db", "az_emulator")


def _jobs(az, task_id: str, dag_id: str) -> list[dict]:
    return [j for j in az.jobs if j["properties"]["tags"].get("stepops-task") == task_id
            and j["properties"]["tags"].get("stepops-dag") == dag_id]


def test_pipeline_with_xcoms_blob_artifacts_and_mapping(az_emulator):
    _, _, ref, record = run_pipeline(flavor_pipelines.az_pipeline, "azureml")
    assert ref.uri.startswith(f"abfs://azurite_storage@{az_emulator.datastores['workspaceblobstore']}/artifacts/"
                              "az_pipeline/")
    train_job = _jobs(az_emulator, "train", "az_pipeline")[-1]
    assert train_job["properties"]["resources"]["instanceType"] == "Standard_D8s_v3"
    evaluate_job = _jobs(az_emulator, "evaluate", "az_pipeline")[-1]
    assert evaluate_job["properties"]["tags"]["stage"] == "eval" and evaluate_job["spot"]
    assert evaluate_job["properties"]["inputs"]["ref_0"]["jobInputType"] == "uri_file"  # the model, read in place
    doubles = _jobs(az_emulator, "double", "az_pipeline")
    assert len(doubles) == 2 and all(j["compute"] == "cpu-cluster" for j in doubles)
    assert record["instance_type"] == "Standard_D8s_v3"
    assert record["console_url"].startswith(f"https://ml.azure.com/runs/{record['job_id']}?wsid=/subscriptions/")


def test_azureml_example_dag_runs_on_the_emulator(az_emulator):
    run_example("azureml_training", train_on_azureml={"w": 1.5, "b": 0.25, "epochs": 20}, evaluate=0.0)
    train = _jobs(az_emulator, "train_on_azureml", "azureml_training")[-1]
    assert train["compute"] == "gpu-cluster" and train["properties"]["resources"]["shmSize"] == "16g"
    assert train["properties"]["environmentVariables"]["TRAINING_MODE"] == "full"
    evaluate = _jobs(az_emulator, "evaluate", "azureml_training")[-1]
    assert evaluate["properties"]["resources"]["instanceType"] == "Standard_NC4as_T4_v3"
    assert evaluate["properties"]["queueSettings"]["jobTier"] == "Spot"


def test_stepops_render_prints_the_job_body(az_emulator):
    request = render(az_emulator, "azureml", "az_pipeline", "train")["request"]
    assert request["name"].startswith("az_pipeline-train-")
    assert request["properties"]["resources"]["instanceType"] == "Standard_D8s_v3"
    assert request["properties"]["inputs"]["bundle"]["uri"].startswith("azureml://datastores/workspaceblobstore/")
