"""Trigger of the ``vertex`` flavor: waits as long as the job's scheduling.timeout allows (no hidden cap)."""

from __future__ import annotations

from airflow_stepops.triggers.base import StepOperatorTrigger


class VertexStepOperatorTrigger(StepOperatorTrigger):
    flavor = "vertex"
