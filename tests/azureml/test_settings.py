"""Azure ML settings and VM size choice: what Azure ML would refuse is refused at parse time or before submit."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from airflow_stepops.exceptions import StepOperatorConfigError
from airflow_stepops.resources import ResourceSettings
from airflow_stepops.settings.azureml import AzureMLStepOperatorConfig, AzureMLStepOperatorSettings
from airflow_stepops.settings.azureml_vms import choose_vm_size, lookup

from ..flavorjobs import declare

WORKSPACE = {"subscription_id": "00000000-0000-0000-0000-000000000000", "resource_group": "rg",
             "workspace_name": "stepops-ws"}


@pytest.mark.parametrize(("resources", "size"), [
    (ResourceSettings(cpu_count=2), "Standard_F2s_v2"),
    (ResourceSettings(cpu_count=4, memory="16GiB"), "Standard_D4s_v3"),
    (ResourceSettings(cpu_count=4, memory="30GB"), "Standard_E4s_v3"),
    (ResourceSettings(cpu_count=16, memory="16GB"), "Standard_F16s_v2"),
    (ResourceSettings(gpu_count=1), "Standard_NC4as_T4_v3"),
    (ResourceSettings(gpu_type="T4", gpu_count=4), "Standard_NC64as_T4_v3"),
    (ResourceSettings(gpu_type="V100", gpu_count=2), "Standard_NC12s_v3"),
    (ResourceSettings(gpu_type="A100"), "Standard_NC24ads_A100_v4"),
    (ResourceSettings(gpu_type="A100", gpu_count=8), "Standard_ND96asr_v4"),
    (ResourceSettings(gpu_type="A100-80GB", gpu_count=8), "Standard_ND96amsr_A100_v4"),
    (ResourceSettings(gpu_type="H100"), "Standard_NC40ads_H100_v5"),
    (ResourceSettings(gpu_type="H100", gpu_count=8), "Standard_ND96isr_H100_v5"),
    (ResourceSettings(gpu_type="A10"), "Standard_NV36ads_A10_v5"),  # not a fraction of one
])
def test_cheapest_vm_size_that_fits(resources, size):
    assert choose_vm_size(resources).name == size


@pytest.mark.parametrize(("resources", "message"), [
    (ResourceSettings(gpu_type="L4"), r"gpu_type: L4 is not offered by Azure ML VM sizes in the table; GPU types: "
                                      r"A10, A100, A100-80GB, H100, T4, V100"),
    (ResourceSettings(cpu_count=500), r"no Azure ML VM size fits; nearest: Standard_NC96ads_A100_v4 \(96 vCPU"),
    (ResourceSettings(gpu_type="V100", gpu_count=16), r"nearest: Standard_NC24r?s_v3"),
])
def test_impossible_resources_list_the_nearest(resources, message):
    with pytest.raises(ValueError, match=message):
        choose_vm_size(resources)


@pytest.mark.parametrize(("size", "message"), [
    ("Standard_D5s_v3", r"unknown Azure ML VM size 'Standard_D5s_v3'; sizes of that family: Standard_D2s_v3"),
    ("Standard_NC6", r"unknown Azure ML VM size 'Standard_NC6'; sizes of that family: Standard_NC"),
    ("d4s_v3", r"is not an Azure VM size"),
])
def test_unknown_vm_sizes(size, message):
    with pytest.raises(ValueError, match=message):
        lookup(size)
    assert lookup("standard_d4s_v3").name == "Standard_D4s_v3"


@pytest.mark.parametrize(("settings", "message"), [
    ({"instance_type": "D4s_v3"}, r"'D4s_v3' is not an Azure VM size"),
    ({"job_tier": "Cheap"}, r"job_tier: 'Cheap' is not an Azure ML job tier; allowed: Spot, Basic, Standard, Premium"),
    ({"job_tier": "Spot", "compute_target_name": "gpu-cluster"}, r"job tiers are for serverless compute"),
    ({"instance_type": "Standard_D4s_v3", "compute_target_name": "gpu-cluster"}, r"a cluster has its own VM size"),
    ({"instance_count": 2}, r"instance_count"),
    ({"shm_size": "lots"}, r"shm_size: 'lots' is not a shared memory size"),
    ({"shm_size": "0g"}, r"shm_size"),
    ({"environment_variables": {"STEPOPS_X": "1"}}, r"reserved for the runtime"),
    ({"tags": {"stepops-step": "x"}}, r"are the step operator's own"),
    ({"tags": {"k" * 101: "v"}}, r"Azure ML tag keys are 1-100 characters, values at most 1000"),
    ({"tags": {"k": "v" * 1001}}, r"Azure ML tag keys are 1-100 characters"),
    ({"tags": {f"t{i}": "v" for i in range(51)}}, r"51 tags; an Azure ML job takes at most 50"),
    ({"experiment_name": "my experiment"}, r"is not a valid experiment name"),
    ({"compute_target_name": "x"}, r"is not an Azure ML compute name"),
    ({"instance_type": "Standard_D2s_v3", "max_runtime_in_seconds": 0}, r"max_runtime_in_seconds"),
])
def test_bad_settings_fail_at_parse_time(settings, message):
    with pytest.raises((StepOperatorConfigError, ValidationError, ValueError), match=message):
        declare("azureml", settings={"step_operator.azureml": settings})


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"resources": {"gpu_type": "L4"}, "settings": {"step_operator.azureml": {}}}, r"L4 is not offered"),
    ({"resources": {"cpu_count": 16}, "settings": {"step_operator.azureml": {"instance_type": "Standard_D4s_v3"}}},
     r"Standard_D4s_v3 \(4 vCPU, 16 GiB, ~\$0.19/h\) does not have the resources"),
    ({"settings": {"step_operator.azureml": {"instance_type": "Standard_D5s_v3"}}}, r"unknown Azure ML VM size"),
])
def test_resources_are_checked_at_parse_time(kwargs, message):
    with pytest.raises((StepOperatorConfigError, ValidationError, ValueError), match=message):
        declare("azureml", **kwargs)


def test_settings_normalize_and_merge():
    settings = AzureMLStepOperatorSettings(job_tier="spot", shm_size="16GB", environment={"A": "1", "B": "1"},
                                           environment_variables={"B": "2"})
    assert settings.job_tier == "Spot" and settings.spot and settings.shm_size == "16g"
    assert settings.variables == {"A": "1", "B": "2"}
    assert settings.vm_for(ResourceSettings()).name == "Standard_D4s_v3"
    assert settings.vm_for(ResourceSettings(), "Standard_E8s_v3").name == "Standard_E8s_v3"  # operator default
    assert settings.vm_for(ResourceSettings(gpu_count=1), "Standard_E8s_v3").name == "Standard_NC4as_T4_v3"
    declare("azureml", settings={"step_operator.azureml": AzureMLStepOperatorSettings(
        instance_type="Standard_NC6s_v3", job_tier="Spot", max_runtime_in_seconds=3600)},
        resources=ResourceSettings(gpu_type="V100"))


@pytest.mark.parametrize(("extra", "message"), [
    ({}, r"subscription_id\n.*Field required"),
    ({**WORKSPACE, "subscription_id": "abc"}, r"is not an Azure subscription id"),
    ({**WORKSPACE, "workspace_name": "w"}, r"is not an Azure ML workspace name"),
    ({**WORKSPACE, "artifact_store": "s3://bucket/x"}, r"expected azureml://datastores/<datastore>/paths/<prefix>"),
    ({**WORKSPACE, "artifact_store": "abfs://conn@Bad_Container/x"}, r"artifact_store"),
    ({**WORKSPACE, "image": "python:3.11", "azureml_environment": "azureml:env:1"}, r"set one of the two"),
    ({**WORKSPACE, "azureml_environment": "env:1"}, r"expected azureml:<name>:<version>"),
    ({**WORKSPACE, "instance_type": "Standard-D4"}, r"is not an Azure VM size"),
    ({**WORKSPACE, "unknown": 1}, r"unknown\s+unknown field; allowed: .*azure_conn_id, "),
])
def test_config_errors(extra, message):
    with pytest.raises(ValidationError, match=message):
        AzureMLStepOperatorConfig.model_validate(extra)


def test_config_forms():
    cfg = AzureMLStepOperatorConfig.model_validate({**WORKSPACE, "compute_target_name": "",
                                                    "artifact_store": "az://data/steps"})
    assert cfg.compute_target_name is None and cfg.azure_conn_id == "azure_default"
    assert cfg.datastore == "workspaceblobstore"
    AzureMLStepOperatorConfig.model_validate({**WORKSPACE, "artifact_store": "abfs://wasb_default@data/x",
                                              "azureml_environment": "azureml:stepops-py311:3"})


def test_missing_workspace_field_names_it_when_the_hook_reads_the_connection(monkeypatch):
    import json

    from airflow_stepops.hooks.azureml import AzureMLStepOperatorHook

    monkeypatch.setenv("AIRFLOW_CONN_AZ_NO_WS", json.dumps({"conn_type": "stepops_azureml", "extra": {
        "subscription_id": WORKSPACE["subscription_id"], "resource_group": "rg"}}))
    with pytest.raises(StepOperatorConfigError, match=r"connection 'az_no_ws' \(stepops_azureml\) "
                                                      r"extra.workspace_name: Field required"):
        _ = AzureMLStepOperatorHook(step_operator_conn_id="az_no_ws").config
