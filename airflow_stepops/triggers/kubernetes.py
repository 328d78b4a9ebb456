"""Trigger of the ``kubernetes`` flavor."""

from __future__ import annotations

from airflow_stepops.triggers.base import StepOperatorTrigger


class KubernetesStepOperatorTrigger(StepOperatorTrigger):
    flavor = "kubernetes"
