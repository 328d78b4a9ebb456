"""Kubernetes flavor: what deferred steps cost the API server, with and without shared polling.

A worker process starts the Kubernetes emulator and creates step Jobs labelled exactly as the flavor
labels them, whose pods print a line and sleep (cheap ``sh`` processes, so the numbers measure
polling, not Python start-up). ``KubernetesStepOperatorTrigger``s then wait for all of them on one
event loop, as in a triggerer. The emulator counts every API request served. Scenarios:

- shared, N/10 and N steps: all triggers subscribe to one ``SharedStatusPoller`` (two list calls per
  namespace and per 100 steps per round);
- unshared, N steps (the baseline): each trigger gets its own poller, i.e. polling without sharing.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.common import Section, emit, polling_rows, polling_scenarios, run_triggers

INTERVAL = 1.0  # poll interval of the scenario (the flavor's default is 5 s; shorter keeps the run short)
SLEEP = 6.0  # seconds each pod runs


def _job(index: int, run: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A Job as the flavor builds it (its labels and annotations), running a shell sleep."""
    from airflow_stepops.bundle import StepIdentity
    from airflow_stepops.hooks import kubernetes_job as manifest

    identity = StepIdentity("bench_kubernetes", run, f"step_{index:05d}", -1, 1)
    name = manifest.job_name(identity)
    labels = manifest.identity_labels(identity)
    pod = {"restartPolicy": "Never", "containers": [{
        "name": manifest.CONTAINER, "image": "busybox", "command": ["sh", "-c", f"echo started; sleep {SLEEP}"]}]}
    job = {"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"name": name, "labels": labels, "annotations": manifest.identity_annotations(identity)},
           "spec": {"backoffLimit": 0, "template": {"metadata": {"labels": labels}, "spec": pod}}}
    handle = {"flavor": "kubernetes", "job_id": name, "namespace": "default", "step": labels[manifest.STEP_LABEL],
              "conn_id": "k8s_bench", "try_number": 1, "transport": "inline", "output_uri": "file:///unused",
              "unschedulable_timeout": 600}
    return job, handle


def _kind(request: dict[str, Any]) -> str:
    path = request["path"]
    if path.endswith("/log"):
        return "log reads"
    if request["method"] == "GET" and path.endswith("/jobs"):
        return "job lists"
    if request["method"] == "GET" and path.endswith("/pods"):
        selector = str((request.get("query") or {}).get("labelSelector", ""))
        return "pod lists" if " in (" in selector else "pod lookups"
    if request["method"] == "POST":
        return "creates"
    return "other"


def worker(n: int, shared: bool) -> dict[str, Any]:
    """Run one scenario with its own emulator; return API request counts and timings."""
    import json
    import logging
    import os
    import tempfile

    from kubernetes import client

    from airflow_stepops.testing.kubernetes import KubernetesEmulator, NodeSpec
    from airflow_stepops.triggers.kubernetes import KubernetesStepOperatorTrigger

    logging.getLogger().setLevel(logging.WARNING)
    node = NodeSpec(capacity={"cpu": "1000", "memory": "4000Gi", "pods": str(n + 10)})
    with KubernetesEmulator(node=node, grace_period_cap=1) as k8s:
        kubeconfig = k8s.write_kubeconfig(Path(tempfile.mkdtemp()) / "kubeconfig", context="bench")
        os.environ["AIRFLOW_CONN_K8S_BENCH"] = json.dumps({"conn_type": "stepops_kubernetes", "extra": {
            "config_file": str(kubeconfig), "kubernetes_context": "bench", "image": "busybox"}})
        batch = client.BatchV1Api(k8s.api_client())
        handles = []
        for i in range(n):
            job, handle = _job(i, f"{'shared' if shared else 'unshared'}-{n}")
            batch.create_namespaced_job("default", job)
            handles.append(handle)
        served_before = len(k8s.requests())
        states, wall = run_triggers(lambda h, p: KubernetesStepOperatorTrigger(conn_id="k8s_bench", handle=h,
                                                                               poll_interval=p), handles, INTERVAL,
                                    shared)
        served = k8s.requests()[served_before:]
    counts = Counter(_kind(r) for r in served)
    return {"n": n, "shared": shared, "wall": wall, "states": sorted(set(states)), "requests": dict(counts),
            "total": len(served)}


def run(workdir: Path, *, steps: int = 100) -> Section:
    """Run the scenarios and build the table."""
    section = Section("kubernetes", f"{steps} deferred Kubernetes steps: API requests with shared polling")
    small, results = polling_scenarios(workdir, "kubernetes", steps, f"pods run {SLEEP:.0f} s")
    polling_rows(section, steps, small, results, INTERVAL,
                 lambda res: sum(res["requests"].get(k, 0) for k in ("job lists", "pod lists", "other")),
                 (f"log reads, {steps} steps (per running step per round, both modes)", "log reads"),
                 ("pod lookups (first log read, output collection: two per step)", "pod lookups"))
    section.notes += [
        f"poll interval {INTERVAL:.0f} s; each pod runs `sleep {SLEEP:.0f}`; requests counted by the emulator.",
        "status requests = Job and pod lists (shared: two per namespace and per 100 steps per round); "
        "besides them each step looks its pod up twice: before its first log read and to collect its output.",
        "log reads stay per step: each running step's new lines are fetched every round.",
    ]
    section.data["sleep"] = SLEEP
    return section


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        emit(worker(int(sys.argv[2]), bool(int(sys.argv[3]))))
