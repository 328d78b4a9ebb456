"""Operator of the ``modal`` flavor."""

from __future__ import annotations

from typing import ClassVar

from airflow_stepops.operators.base import StepOperator


class ModalStepOperator(StepOperator):
    """Run a Python callable as a call of a deployed Modal function (spawned once per try; the call id
    is stored at once, so a retry re-attaches to it).

    ``step_operator`` defaults to ``stepops_modal_default``; GPU, CPU, memory and timeout go in
    ``settings={"step_operator.modal": ModalStepOperatorSettings(...)}`` or come from ResourceSettings.
    """

    flavor: ClassVar[str | None] = "modal"
