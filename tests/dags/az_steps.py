"""DAGs of tests/azureml/test_dags.py: steps as Azure ML command jobs on the emulator (``az_emulator``)."""

from __future__ import annotations

from airflow.sdk import DAG, task

from airflow_stepops import ResourceSettings
from airflow_stepops.operators.azureml import AzureMLStepOperator
from airflow_stepops.settings import AzureMLStepOperatorSettings


def _double(x: int) -> int:
    return 2 * x


with DAG("az_pipeline", schedule=None, params={"scale": 3}) as az_pipeline:
    @task
    def numbers() -> list[int]:
        return [1, 2, 3]

    @task.step_operator(step_operator="azureml_step_operator", multiple_outputs=True,
                        resources=ResourceSettings(cpu_count=8, memory="32GB"))
    def train(values: list[int], params=None) -> dict:
        print(f"training on {len(values)} values", flush=True)
        return {"total": sum(values) * params["scale"], "model": frozenset(values)}  # frozenset: an ArtifactRef

    @task.step_operator(step_operator="azureml_step_operator", deferrable=False,
                        settings={"step_operator.azureml": AzureMLStepOperatorSettings(
                            instance_type="Standard_NC24ads_A100_v4", job_tier="Spot", tags={"stage": "eval"})})
    def evaluate(model: frozenset) -> list:
        return sorted(model)

    @task
    def report(total: int, model_items: list, doubled: list[int]) -> dict:
        return {"total": total, "model": model_items, "doubled": sorted(doubled)}

    trained = train(numbers())
    doubled = AzureMLStepOperator.partial(task_id="double", python_callable=_double,
                                          step_operator="azureml_cluster_step_operator").expand(op_args=[[1], [5]])
    report(trained["total"], evaluate(trained["model"]), doubled.output)
