"""GPU training on Kubernetes: ZenML's "Kubernetes Step Operator" example as an Airflow DAG.

Preprocessing runs on the Airflow worker; the training step runs as a Kubernetes Job asking for
8 CPUs, 32 GB and one A100, on spot nodes, with the step operator ``k8s_step_operator`` (see
``connections.json``; ``make demo FLAVOR=kubernetes`` starts the local Kubernetes emulator, whose node
has 4 A100s). On a real cluster give the connection your context or a ``kubernetes`` connection and an
image with this Python version and ``cloudpickle`` (plus your ML libraries).
"""

from __future__ import annotations

from airflow.sdk import dag, task

from airflow_stepops import ResourceSettings
from airflow_stepops.settings import KubernetesStepOperatorSettings


@dag(schedule=None, catchup=False, tags=["stepops", "example", "kubernetes"])
def kubernetes_training():
    @task
    def preprocessing_step() -> dict:
        xs = [i / 100 for i in range(-100, 101)]
        return {"x": xs, "y": [3 * x - 0.5 for x in xs]}

    @task.step_operator(
        step_operator="k8s_step_operator",
        settings={
            "resources": ResourceSettings(cpu_count=8, memory="32GB", gpu_count=1, gpu_type="A100"),
            "step_operator.kubernetes": KubernetesStepOperatorSettings(
                use_spot=True,  # spot node pool; a reclaimed node is reported as preemption and retried
                spot_toleration={"key": "spot", "operator": "Exists", "effect": "NoSchedule"},
                max_runtime_in_seconds=3600,
                labels={"workload": "training"},
            ),
        },
        retries=2,
    )
    def gpu_training_step(data: dict) -> dict:
        import os

        # the device plugin exposes the granted GPU to the container
        print("GPUs visible to this pod:", os.environ.get("NVIDIA_VISIBLE_DEVICES", "(none reported)"), flush=True)
        w = b = 0.0
        n = len(data["x"])
        for _ in range(500):
            gw = sum(2 * (w * x + b - y) * x for x, y in zip(data["x"], data["y"])) / n
            gb = sum(2 * (w * x + b - y) for x, y in zip(data["x"], data["y"])) / n
            w, b = w - 0.5 * gw, b - 0.5 * gb
        print(f"trained: w={w:.3f} b={b:.3f} in pod {os.environ.get('HOSTNAME')}", flush=True)
        return {"w": round(w, 3), "b": round(b, 3)}

    gpu_training_step(preprocessing_step())


kubernetes_training()
