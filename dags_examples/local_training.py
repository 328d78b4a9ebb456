"""The ``local`` flavor with the operator class: a small hyper-parameter sweep on a GPU box.

Each sweep point runs as a detached, resource-limited process on the worker host. On a machine with
NVIDIA GPUs add ``gpu_count=1`` (and e.g. ``gpu_type="A100"``) to the resources below and every
step gets its own ``CUDA_VISIBLE_DEVICES``; without GPUs leave them out or the step fails clearly.
"""

from __future__ import annotations

from airflow.sdk import dag, task

from airflow_stepops import ResourceSettings
from airflow_stepops.operators.local import LocalStepOperator
from airflow_stepops.settings import LocalStepOperatorSettings


def fit(learning_rate: float, epochs: int = 300) -> dict:
    """Fit y = 2x + 1 by gradient descent; runs in the step process, prints progress to the task log."""
    import os

    xs = [i / 50 for i in range(-50, 51)]
    ys = [2 * x + 1 for x in xs]
    w = b = 0.0
    for epoch in range(epochs):
        gw = sum(2 * (w * x + b - y) * x for x, y in zip(xs, ys)) / len(xs)
        gb = sum(2 * (w * x + b - y) for x, y in zip(xs, ys)) / len(xs)
        w, b = w - learning_rate * gw, b - learning_rate * gb
        if epoch % 100 == 0:
            print(f"lr={learning_rate} epoch={epoch} w={w:.3f} b={b:.3f}", flush=True)
    loss = sum((w * x + b - y) ** 2 for x, y in zip(xs, ys)) / len(xs)
    return {"learning_rate": learning_rate, "w": w, "b": b, "loss": loss,
            "cpus": sorted(os.sched_getaffinity(0)), "threads": os.environ.get("OMP_NUM_THREADS")}


@dag(schedule=None, catchup=False, tags=["stepops", "example", "local"])
def local_training():
    sweep = LocalStepOperator.partial(
        task_id="fit",
        python_callable=fit,
        step_operator="local_step_operator",
        settings={
            "resources": ResourceSettings(cpu_count=1, memory="512MiB"),
            "step_operator.local": LocalStepOperatorSettings(max_runtime_in_seconds=600),
        },
    ).expand(op_args=[[0.01], [0.1], [0.5]])

    @task
    def best(results: list[dict]) -> dict:
        winner = min(results, key=lambda r: r["loss"])
        print(f"best learning rate: {winner['learning_rate']} (loss {winner['loss']:.2e})")
        return winner

    best(sweep.output)


local_training()
