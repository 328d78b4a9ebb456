"""Settings models, imported lazily so a DAG file pays only for the flavors it uses."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow_stepops.flavors import FLAVORS

if TYPE_CHECKING:
    from airflow_stepops.resources import ResourceSettings
    from airflow_stepops.settings.azureml import AzureMLStepOperatorConfig, AzureMLStepOperatorSettings
    from airflow_stepops.settings.base import BaseStepOperatorConfig, BaseStepOperatorSettings
    from airflow_stepops.settings.kubernetes import KubernetesStepOperatorConfig, KubernetesStepOperatorSettings
    from airflow_stepops.settings.local import LocalStepOperatorConfig, LocalStepOperatorSettings
    from airflow_stepops.settings.modal import ModalStepOperatorConfig, ModalStepOperatorSettings
    from airflow_stepops.settings.sagemaker import SageMakerStepOperatorConfig, SageMakerStepOperatorSettings
    from airflow_stepops.settings.vertex import VertexStepOperatorConfig, VertexStepOperatorSettings

_EXPORTS = {
    "ResourceSettings": "airflow_stepops.resources",
    "BaseStepOperatorSettings": "airflow_stepops.settings.base",
    "BaseStepOperatorConfig": "airflow_stepops.settings.base",
    **{path.rpartition(".")[2]: path.rpartition(".")[0] for flavor in FLAVORS.values()
       for path in (flavor.settings_class, flavor.config_class)},
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
