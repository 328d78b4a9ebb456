"""Trigger of the ``sagemaker`` flavor: waits as long as the job's own limits allow (no hidden cap)."""

from __future__ import annotations

from airflow_stepops.triggers.base import StepOperatorTrigger


class SageMakerStepOperatorTrigger(StepOperatorTrigger):
    flavor = "sagemaker"
