"""Settings and configuration of the ``azureml`` flavor (steps as Azure Machine Learning command jobs).

Field names follow ZenML's Azure ML step operator (``subscription_id``, ``resource_group``,
``workspace_name``, ``compute_target_name``, ``instance_type``, ``environment_variables``) and the
command job's own options beyond (``job_tier``, ``shm_size``, ``experiment_name``, ``tags``).
VM sizes are checked here, at parse time, for their shape, and against ``azureml_vms``' table before
anything is submitted.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pydantic import BaseModel, Field, field_validator, model_validator

from airflow_stepops.settings.base import BaseStepOperatorConfig, ContainerStepSettings, EnvVars, checked_by, matches

#: tag keys the flavor sets itself (the step's identity, for exactly-once look-ups)
TAG_PREFIX = "stepops-"
#: run limits of https://learn.microsoft.com/en-us/azure/machine-learning/resource-limits-capacity#runs: 50 tags,
#: keys of 100 characters, values of 1,000; display names of 256
MAX_TAGS, MAX_TAG_KEY, MAX_TAG_VALUE, MAX_DISPLAY_NAME = 50, 100, 1000, 256
JOB_TIERS = ("Spot", "Basic", "Standard", "Premium")
#: ``resources.shmSize``: a number with an optional unit b, k, m or g (docker's --shm-size)
SHM_SIZE = re.compile(r"^\d+[bkmg]?$")
#: run history's rule for experiment names, as azureml-core states it (``_base_sdk_common.common``: 1-255
#: characters, alphanumeric first, then also '-' and '_', no whitespace)
EXPERIMENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,254}$")
COMPUTE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]{1,31}$")
WORKSPACE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{2,32}$")
RESOURCE_GROUP = re.compile(r"^[-\w._()]{1,90}$")
SUBSCRIPTION_ID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
AZUREML_ENVIRONMENT = re.compile(r"^azureml:(?P<name>[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}):(?P<version>[A-Za-z0-9_.-]+)$")
#: ``azureml://datastores/<datastore>/paths/<prefix>``
DATASTORE_URI = re.compile(r"^azureml://datastores/(?P<datastore>[A-Za-z0-9_]+)/paths/(?P<path>.*)$")
#: ``abfs://[<storage conn id>@]<container>/<prefix>`` (also abfss:// and az://): Airflow's object storage form
BLOB_URI = re.compile(r"^(?P<scheme>abfss?|az)://((?P<conn>[A-Za-z0-9_.-]+)@)?(?P<container>[a-z0-9](?!.*--)"
                      r"[a-z0-9-]{1,61}[a-z0-9])(/(?P<path>.*))?$")


def check_tags(tags: dict[str, str], field: str, *, reserved: bool = True) -> dict[str, str]:
    if len(tags) > MAX_TAGS:
        raise ValueError(f"{field}: {len(tags)} tags; an Azure ML job takes at most {MAX_TAGS}")
    for key, value in tags.items():
        if not key or len(key) > MAX_TAG_KEY or len(value) > MAX_TAG_VALUE:
            raise ValueError(f"{field}[{key[:40]!r}]: Azure ML tag keys are 1-{MAX_TAG_KEY} characters, values at "
                             f"most {MAX_TAG_VALUE}")
        if reserved and key.startswith(TAG_PREFIX):
            raise ValueError(f"{field}: {key!r}: keys starting with {TAG_PREFIX!r} are the step operator's own")
    return tags


def normalize_shm_size(value: str | None) -> str | None:
    """``16g``, ``512m``; also ``16GB``/``16GiB`` spelled the way ResourceSettings accepts them."""
    if value is None:
        return None
    text = value.strip().lower().replace(" ", "")
    text = re.sub(r"^(\d+)([kmg])(i?b)$", r"\1\2", text)
    if not SHM_SIZE.match(text) or int(re.sub(r"\D", "", text)) == 0:
        raise ValueError(f"shm_size: {value!r} is not a shared memory size: a positive number with an optional "
                         "unit b, k, m or g, e.g. \"16g\" or \"512m\"")
    return text


class _AzureMLChecks(BaseModel):
    """Checks shared by the step settings and the step operator's defaults (same field names)."""

    @field_validator("instance_type", check_fields=False)
    @classmethod
    def _vm(cls, value: str | None) -> str | None:
        from airflow_stepops.settings.azureml_vms import check_vm_name

        return None if value is None else check_vm_name(value)

    _tags = checked_by(check_tags, "tags")

    @field_validator("compute_target_name", check_fields=False)
    @classmethod
    def _compute(cls, value: str | None) -> str | None:
        if value and not COMPUTE_NAME.match(value):
            raise ValueError(f"compute_target_name: {value!r} is not an Azure ML compute name (2-32 letters, digits "
                             "and '-', starting with a letter); leave it empty for serverless compute")
        return value

    _experiment = matches(
        "experiment_name", EXPERIMENT_NAME, "a valid experiment name (letters, digits, '_' and '-', starting with a "
        "letter or digit, at most 255 characters)")


class AzureMLStepOperatorSettings(ContainerStepSettings, _AzureMLChecks):
    """Per-step options of the azureml flavor."""

    flavor: ClassVar[str] = "azureml"

    instance_type: str | None = Field(
        default=None, description="Serverless VM size, e.g. Standard_NC6s_v3; default: the cheapest size that fits "
        "ResourceSettings.")
    instance_count: int = Field(default=1, ge=1, le=1, description="Nodes of the job; 1 (the step runs once: "
                                "distributed training is not a step operator's job).")
    compute_target_name: str | None = Field(
        default=None, description="Cluster or compute instance of this step; \"\" runs it on serverless compute "
        "(default: the step operator's).")
    job_tier: str | None = Field(
        default=None, description="Serverless job tier: Spot (cheaper, can be preempted), Basic, Standard or "
        "Premium.")
    shm_size: str | None = Field(default=None, description="Shared memory of the container, e.g. \"16g\" "
                                 "(Azure ML's default: 2g).")
    environment_variables: EnvVars = Field(default_factory=dict, description="Environment variables of the step "
                                           "(merged over the step operator's environment; no secrets).")
    experiment_name: str | None = Field(default=None, description="Experiment of the job (default: the DAG id).")
    tags: dict[str, str] = Field(default_factory=dict, description="Tags of the job.")
    max_runtime_in_seconds: int | None = Field(
        default=None, gt=0, description="limits.timeout: Azure ML stops the job after this long.")

    @field_validator("job_tier")
    @classmethod
    def _tier(cls, value: str | None) -> str | None:
        if value is None:
            return None
        for tier in JOB_TIERS:
            if value.strip().lower() == tier.lower():
                return tier
        raise ValueError(f"job_tier: {value!r} is not an Azure ML job tier; allowed: {', '.join(JOB_TIERS)}")

    @field_validator("shm_size")
    @classmethod
    def _shm(cls, value: str | None) -> str | None:
        return normalize_shm_size(value)

    @model_validator(mode="after")
    def _tier_needs_serverless(self) -> AzureMLStepOperatorSettings:
        if self.job_tier and self.compute_target_name:
            raise ValueError(tier_with_cluster(self.job_tier, self.compute_target_name))
        if self.instance_type and self.compute_target_name:
            raise ValueError(f"instance_type={self.instance_type} with compute_target_name="
                             f"{self.compute_target_name!r}: a cluster has its own VM size; set one of the two")
        return self

    @property
    def spot(self) -> bool:
        return self.job_tier == "Spot"

    @property
    def variables(self) -> dict[str, str]:
        """``environment`` (every flavor's name) and ``environment_variables`` (ZenML's), the latter winning."""
        return {**self.environment, **self.environment_variables}

    def vm_for(self, resources: Any, default: str | None = None) -> Any:
        """The VM size of a serverless step: ``instance_type`` if set (it must have what ResourceSettings ask
        for); else the step operator's default when it fits; else the cheapest size that fits."""
        from airflow_stepops.settings.azureml_vms import choose_vm_size, fits, lookup

        if self.instance_type is not None:
            vm = lookup(self.instance_type)
            if not fits(vm, resources):
                raise ValueError(f"instance_type: {vm.describe()} does not have the resources the step asks for "
                                 f"({resources.model_dump(exclude_none=True)})")
            return vm
        if default is not None:
            vm = lookup(default)
            if fits(vm, resources):
                return vm
        if resources.empty:
            return lookup(DEFAULT_INSTANCE_TYPE)
        return choose_vm_size(resources)

    def check_resources(self, resources: Any) -> None:
        if self.compute_target_name:
            return  # the cluster's size is checked before submitting (it is looked up then)
        if self.instance_type is not None:
            self.vm_for(resources)
        elif not resources.empty:
            from airflow_stepops.settings.azureml_vms import choose_vm_size

            choose_vm_size(resources)


#: what a serverless step with no ResourceSettings and no instance_type gets (4 vCPU, 16 GiB)
DEFAULT_INSTANCE_TYPE = "Standard_D4s_v3"


def tier_with_cluster(tier: str, compute: str) -> str:
    return (f"job_tier={tier}: job tiers are for serverless compute, but the step runs on the compute target "
            f"{compute!r}; use a low-priority cluster for Spot capacity there, or set compute_target_name=\"\" to "
            "run the step on serverless compute")


class AzureMLStepOperatorConfig(BaseStepOperatorConfig, _AzureMLChecks):
    """Connection extras of a ``stepops_azureml`` step operator."""

    flavor: ClassVar[str] = "azureml"

    azure_conn_id: str = Field(title="Azure connection id",
                               default="azure_default", description="microsoft-azure provider connection (type "
                               "azure) with the credentials; DefaultAzureCredential when it has none.")
    subscription_id: str = Field(title="Subscription id", description="Azure subscription of the workspace.")
    resource_group: str = Field(title="Resource group", description="Resource group of the workspace.")
    workspace_name: str = Field(title="Workspace name", description="Azure ML workspace.")
    compute_target_name: str | None = Field(
        title="Compute target",
        default=None, description="Cluster or compute instance the steps run on; empty: serverless compute.")
    on_demand_compute_target_name: str | None = Field(
        title="On-demand compute target",
        default=None, description="Dedicated (not low-priority) cluster that attempts escalated to on-demand "
        "capacity run on, when the steps run on a compute target; empty: the same compute target (serverless steps "
        "move from the Spot to the Standard job tier instead).")
    image: str | None = Field(default=None, description="Container image of the steps, with the workers' "
                              "Python (default: python:<major.minor>-slim; cloudpickle is installed when missing).")
    azureml_environment: str | None = Field(
        title="Registered environment",
        default=None, description="Registered environment instead of an image: azureml:<name>:<version>.")
    storage_conn_id: str | None = Field(
        title="Storage connection id", default=None, description="Airflow connection (wasb / adls) workers read and "
        "write the artifact store with, when the artifact_store URI names none.")
    datastore: str = Field(default="workspaceblobstore", description="Datastore the jobs reach an abfs:// "
                           "artifact store through (it must point at the store's container).")
    instance_type: str | None = Field(
        title="Default VM size", default=None, description="Default serverless VM size of this step operator.")
    experiment_name: str | None = Field(
        title="Experiment name", default=None, description="Experiment of every job (default: the DAG id).")
    tags: dict[str, str] = Field(default_factory=dict, description="Tags of every job.")
    environment: EnvVars = Field(
        title="Environment variables", default_factory=dict, description="Environment of every step (no secrets).")
    api_timeout_seconds: float = Field(
        title="API call timeout (s)", default=60.0, gt=0, le=600, description="Seconds one call to Azure ML or the "
        "log blob may wait for an answer before it is retried.")
    api_max_attempts: int = Field(title="API call attempts",
                                  default=4, ge=1, le=11, description="Attempts of a call that fails on the way, the "
                                  "first included (timeouts, dropped connections, 429 and 5xx answers).")
    console_url_template: str | None = Field(
        title="Console URL template", default=None, description="Link template ({job_name}, {subscription_id}, "
        "{resource_group}, {workspace_name}); default: the job's Azure ML studio URL.")

    _subscription = matches("subscription_id", SUBSCRIPTION_ID, "an Azure subscription id (a GUID)")

    @field_validator("resource_group")
    @classmethod
    def _group(cls, value: str) -> str:
        if not RESOURCE_GROUP.match(value) or value.endswith("."):
            raise ValueError(f"resource_group: {value!r} is not a resource group name (1-90 letters, digits, "
                             "'_', '-', '.', '(' and ')')")
        return value

    _workspace = matches(
        "workspace_name", WORKSPACE_NAME, "an Azure ML workspace name (3-33 letters, digits, '_' and '-', starting "
        "with a letter or digit)")

    @field_validator("compute_target_name", "on_demand_compute_target_name", mode="before")
    @classmethod
    def _empty_is_serverless(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("on_demand_compute_target_name")
    @classmethod
    def _on_demand_compute(cls, value: str | None) -> str | None:
        if value and not COMPUTE_NAME.match(value):
            raise ValueError(f"on_demand_compute_target_name: {value!r} is not an Azure ML compute name (2-32 "
                             "letters, digits and '-', starting with a letter)")
        return value

    _environment_ref = matches(
        "azureml_environment", AZUREML_ENVIRONMENT, "a registered environment reference; expected "
        "azureml:<name>:<version>")

    @field_validator("artifact_store")
    @classmethod
    def _blob_store(cls, value: str | None) -> str | None:
        if value is not None and not (DATASTORE_URI.match(value) or BLOB_URI.match(value)):
            raise ValueError(f"artifact_store: Azure ML jobs read and write blob storage through a datastore; "
                             "expected azureml://datastores/<datastore>/paths/<prefix> or abfs://[<storage conn "
                             f"id>@]<container>/<prefix> (also abfss://, az://), got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_environment(self) -> AzureMLStepOperatorConfig:
        if self.image and self.azureml_environment:
            raise ValueError("image and azureml_environment: set one of the two (the job runs in either an image "
                             "or a registered environment)")
        return self

    def credentials_source(self) -> str:
        return (f"azure connection {self.azure_conn_id!r}, workspace {self.subscription_id}/{self.resource_group}/"
                f"{self.workspace_name}")
