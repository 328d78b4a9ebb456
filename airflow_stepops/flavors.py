"""The registry of flavors: names to dotted paths, so nothing heavy is imported to look one up."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow_stepops.settings.base import BaseStepOperatorConfig, BaseStepOperatorSettings


@dataclass(frozen=True)
class Flavor:
    name: str
    display_name: str
    settings_class: str
    config_class: str
    hook_class: str
    operator_class: str
    trigger_class: str
    default_conn_id: str

    @property
    def conn_type(self) -> str:
        return f"stepops_{self.name}"

    def settings_model(self) -> type[BaseStepOperatorSettings]:
        return _import(self.settings_class)

    def config_model(self) -> type[BaseStepOperatorConfig]:
        return _import(self.config_class)

    def hook(self) -> Any:
        return _import(self.hook_class)

    def trigger(self) -> Any:
        return _import(self.trigger_class)


FLAVORS: dict[str, Flavor] = {
    "local": Flavor(
        name="local",
        display_name="Local subprocess",
        settings_class="airflow_stepops.settings.local.LocalStepOperatorSettings",
        config_class="airflow_stepops.settings.local.LocalStepOperatorConfig",
        hook_class="airflow_stepops.hooks.local.LocalStepOperatorHook",
        operator_class="airflow_stepops.operators.local.LocalStepOperator",
        trigger_class="airflow_stepops.triggers.local.LocalStepOperatorTrigger",
        default_conn_id="stepops_local_default",
    ),
    "kubernetes": Flavor(
        name="kubernetes",
        display_name="Kubernetes Job",
        settings_class="airflow_stepops.settings.kubernetes.KubernetesStepOperatorSettings",
        config_class="airflow_stepops.settings.kubernetes.KubernetesStepOperatorConfig",
        hook_class="airflow_stepops.hooks.kubernetes.KubernetesStepOperatorHook",
        operator_class="airflow_stepops.operators.kubernetes.KubernetesStepOperator",
        trigger_class="airflow_stepops.triggers.kubernetes.KubernetesStepOperatorTrigger",
        default_conn_id="stepops_kubernetes_default",
    ),
    "sagemaker": Flavor(
        name="sagemaker",
        display_name="SageMaker Training Job",
        settings_class="airflow_stepops.settings.sagemaker.SageMakerStepOperatorSettings",
        config_class="airflow_stepops.settings.sagemaker.SageMakerStepOperatorConfig",
        hook_class="airflow_stepops.hooks.sagemaker.SageMakerStepOperatorHook",
        operator_class="airflow_stepops.operators.sagemaker.SageMakerStepOperator",
        trigger_class="airflow_stepops.triggers.sagemaker.SageMakerStepOperatorTrigger",
        default_conn_id="stepops_sagemaker_default",
    ),
    "vertex": Flavor(
        name="vertex",
        display_name="Vertex AI CustomJob",
        settings_class="airflow_stepops.settings.vertex.VertexStepOperatorSettings",
        config_class="airflow_stepops.settings.vertex.VertexStepOperatorConfig",
        hook_class="airflow_stepops.hooks.vertex.VertexStepOperatorHook",
        operator_class="airflow_stepops.operators.vertex.VertexStepOperator",
        trigger_class="airflow_stepops.triggers.vertex.VertexStepOperatorTrigger",
        default_conn_id="stepops_vertex_default",
    ),
    "azureml": Flavor(
        name="azureml",
        display_name="Azure ML command job",
        settings_class="airflow_stepops.settings.azureml.AzureMLStepOperatorSettings",
        config_class="airflow_stepops.settings.azureml.AzureMLStepOperatorConfig",
        hook_class="airflow_stepops.hooks.azureml.AzureMLStepOperatorHook",
        operator_class="airflow_stepops.operators.azureml.AzureMLStepOperator",
        trigger_class="airflow_stepops.triggers.azureml.AzureMLStepOperatorTrigger",
        default_conn_id="stepops_azureml_default",
    ),
    "modal": Flavor(
        name="modal",
        display_name="Modal function call",
        settings_class="airflow_stepops.settings.modal.ModalStepOperatorSettings",
        config_class="airflow_stepops.settings.modal.ModalStepOperatorConfig",
        hook_class="airflow_stepops.hooks.modal.ModalStepOperatorHook",
        operator_class="airflow_stepops.operators.modal.ModalStepOperator",
        trigger_class="airflow_stepops.triggers.modal.ModalStepOperatorTrigger",
        default_conn_id="stepops_modal_default",
    ),
}


def get_flavor(name: str) -> Flavor:
    try:
        return FLAVORS[name]
    except KeyError:
        from airflow_stepops.exceptions import StepOperatorConfigError  # imports Airflow: only when needed

        raise StepOperatorConfigError(
            f"unknown step operator flavor {name!r}; available flavors: {', '.join(sorted(FLAVORS))}"
        ) from None


def flavor_for_conn_type(conn_type: str | None) -> Flavor | None:
    for flavor in FLAVORS.values():
        if flavor.conn_type == conn_type:
            return flavor
    return None


@cache
def _import(path: str) -> Any:
    from importlib import import_module

    module, _, attr = path.rpartition(".")
    return getattr(import_module(module), attr)
