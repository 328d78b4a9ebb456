"""The mixed pipeline: most steps on the Airflow worker, training and explanations on step operators.

Mirrors the "Mixed Infrastructure Pipelines" example of ZenML's step-operator docs. The step operators
are Airflow connections; ``make demo`` registers ``local_step_operator`` (flavor ``local``), and
``STEPOPS_EXAMPLE_STEP_OPERATOR`` picks another registered one without editing this file.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

from airflow.sdk import dag, task

from airflow_stepops import ResourceSettings

STEP_OPERATOR = os.environ.get("STEPOPS_EXAMPLE_STEP_OPERATOR", "local_step_operator")


@dataclass
class LinearModel:
    """Not JSON: travels between steps as an ArtifactRef, never through XCom."""

    weights: list[float]
    bias: float
    loss: float

    def predict(self, row: list[float]) -> float:
        return sum(w * x for w, x in zip(self.weights, row)) + self.bias


@dag(schedule=None, catchup=False, tags=["stepops", "example"])
def mixed_pipeline():
    @task
    def load_data(rows: int = 400) -> dict:
        rng = random.Random(42)
        true_weights = [3.0, -2.0, 0.5]
        xs = [[rng.uniform(-1, 1) for _ in true_weights] for _ in range(rows)]
        ys = [sum(w * x for w, x in zip(true_weights, row)) + 1.0 + rng.gauss(0, 0.05) for row in xs]
        return {"features": ["size", "age", "noise"], "x": xs, "y": ys}

    @task
    def preprocess(data: dict) -> dict:
        columns = list(zip(*data["x"]))
        means = [sum(c) / len(c) for c in columns]
        x = [[v - m for v, m in zip(row, means)] for row in data["x"]]
        return {**data, "x": x, "means": means}

    @task.step_operator(
        step_operator=STEP_OPERATOR,
        settings={"resources": ResourceSettings(cpu_count=1, memory="1GB")},
        retries=1,
    )
    def train_model(data: dict, epochs: int = 200, learning_rate: float = 0.1) -> LinearModel:
        n, k = len(data["x"]), len(data["features"])
        weights, bias = [0.0] * k, 0.0
        for _ in range(epochs):
            grads, grad_b, loss = [0.0] * k, 0.0, 0.0
            for row, y in zip(data["x"], data["y"]):
                err = sum(w * x for w, x in zip(weights, row)) + bias - y
                loss += err * err / n
                grad_b += 2 * err / n
                for j in range(k):
                    grads[j] += 2 * err * row[j] / n
            weights = [w - learning_rate * g for w, g in zip(weights, grads)]
            bias -= learning_rate * grad_b
        print(f"trained on {n} rows: loss={loss:.5f} pid={os.getpid()}")
        return LinearModel(weights=weights, bias=bias, loss=loss)

    @task.step_operator(step_operator=STEP_OPERATOR, resources={"cpu_count": 1})
    def generate_explanations(model: LinearModel, data: dict) -> dict:
        spread = [max(col) - min(col) for col in zip(*data["x"])]
        importance = {f: abs(w) * s for f, w, s in zip(data["features"], model.weights, spread)}
        total = sum(importance.values()) or 1.0
        return {"importance": {f: round(v / total, 4) for f, v in importance.items()},
                "explained_on_pid": os.getpid()}

    @task
    def save_results(model_ref, explanations: dict) -> dict:
        model = model_ref.load()  # an ArtifactRef: the model stayed in the artifact store until now
        summary = {"weights": [round(w, 3) for w in model.weights], "bias": round(model.bias, 3),
                   "loss": round(model.loss, 6), "importance": explanations["importance"],
                   "model_artifact": model_ref.uri}
        print(f"saved results: {summary}")
        return summary

    data = preprocess(load_data())
    model = train_model(data)
    save_results(model, generate_explanations(model, data))


mixed_pipeline()
