"""Training on SageMaker: ZenML's "SageMaker Step Operator" example as an Airflow DAG, spot included.

``train_on_sagemaker`` runs as a SageMaker Training Job on ``ml.p3.2xlarge`` spot capacity through the
step operator ``sagemaker_step_operator`` (see ``connections.json``: the execution role, the training
image and an ``s3://`` artifact store). It checkpoints to ``/opt/ml/checkpoints``, which SageMaker
syncs to S3 (``STEPOPS_CHECKPOINT_DIR`` names it), so a spot interruption resumes from the last epoch
instead of starting over.
``make demo FLAVOR=sagemaker`` runs the mixed pipeline against the local SageMaker emulator.
"""

from __future__ import annotations

from airflow.sdk import dag, task

from airflow_stepops.settings import SageMakerStepOperatorSettings

sagemaker_settings = SageMakerStepOperatorSettings(
    instance_type="ml.p3.2xlarge",
    max_runtime_in_seconds=3600,
    use_spot_instances=True,
)


@dag(schedule=None, catchup=False, tags=["stepops", "example", "sagemaker"])
def sagemaker_training():
    @task
    def load_data() -> dict:
        xs = [i / 100 for i in range(-100, 101)]
        return {"x": xs, "y": [1.5 * x + 0.25 for x in xs]}

    @task.step_operator(step_operator="sagemaker_step_operator",
                        settings={"step_operator.sagemaker": sagemaker_settings}, retries=2)
    def train_on_sagemaker(data: dict, epochs: int = 20) -> dict:
        import json
        import os

        # /opt/ml/checkpoints on SageMaker; the variable also works on the local emulator
        state_file = os.path.join(os.environ.get("STEPOPS_CHECKPOINT_DIR", "/opt/ml/checkpoints"), "state.json")
        state = {"epoch": 0, "w": 0.0, "b": 0.0}
        if os.path.exists(state_file):  # resumed after a spot interruption
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
            os.makedirs(os.path.dirname(state_file), exist_ok=True)
            with open(state_file, "w") as fh:
                json.dump(state, fh)
            print(f"epoch {state['epoch']}: w={state['w']:.3f} b={state['b']:.3f}", flush=True)
        return {"w": round(state["w"], 3), "b": round(state["b"], 3), "epochs": state["epoch"]}

    train_on_sagemaker(load_data())


sagemaker_training()
