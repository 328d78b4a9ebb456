"""A step per container flavor on a step operator without an image (``<flavor>_default_image``, registered by
the tests), installing ``step-requirements.txt`` from beside this file, which holds the package the step imports:
what ``stepops render`` shows of it, and a run of it."""

from __future__ import annotations

from airflow.sdk import DAG, task

#: flavor -> its step settings beyond the requirements (SageMaker: a warm pool, whose cache keeps them)
EXTRA = {"kubernetes": {}, "sagemaker": {"keep_alive_period_in_seconds": 600}, "vertex": {}, "azureml": {}}

with DAG("requirements_steps", schedule=None):
    for flavor, extra in EXTRA.items():
        @task.step_operator(task_id=f"on_{flavor}", step_operator=f"{flavor}_default_image",
                            settings={f"step_operator.{flavor}": {"requirements": "step-requirements.txt", **extra}})
        def fit() -> str:
            import stepops_probe  # type: ignore[import-not-found]  # only the requirements install it

            return str(stepops_probe.VALUE)

        fit()
