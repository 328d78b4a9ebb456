"""Training on Azure Machine Learning: ZenML's "Azure ML Step Operator" example as an Airflow DAG.

``train_on_azureml`` runs as an Azure ML command job on the ``gpu-cluster`` compute target through the
step operator ``azureml_step_operator`` (see ``connections.json``: subscription, resource group,
workspace, the training image and an ``azureml://datastores/...`` artifact store). The job gets its
bundle as a job input and writes its result to a job output on the workspace's blob datastore (mounted
in the job: no credentials of ours travel), and checkpoints to ``STEPOPS_CHECKPOINT_DIR`` (an output
shared by all tries), so a retry after a preemption can resume from the last epoch. ``evaluate`` runs
on serverless compute and asks for resources instead of a VM size: one T4 GPU and 16 GB, which the step
operator turns into ``Standard_NC4as_T4_v3``, on the Spot tier.
``make demo FLAVOR=azureml`` runs the mixed pipeline against the local Azure ML emulator.
"""

from __future__ import annotations

from airflow.sdk import dag, task

from airflow_stepops.resources import ResourceSettings
from airflow_stepops.settings import AzureMLStepOperatorSettings

azureml_settings = AzureMLStepOperatorSettings(
    compute_target_name="gpu-cluster",
    shm_size="16g",
    max_runtime_in_seconds=3600,
    environment_variables={"TRAINING_MODE": "full"},
)


@dag(schedule=None, catchup=False, tags=["stepops", "example", "azureml"])
def azureml_training():
    @task
    def load_data() -> dict:
        xs = [i / 100 for i in range(-100, 101)]
        return {"x": xs, "y": [1.5 * x + 0.25 for x in xs]}

    @task.step_operator(step_operator="azureml_step_operator",
                        settings={"step_operator.azureml": azureml_settings}, retries=2)
    def train_on_azureml(data: dict, epochs: int = 20) -> dict:
        import json
        import os

        checkpoints = os.environ.get("STEPOPS_CHECKPOINT_DIR", "/tmp/checkpoints")
        state_file = os.path.join(checkpoints, "state.json")
        state = {"epoch": 0, "w": 0.0, "b": 0.0}
        if os.path.exists(state_file):  # an earlier try was preempted
            with open(state_file) as fh:
                state = json.load(fh)
            print(f"resuming from epoch {state['epoch']}", flush=True)
        n = len(data["x"])
        for epoch in range(state["epoch"], epochs):
            for _ in range(25):
                gw = sum(2 * (state["w"] * x + state["b"] - y) * x for x, y in zip(data["x"], data["y"])) / n
                gb = sum(2 * (state["w"] * x + state["b"] - y) for x, y in zip(data["x"], data["y"])) / n
                state["w"], state["b"] = state["w"] - 0.5 * gw, state["b"] - 0.5 * gb
            state["epoch"] = epoch + 1
            os.makedirs(checkpoints, exist_ok=True)
            with open(state_file, "w") as fh:
                json.dump(state, fh)
            print(f"epoch {state['epoch']}: w={state['w']:.3f} b={state['b']:.3f}", flush=True)
        return {"w": round(state["w"], 3), "b": round(state["b"], 3), "epochs": state["epoch"]}

    @task.step_operator(step_operator="azureml_step_operator",
                        resources=ResourceSettings(gpu_type="T4", gpu_count=1, memory="16GB"),
                        settings={"step_operator.azureml": AzureMLStepOperatorSettings(compute_target_name="",
                                                                                       job_tier="Spot")})
    def evaluate(model: dict, data: dict) -> float:
        errors = [(model["w"] * x + model["b"] - y) ** 2 for x, y in zip(data["x"], data["y"])]
        return round(sum(errors) / len(errors), 6)

    data = load_data()
    evaluate(train_on_azureml(data), data)


azureml_training()
