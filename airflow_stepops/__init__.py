"""airflow-stepops: hand chosen Python tasks to other infrastructure (GPUs, clusters, serverless).

Public names load lazily: DAG files import this package on every parse.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow_stepops.get_provider_info import get_provider_info

if TYPE_CHECKING:
    from airflow_stepops.artifacts import ArtifactRef
    from airflow_stepops.exceptions import (
        RemoteStepError,
        StepCapacityError,
        StepCostLimitError,
        StepFailedError,
        StepOperatorConfigError,
        StepPreemptedError,
        StepTimeoutError,
    )
    from airflow_stepops.resources import ResourceSettings

__version__ = "0.1.0"

_EXPORTS = {
    "ResourceSettings": "airflow_stepops.resources",
    "ArtifactRef": "airflow_stepops.artifacts",
    "RemoteStepError": "airflow_stepops.exceptions",
    "StepCapacityError": "airflow_stepops.exceptions",
    "StepCostLimitError": "airflow_stepops.exceptions",
    "StepFailedError": "airflow_stepops.exceptions",
    "StepOperatorConfigError": "airflow_stepops.exceptions",
    "StepPreemptedError": "airflow_stepops.exceptions",
    "StepTimeoutError": "airflow_stepops.exceptions",
}

__all__ = ["get_provider_info", "__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
