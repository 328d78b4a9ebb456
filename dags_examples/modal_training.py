"""Training on Modal: ZenML's "Modal Step Operator" example as an Airflow DAG.

``train_on_modal`` runs as a call of a deployed Modal function with ``gpu="any"``, 4 CPU cores and
16384 MiB, exactly the settings of ZenML's example, through the step operator ``modal_step_operator``
(see ``connections.json``: the image's Python and packages, the Modal environment, the app name). The
bundle goes to Modal as the call's argument and the trained model comes back as its return value.
``evaluate`` asks for resources instead: one L4 and 8 GB, which become ``gpu="L4"`` and
``memory=7630``; ``featurize`` prefers an H100 but takes an A100-80GB when Modal has no H100 free.
``make demo FLAVOR=modal`` runs the mixed pipeline against the local Modal emulator.
"""

from __future__ import annotations

from airflow.sdk import dag, task

from airflow_stepops.resources import ResourceSettings
from airflow_stepops.settings import ModalStepOperatorSettings

modal_settings = ModalStepOperatorSettings(
    gpu="any",  # any available GPU
    cpu=4.0,
    memory=16384,  # MiB
    timeout=3600,
)


@dag(schedule=None, catchup=False, tags=["stepops", "example", "modal"])
def modal_training():
    @task
    def load_data() -> dict:
        xs = [i / 100 for i in range(-100, 101)]
        return {"x": xs, "y": [1.5 * x + 0.25 for x in xs]}

    @task.step_operator(step_operator="modal_step_operator",
                        settings={"step_operator.modal": ModalStepOperatorSettings(gpu=["H100", "A100-80GB"])})
    def featurize(data: dict) -> dict:
        import os

        print(f"featurizing on {os.environ.get('MODAL_GPU', 'a GPU')}", flush=True)
        return {**data, "x2": [x * x for x in data["x"]]}

    @task.step_operator(step_operator="modal_step_operator", settings={"step_operator.modal": modal_settings})
    def train_on_modal(data: dict, epochs: int = 20) -> dict:
        w = b = 0.0
        n = len(data["x"])
        for epoch in range(epochs):
            for _ in range(25):
                gw = sum(2 * (w * x + b - y) * x for x, y in zip(data["x"], data["y"])) / n
                gb = sum(2 * (w * x + b - y) for x, y in zip(data["x"], data["y"])) / n
                w, b = w - 0.5 * gw, b - 0.5 * gb
            print(f"epoch {epoch + 1}: w={w:.3f} b={b:.3f}", flush=True)
        return {"w": round(w, 3), "b": round(b, 3), "epochs": epochs}

    @task.step_operator(step_operator="modal_step_operator",
                        resources=ResourceSettings(gpu_type="L4", gpu_count=1, memory="8GB"))
    def evaluate(model: dict, data: dict) -> float:
        errors = [(model["w"] * x + model["b"] - y) ** 2 for x, y in zip(data["x"], data["y"])]
        return round(sum(errors) / len(errors), 6)

    data = featurize(load_data())
    evaluate(train_on_modal(data), data)


modal_training()
