"""Extra links from a step task to its job in the backend's console, and to the billing console its cost shows in."""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow.sdk import BaseOperatorLink

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey


class StepJobLink(BaseOperatorLink):
    """Opens the remote job (SageMaker, Vertex, Azure ML, Kubernetes dashboard, Modal...)."""

    name = "Step job"
    key = "console_url"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        if getattr(operator, "_handle", None) is None:
            # the task failed before submitting (Airflow asks for links at the end of every try, on the
            # worker, with the operator that ran): no XCom to read, so no "XCom not found" error line
            return ""
        from airflow.sdk.execution_time.xcom import XCom

        info = XCom.get_value(ti_key=ti_key, key="stepops_job")
        if isinstance(info, dict):
            return info.get(self.key) or ""
        return ""


class StepCostLink(StepJobLink):
    """Opens the service's billing console where the step's charges show (the job summary has its cost)."""

    name = "Step cost"
    key = "cost_url"
