"""Every example DAG parses, and uses step operators the way the README describes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "dags_examples"


def dag_files() -> set[Path]:
    """Example files declaring a ``@dag`` function: each must load a DAG below (docs include only these)."""
    def declares(path: Path) -> bool:
        decorators = [getattr(d, "func", d) for node in ast.walk(ast.parse(path.read_text()))
                      if isinstance(node, ast.FunctionDef) for d in node.decorator_list]
        return any(isinstance(d, ast.Name) and d.id == "dag" for d in decorators)

    return {p for p in EXAMPLES.glob("*.py") if declares(p)}


@pytest.mark.usefixtures("airflow_db")
def test_example_dags_parse_without_errors():
    from airflow_stepops._compat import dagbag_class

    bag = dagbag_class()(dag_folder=str(EXAMPLES))
    assert bag.import_errors == {}
    assert {Path(d.fileloc) for d in bag.dags.values()} >= dag_files() >= {EXAMPLES / "mixed_pipeline.py"}
    assert {"mixed_pipeline", "local_training", "kubernetes_training", "sagemaker_training"} <= set(bag.dag_ids)
    mixed = bag.get_dag("mixed_pipeline")
    step_tasks = {t.task_id for t in mixed.tasks if type(t).__name__ == "_StepOperatorDecoratedOperator"}
    assert step_tasks == {"train_model", "generate_explanations"}
    assert {t.task_id for t in mixed.tasks} - step_tasks == {"load_data", "preprocess", "save_results"}


def test_example_connections_cover_the_step_operators_used():
    import json

    connections = json.loads((EXAMPLES / "connections.json").read_text())
    assert connections["local_step_operator"]["conn_type"] == "stepops_local"
    assert connections["k8s_step_operator"]["conn_type"] == "stepops_kubernetes"
    from airflow_stepops.settings.kubernetes import KubernetesStepOperatorConfig

    KubernetesStepOperatorConfig.model_validate(connections["k8s_step_operator"]["extra"])
    from airflow_stepops.settings.sagemaker import SageMakerStepOperatorConfig

    SageMakerStepOperatorConfig.model_validate(connections["sagemaker_step_operator"]["extra"])
