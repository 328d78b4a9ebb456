"""Operator of the ``vertex`` flavor."""

from __future__ import annotations

from typing import ClassVar

from airflow_stepops.operators.base import StepOperator


class VertexStepOperator(StepOperator):
    """Run a Python callable as a Vertex AI CustomJob (one job per try, found again by its labels).

    ``step_operator`` defaults to ``stepops_vertex_default``; machine type, accelerators and Spot go in
    ``settings={"step_operator.vertex": VertexStepOperatorSettings(...)}`` or come from ResourceSettings.
    """

    flavor: ClassVar[str | None] = "vertex"
