"""Trigger of the ``modal`` flavor: waits as long as the call's timeout allows (Modal stops it then)."""

from __future__ import annotations

from airflow_stepops.triggers.base import StepOperatorTrigger


class ModalStepOperatorTrigger(StepOperatorTrigger):
    flavor = "modal"
