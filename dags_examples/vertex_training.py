"""Training on Vertex AI: ZenML's "Vertex AI Step Operator" example as an Airflow DAG.

``train_on_vertex`` runs as a Vertex AI CustomJob on ``n1-standard-8`` with two V100 GPUs, on Spot
capacity, through the step operator ``vertex_step_operator`` (see ``connections.json``: project,
location, the training image and a ``gs://`` artifact store). The job reads its bundle and writes its
result through Vertex's ``/gcs/<bucket>`` mount, and checkpoints to ``STEPOPS_CHECKPOINT_DIR`` (a
``/gcs/`` directory shared by all tries), so a retry after a Spot preemption resumes from the last
epoch instead of starting over. ``evaluate`` asks for resources instead of a machine type: one L4
GPU and 16 GB, which the step operator turns into ``g2-standard-4``.
``make demo FLAVOR=vertex`` runs the mixed pipeline against the local Vertex AI emulator.
"""

from __future__ import annotations

from airflow.sdk import dag, task

from airflow_stepops.resources import ResourceSettings
from airflow_stepops.settings import VertexStepOperatorSettings

vertex_settings = VertexStepOperatorSettings(
    machine_type="n1-standard-8",
    accelerator_type="NVIDIA_TESLA_V100",
    accelerator_count=2,
    use_spot=True,
    max_runtime_in_seconds=3600,
)


@dag(schedule=None, catchup=False, tags=["stepops", "example", "vertex"])
def vertex_training():
    @task
    def load_data() -> dict:
        xs = [i / 100 for i in range(-100, 101)]
        return {"x": xs, "y": [1.5 * x + 0.25 for x in xs]}

    @task.step_operator(step_operator="vertex_step_operator", settings={"step_operator.vertex": vertex_settings},
                        retries=2)
    def train_on_vertex(data: dict, epochs: int = 20) -> dict:
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

    @task.step_operator(step_operator="vertex_step_operator",
                        resources=ResourceSettings(gpu_type="L4", gpu_count=1, memory="16GB"))
    def evaluate(model: dict, data: dict) -> float:
        errors = [(model["w"] * x + model["b"] - y) ** 2 for x, y in zip(data["x"], data["y"])]
        return round(sum(errors) / len(errors), 6)

    data = load_data()
    evaluate(train_on_vertex(data), data)


vertex_training()
