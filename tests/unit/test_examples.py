"""Every example DAG parses, and uses step operators the way the README describes."""

from __future__ import annotations

from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "dags_examples"


@pytest.mark.usefixtures("airflow_db")
def test_example_dags_parse_without_errors():
    from airflow_stepops._compat import dagbag_class

    bag = dagbag_class()(dag_folder=str(EXAMPLES))
    assert bag.import_errors == {}
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
