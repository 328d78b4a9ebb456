"""Operator of the ``local`` flavor."""

from __future__ import annotations

from typing import ClassVar

from airflow_stepops.operators.base import StepOperator


class LocalStepOperator(StepOperator):
    """Run a Python callable as a detached process on the worker host, with resource limits.

    ``step_operator`` defaults to ``stepops_local_default``; without such a connection the built-in
    defaults apply (worker's Python, artifacts under ``$AIRFLOW_HOME/stepops``).
    """

    flavor: ClassVar[str | None] = "local"
