"""Operator of the ``kubernetes`` flavor."""

from __future__ import annotations

from typing import ClassVar

from airflow_stepops.operators.base import StepOperator


class KubernetesStepOperator(StepOperator):
    """Run a Python callable as a Kubernetes Job (one Job per try, deterministic name).

    ``step_operator`` defaults to ``stepops_kubernetes_default``; per-step pod options, GPUs and spot
    go in ``settings={"step_operator.kubernetes": KubernetesStepOperatorSettings(...)}``.
    """

    flavor: ClassVar[str | None] = "kubernetes"
