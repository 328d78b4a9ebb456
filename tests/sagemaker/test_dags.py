"""SageMaker steps through Airflow's own ``dag.test()``: XComs, S3 artifacts, mapping, the example DAG."""

from __future__ import annotations

import pytest

pytest.importorskip("moto")

from tests.dags import flavor_pipelines

from ..flavorjobs import render, run_example, run_pipeline

pytestmark = pytest.mark.usefixtures("airflow_db", "sm_emulator")


def _jobs(sm, run_id: str, task_id: str) -> list[dict]:
    sagemaker = sm.client("sagemaker")
    found = []
    for job in sm.jobs:
        tags = {t["Key"]: t["Value"] for t in sagemaker.list_tags(ResourceArn=job["TrainingJobArn"])["Tags"]}
        if tags.get("stepops:run-id") == run_id and tags.get("stepops:task-id") == task_id:
            found.append(sm.describe(job["TrainingJobName"]))
    return found


def test_pipeline_with_xcoms_s3_artifacts_and_mapping(sm_emulator):
    run, _, ref, record = run_pipeline(flavor_pipelines.sm_pipeline, "sagemaker")
    assert ref.uri.startswith("s3://stepops-tests/artifacts/sm_pipeline/")
    [train_job] = _jobs(sm_emulator, run.run_id, "train")
    assert train_job["ResourceConfig"]["InstanceType"] == "ml.m5.2xlarge"  # cheapest with 8 CPUs, 32 GB
    [evaluate_job] = _jobs(sm_emulator, run.run_id, "evaluate")
    assert evaluate_job["ResourceConfig"]["InstanceType"] == "ml.g5.xlarge"
    assert [c["ChannelName"] for c in evaluate_job["InputDataConfig"]] == ["bundle", "ref0"]
    assert record["instance_type"] == "ml.m5.2xlarge"
    assert record["console_url"].endswith(f"#/jobs/{record['job_id']}")


def test_sagemaker_example_dag_runs_on_the_emulator(sm_emulator):
    run, _ = run_example("sagemaker_training", train_on_sagemaker={"w": 1.5, "b": 0.25, "epochs": 20})
    [job] = _jobs(sm_emulator, run.run_id, "train_on_sagemaker")
    assert job["EnableManagedSpotTraining"] is True and job["ResourceConfig"]["InstanceType"] == "ml.p3.2xlarge"
    assert job["StoppingCondition"]["MaxWaitTimeInSeconds"] >= job["StoppingCondition"]["MaxRuntimeInSeconds"]


def test_stepops_render_prints_the_create_training_job_request(sm_emulator):
    request = render(sm_emulator, "sagemaker", "sm_pipeline", "train")["request"]
    assert request["ResourceConfig"]["InstanceType"] == "ml.m5.2xlarge"
    assert request["RoleArn"].startswith("arn:aws:iam::") and request["InputDataConfig"][0]["ChannelName"] == "bundle"
