"""Trigger of the ``local`` flavor."""

from __future__ import annotations

from airflow_stepops.triggers.base import StepOperatorTrigger


class LocalStepOperatorTrigger(StepOperatorTrigger):
    flavor = "local"
