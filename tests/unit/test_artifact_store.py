"""An artifact store whose bucket does not exist is refused before anything is written, and never
created: checked with the real fsspec clients against the S3 (moto) and GCS (fake-gcs-server) emulators."""

from __future__ import annotations

import json
import os

import pytest

from airflow_stepops.exceptions import StepOperatorConfigError


def _hook(flavor: str, conn_id: str, artifact_store: str):
    from airflow_stepops.flavors import get_flavor

    extra = json.loads(os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"])["extra"]
    config = get_flavor(flavor).config_model().model_validate({**extra, "artifact_store": artifact_store})
    return get_flavor(flavor).hook()(conn_id, config=config)


def _write_as_the_operator_does(hook) -> None:
    """The operator's own bundle writing: validate the request, check the store, write."""
    from airflow_stepops.bundle import StepIdentity
    from airflow_stepops.flavors import _import, get_flavor

    operator = _import(get_flavor(hook.flavor).operator_class)(task_id="t", python_callable=len, op_args=[[1]],
                                                               step_operator=hook.step_operator_conn_id)
    operator.write_step_bundle({}, hook, StepIdentity("d", "r", "t", -1, 1))


def test_a_misspelt_s3_bucket_is_refused_and_not_created(sm_emulator):
    hook = _hook("sagemaker", "sagemaker_step_operator", "s3://stepops-tset/artifacts")
    with pytest.raises(StepOperatorConfigError, match=r"bucket 'stepops-tset' .* does not exist.*aws s3 mb s3://stepops-tset"):
        _write_as_the_operator_does(hook)
    buckets = [b["Name"] for b in sm_emulator.client("s3").list_buckets()["Buckets"]]
    assert "stepops-tset" not in buckets and "stepops-tests" in buckets


def test_an_existing_s3_bucket_is_used(sm_emulator):
    _write_as_the_operator_does(_hook("sagemaker", "sagemaker_step_operator", "s3://stepops-tests/store-check"))
    listed = sm_emulator.client("s3").list_objects_v2(Bucket="stepops-tests", Prefix="store-check/")
    assert any(o["Key"].endswith("bundle/meta.json") for o in listed.get("Contents", []))


def test_a_misspelt_gcs_bucket_is_refused_and_not_created(vx_emulator):
    from airflow.sdk import ObjectStoragePath

    hook = _hook("vertex", "vertex_step_operator", "gs://stepops-tset/artifacts")
    with pytest.raises(StepOperatorConfigError, match=r"bucket 'stepops-tset' .* gcloud storage buckets create"):
        _write_as_the_operator_does(hook)
    fs = ObjectStoragePath("gs://google_cloud_default@stepops-tests/").fs
    assert not fs.exists("stepops-tset")
    _write_as_the_operator_does(_hook("vertex", "vertex_step_operator", "gs://stepops-tests/store-check"))


def test_a_local_store_directory_is_still_created(tmp_path):
    from airflow_stepops.artifacts import check_bucket, store_path

    root = store_path(f"file://{tmp_path}/new/artifacts")
    check_bucket(root)
    (root / "x").mkdir(parents=True)
    assert (tmp_path / "new" / "artifacts" / "x").is_dir()
