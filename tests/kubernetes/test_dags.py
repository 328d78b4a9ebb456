"""Kubernetes steps through Airflow's own ``dag.test()``: XComs, artifacts, mapping, failures."""

from __future__ import annotations

import pytest

pytest.importorskip("kubernetes")

from airflow_stepops.hooks import kubernetes_job as manifest
from tests.dags import k8s_steps

from ..flavorjobs import render, run_example
from ..unit.test_operator import _run, _xcom

pytestmark = pytest.mark.usefixtures("airflow_db", "k8s_emulator")


def _jobs(k8s, task_id: str) -> list[dict]:
    return k8s.list_objects("jobs", "steps", f"{manifest.LABEL_PREFIX}/task-id={task_id}")


def test_pipeline_with_xcoms_artifacts_and_mapping(k8s_emulator):
    run, tis = _run(k8s_steps.k8s_pipeline)
    assert run.state == "success", {k: ti.state for k, ti in tis.items()}
    assert _xcom(tis["report"]) == {"words": 60, "model": [1, 2], "counts": [2, 3]}
    job = _xcom(tis["train"], key="stepops_job")
    assert job["flavor"] == "kubernetes" and job["console_url"].endswith(f"/steps/{job['job_id']}")
    [train_job] = _jobs(k8s_emulator, "train")
    assert train_job["metadata"]["annotations"][f"{manifest.LABEL_PREFIX}/run-id"] == run.run_id
    container = train_job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"] == {"requests": {"cpu": "2", "memory": "1Gi"}, "limits": {"memory": "1Gi"}}
    mapped = [j for j in _jobs(k8s_emulator, "count") if
              j["metadata"]["annotations"][f"{manifest.LABEL_PREFIX}/run-id"] == run.run_id]
    assert sorted(j["metadata"]["annotations"][f"{manifest.LABEL_PREFIX}/map-index"] for j in mapped) == ["0", "1"]
    assert all(j["metadata"]["labels"]["stage"] == "count" for j in mapped)


def test_failures_preemption_timeout_and_bad_image(k8s_emulator):
    run, tis = _run(k8s_steps.k8s_failures)
    assert {k: ti.state for k, ti in tis.items()} == {"evicted": "failed", "too_slow": "failed",
                                                     "bad_image": "failed"}
    for task_id in ("too_slow", "bad_image"):  # stopped by us: the Jobs are deleted
        alive = [j for j in _jobs(k8s_emulator, task_id)
                 if j["metadata"]["annotations"][f"{manifest.LABEL_PREFIX}/run-id"] == run.run_id]
        assert alive == [], f"{task_id}: {[j['metadata']['name'] for j in alive]}"
    preempted = _xcom(tis["evicted"], key="stepops_job")
    assert preempted["reason"] == "preempted", preempted


def test_gpu_training_example_runs_on_the_emulator(k8s_emulator):
    run, tis = run_example("kubernetes_training", gpu_training_step={"w": 3.0, "b": -0.5})
    [job] = [j for j in _jobs(k8s_emulator, "gpu_training_step")
             if j["metadata"]["annotations"][f"{manifest.LABEL_PREFIX}/run-id"] == run.run_id]
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"karpenter.sh/capacity-type": "spot"}
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    record = _xcom(tis["gpu_training_step"], key="stepops_job")
    assert record["spot"] is True and record["node"] == "emulator-node" and record["run_seconds"] >= 0


def test_stepops_render_prints_the_job_manifest_without_creating_it(k8s_emulator):
    job = render(k8s_emulator, "kubernetes", "k8s_pipeline", "train")["request"]
    assert job["kind"] == "Job" and job["metadata"]["namespace"] == "steps"
    assert job["metadata"]["annotations"][f"{manifest.LABEL_PREFIX}/run-id"] == "render"
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"] == {"cpu": "2", "memory": "1Gi"}
