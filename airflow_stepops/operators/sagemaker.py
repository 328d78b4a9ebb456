"""Operator of the ``sagemaker`` flavor."""

from __future__ import annotations

from typing import ClassVar

from airflow_stepops.operators.base import StepOperator


class SageMakerStepOperator(StepOperator):
    """Run a Python callable as a SageMaker Training Job (one job per try, deterministic name).

    ``step_operator`` defaults to ``stepops_sagemaker_default``; instance type, spot and warm pools go
    in ``settings={"step_operator.sagemaker": SageMakerStepOperatorSettings(...)}``.
    """

    flavor: ClassVar[str | None] = "sagemaker"
