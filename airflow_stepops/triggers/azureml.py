"""Trigger of the ``azureml`` flavor: waits as long as the job's limits.timeout allows (no hidden cap)."""

from __future__ import annotations

from airflow_stepops.triggers.base import StepOperatorTrigger


class AzureMLStepOperatorTrigger(StepOperatorTrigger):
    flavor = "azureml"
