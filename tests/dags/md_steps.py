"""DAGs of tests/modal/test_dags.py: steps as Modal function calls on the emulator (``md_emulator``)."""

from __future__ import annotations

from airflow.sdk import DAG, task

from airflow_stepops import ResourceSettings
from airflow_stepops.operators.modal import ModalStepOperator
from airflow_stepops.settings import ModalStepOperatorSettings


def _double(x: int) -> int:
    return 2 * x


with DAG("md_pipeline", schedule=None, params={"scale": 3}) as md_pipeline:
    @task
    def numbers() -> list[int]:
        return [1, 2, 3]

    @task.step_operator(step_operator="modal_step_operator", multiple_outputs=True,
                        resources=ResourceSettings(cpu_count=2, memory="4GiB"))
    def train(values: list[int], params=None) -> dict:
        print(f"training on {len(values)} values", flush=True)
        return {"total": sum(values) * params["scale"], "model": frozenset(values)}  # frozenset: an ArtifactRef

    @task.step_operator(step_operator="modal_step_operator", deferrable=False,
                        settings={"step_operator.modal": ModalStepOperatorSettings(gpu="A100-80GB:2", timeout=900)})
    def evaluate(model: frozenset) -> list:
        return sorted(model)

    @task
    def report(total: int, model_items: list, doubled: list[int]) -> dict:
        return {"total": total, "model": model_items, "doubled": sorted(doubled)}

    trained = train(numbers())
    doubled = ModalStepOperator.partial(task_id="double", python_callable=_double,
                                        step_operator="modal_step_operator").expand(op_args=[[1], [5]])
    report(trained["total"], evaluate(trained["model"]), doubled.output)
