"""DAGs of tests/<flavor>/test_dags.py: the same pipeline on the sagemaker, vertex, azureml and modal emulators
(tests/conftest.py): multiple_outputs, an ArtifactRef passed on as the value, a step waiting on the worker with
the flavor's own settings, mapping, params."""

from __future__ import annotations

from importlib import import_module

from airflow.sdk import DAG, task

from airflow_stepops import ResourceSettings
from airflow_stepops.flavors import get_flavor
from airflow_stepops.settings import (
    AzureMLStepOperatorSettings,
    ModalStepOperatorSettings,
    SageMakerStepOperatorSettings,
    VertexStepOperatorSettings,
)
from airflow_stepops.settings.base import BaseStepOperatorSettings


def _double(x: int) -> int:
    return 2 * x


def pipeline(prefix: str, flavor: str, resources: ResourceSettings, evaluate_settings: BaseStepOperatorSettings,
             double_on: str = "") -> DAG:
    """``<prefix>_pipeline`` on ``<flavor>_step_operator``; the mapped ``double`` on ``double_on`` if given."""
    conn = f"{flavor}_step_operator"
    with DAG(f"{prefix}_pipeline", schedule=None, params={"scale": 3}) as dag:
        @task
        def numbers() -> list[int]:
            return [1, 2, 3]

        @task.step_operator(step_operator=conn, multiple_outputs=True, resources=resources)
        def train(values: list[int], params=None) -> dict:
            print(f"training on {len(values)} values", flush=True)
            return {"total": sum(values) * params["scale"], "model": frozenset(values)}  # frozenset: an ArtifactRef

        @task.step_operator(step_operator=conn, deferrable=False,
                            settings={f"step_operator.{flavor}": evaluate_settings})
        def evaluate(model: frozenset) -> list:
            return sorted(model)

        @task
        def report(total: int, model_items: list, doubled: list[int]) -> dict:
            return {"total": total, "model": model_items, "doubled": sorted(doubled)}

        trained = train(numbers())
        module, _, name = get_flavor(flavor).operator_class.rpartition(".")
        doubled = getattr(import_module(module), name).partial(task_id="double", python_callable=_double,
                                   step_operator=double_on or conn).expand(op_args=[[1], [5]])
        report(trained["total"], evaluate(trained["model"]), doubled.output)
    return dag


sm_pipeline = pipeline("sm", "sagemaker", ResourceSettings(cpu_count=8, memory="32GB"),
                       SageMakerStepOperatorSettings(instance_type="ml.g5.xlarge", tags={"stage": "eval"}))
vx_pipeline = pipeline("vx", "vertex", ResourceSettings(cpu_count=8, memory="32GB"),
                       VertexStepOperatorSettings(machine_type="a2-highgpu-1g", labels={"stage": "eval"}))
az_pipeline = pipeline("az", "azureml", ResourceSettings(cpu_count=8, memory="32GB"),
                       AzureMLStepOperatorSettings(instance_type="Standard_NC24ads_A100_v4", job_tier="Spot",
                                                   tags={"stage": "eval"}), double_on="azureml_cluster_step_operator")
md_pipeline = pipeline("md", "modal", ResourceSettings(cpu_count=2, memory="4GiB"),
                       ModalStepOperatorSettings(gpu="A100-80GB:2", timeout=900))
