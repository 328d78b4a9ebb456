"""The blob artifact store is checked before anything is written: a missing container is refused (never
created), and an abfs:// container that the job's datastore does not reach is refused before the bundle
goes into it. Real adlfs and azure-ai-ml clients against Azurite and the Azure ML emulator."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("azure.ai.ml")

from airflow_stepops.bundle import StepIdentity
from airflow_stepops.exceptions import StepOperatorConfigError
from airflow_stepops.hooks.azureml import AzureMLStepOperatorHook
from airflow_stepops.settings.azureml import AzureMLStepOperatorConfig


def _hook(artifact_store: str) -> AzureMLStepOperatorHook:
    extra = json.loads(os.environ["AIRFLOW_CONN_AZUREML_STEP_OPERATOR"])["extra"]
    config = AzureMLStepOperatorConfig.model_validate({**extra, "artifact_store": artifact_store})
    return AzureMLStepOperatorHook("azureml_step_operator", config=config)


def _write_as_the_operator_does(hook: AzureMLStepOperatorHook) -> None:
    """The operator's own bundle writing: validate the request, check the store, write."""
    from airflow_stepops.operators.azureml import AzureMLStepOperator

    operator = AzureMLStepOperator(task_id="t", python_callable=len, op_args=[[1]],
                                   step_operator=hook.step_operator_conn_id)
    operator.write_step_bundle({}, hook, StepIdentity("d", "r", "t", -1, 1))


def _blobs(az_emulator, container: str) -> list[str] | None:
    client = az_emulator.blob_service_client().get_container_client(container)
    return [b.name for b in client.list_blobs()] if client.exists() else None


def test_a_missing_container_is_refused_and_not_created(az_emulator):
    with pytest.raises(StepOperatorConfigError, match=r"container 'stepops-missing' .* does not exist.*"
                                                      r"az storage container create --name stepops-missing"):
        _write_as_the_operator_does(_hook("abfs://azurite_storage@stepops-missing/artifacts"))
    assert _blobs(az_emulator, "stepops-missing") is None


def test_a_container_the_datastore_does_not_reach_gets_nothing_written(az_emulator):
    az_emulator.create_container("stepops-elsewhere")
    with pytest.raises(StepOperatorConfigError, match=r"datastore: 'workspaceblobstore' points at the container"):
        _write_as_the_operator_does(_hook("abfs://azurite_storage@stepops-elsewhere/artifacts"))
    assert _blobs(az_emulator, "stepops-elsewhere") == []
