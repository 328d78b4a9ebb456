"""A step tried on SageMaker, then Vertex AI, on spot capacity: what ``stepops render`` shows of its step
operators, and what is refused before anything is submitted."""

from __future__ import annotations

from airflow.sdk import DAG, task

with DAG("failover_steps", schedule=None):
    @task.step_operator(step_operator=["sagemaker_step_operator", "vertex_step_operator"], preemption_retries=2,
                        resources={"cpu_count": 4, "memory": "16GB"},
                        settings={"step_operator.sagemaker": {"use_spot_instances": True},
                                  "step_operator.vertex": {"use_spot": True}})
    def fit() -> int:
        return 1

    fit()
