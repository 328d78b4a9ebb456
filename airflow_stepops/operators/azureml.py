"""Operator of the ``azureml`` flavor."""

from __future__ import annotations

from typing import ClassVar

from airflow_stepops.operators.base import StepOperator


class AzureMLStepOperator(StepOperator):
    """Run a Python callable as an Azure ML command job (one job per try, named after the try).

    ``step_operator`` defaults to ``stepops_azureml_default``; VM size, job tier and compute target go in
    ``settings={"step_operator.azureml": AzureMLStepOperatorSettings(...)}`` or come from ResourceSettings.
    """

    flavor: ClassVar[str | None] = "azureml"
