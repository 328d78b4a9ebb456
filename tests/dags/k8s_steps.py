"""DAGs of tests/kubernetes/test_dags.py: steps as Kubernetes Jobs on the emulator (``k8s_emulator``)."""

from __future__ import annotations

import json
from datetime import timedelta

from airflow.sdk import DAG, task

from airflow_stepops import ResourceSettings
from airflow_stepops.operators.kubernetes import KubernetesStepOperator
from airflow_stepops.settings import KubernetesStepOperatorSettings

FAULT = "stepops.emulator/fault"  # the emulator's fault annotation


def _count_words(text: str) -> int:
    print("counting words of", repr(text), flush=True)
    return len(text.split())


with DAG("k8s_pipeline", schedule=None, params={"scale": 10}) as k8s_pipeline:
    @task
    def sentences() -> list[str]:
        return ["one two", "three four five", "six"]

    @task.step_operator(step_operator="k8s_step_operator", multiple_outputs=True,
                        resources=ResourceSettings(cpu_count=2, memory="1GiB"))
    def train(lines: list[str], params=None) -> dict:
        import os

        words = sum(len(line.split()) for line in lines)
        print(f"training on {words} words in pod {os.environ['HOSTNAME']}", flush=True)
        return {"words": words * params["scale"], "model": {1, 2}}  # a set is not JSON: an ArtifactRef

    @task.step_operator(step_operator="k8s_step_operator", deferrable=False)  # waits on the worker
    def evaluate(model: set) -> list:
        return sorted(model)

    @task
    def report(words: int, model_items: list, counts: list[int]) -> dict:
        return {"words": words, "model": model_items, "counts": sorted(counts)}

    trained = train(sentences())
    counted = KubernetesStepOperator.partial(
        task_id="count", python_callable=_count_words, step_operator="k8s_step_operator",
        settings={"step_operator.kubernetes": KubernetesStepOperatorSettings(labels={"stage": "count"})},
    ).expand(op_args=[["a b"], ["c d e"]])
    report(trained["words"], evaluate(trained["model"]), counted.output)


with DAG("k8s_failures", schedule=None, default_args={"retries": 0}) as k8s_failures:
    @task.step_operator(step_operator="k8s_step_operator", settings={
        "step_operator.kubernetes": KubernetesStepOperatorSettings(
            annotations={FAULT: json.dumps({"kind": "evicted", "after": 0.5})})})
    def evicted() -> None:
        import time

        time.sleep(30)

    @task.step_operator(step_operator="k8s_step_operator", execution_timeout=timedelta(seconds=3))
    def too_slow() -> None:
        import time

        time.sleep(120)

    @task.step_operator(step_operator="k8s_step_operator", settings={
        "step_operator.kubernetes": KubernetesStepOperatorSettings(annotations={FAULT: "image_pull"})})
    def bad_image() -> None:
        pass

    evicted()
    too_slow()
    bad_image()
