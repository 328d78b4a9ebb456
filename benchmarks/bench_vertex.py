"""Vertex flavor: what deferred steps cost the JobService API, with and without shared polling.

A worker process starts the Vertex AI emulator and creates CustomJobs labelled exactly as the flavor
labels them, whose container command prints a line and sleeps (``sh``, so the numbers measure polling,
not Python start-up). ``VertexStepOperatorTrigger``s then wait for all of them on one event loop, as in
a triggerer. The emulator counts every API request served. Scenarios:

- shared, N/10 and N steps: all triggers subscribe to one ``SharedStatusPoller`` (one
  ``ListCustomJobs`` of recently updated jobs per round, one ``GetCustomJob`` per new step);
- unshared, N steps (the baseline): each trigger gets its own poller, i.e. polling without sharing.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.common import Section, emit, polling_rows, polling_scenarios, run_triggers

INTERVAL = 1.0  # poll interval of the scenario (the flavor's default is 15 s; shorter keeps the run short)
SLEEP = 6.0  # seconds each job runs


def _body(index: int, run: str) -> dict[str, Any]:
    """A CustomJob as the flavor labels it, running a shell sleep."""
    from airflow_stepops.bundle import StepIdentity
    from airflow_stepops.hooks import vertex_job

    identity = StepIdentity("bench_vertex", run, f"step_{index:05d}", -1, 1)
    return {"displayName": vertex_job.display_name(identity), "labels": vertex_job.identity_labels(identity),
            "jobSpec": {"workerPoolSpecs": [{
                "machineSpec": {"machineType": "n1-standard-4"}, "replicaCount": "1",
                "containerSpec": {"imageUri": "busybox", "command": ["sh", "-c", f"echo started; sleep {SLEEP}"]}}]}}


def _kind(request: dict[str, Any]) -> str:
    path = request["path"]
    if path.endswith("entries:list"):
        return "log reads"
    if request["method"] == "GET" and path.endswith("/customJobs"):
        return "job lists"
    if request["method"] == "GET" and "/customJobs/" in path:
        return "job gets"
    if request["method"] == "POST" and path.endswith("/customJobs"):
        return "creates"
    return "other"


def worker(n: int, shared: bool) -> dict[str, Any]:
    """Run one scenario with its own emulator; return API request counts and timings."""
    import json
    import logging
    import os

    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    from google.api_core.client_options import ClientOptions
    from google.cloud.aiplatform_v1 import CustomJob, JobServiceClient

    from airflow_stepops.testing.vertex import VertexEmulator
    from airflow_stepops.triggers.vertex import VertexStepOperatorTrigger

    logging.getLogger().setLevel(logging.WARNING)
    with VertexEmulator(stop_grace_period=1, queue_seconds=0.2, pending_seconds=0.2) as vx:
        os.environ.update(vx.env())
        os.environ["AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT"] = vx.airflow_connection()
        os.environ["AIRFLOW_CONN_VX_BENCH"] = json.dumps({"conn_type": "stepops_vertex", "extra": {
            "project": vx.project, "location": vx.location, "image": "busybox", "artifact_store": "gs://bench/x",
            "api_endpoint": vx.api_endpoint, "logging_endpoint": vx.logging_endpoint}})
        jobs = JobServiceClient(transport="rest", credentials=vx.credentials(),
                                client_options=ClientOptions(api_endpoint=vx.api_endpoint))
        parent = f"projects/{vx.project}/locations/{vx.location}"
        handles = []
        for i in range(n):
            job = jobs.create_custom_job(parent=parent, custom_job=CustomJob.from_json(
                json.dumps(_body(i, f"{'shared' if shared else 'unshared'}-{n}"))))
            handles.append({"flavor": "vertex", "job_id": job.name.rsplit("/", 1)[-1], "name": job.name,
                            "project": vx.project, "location": vx.location, "output_uri": "file:///unused",
                            "conn_id": "vx_bench", "try_number": 1})
        served_before = len(vx.requests)
        states, wall = run_triggers(lambda h, p: VertexStepOperatorTrigger(conn_id="vx_bench", handle=h,
                                                                           poll_interval=p), handles, INTERVAL, shared)
        served = vx.requests[served_before:]
    counts = Counter(_kind(r) for r in served)
    return {"n": n, "shared": shared, "wall": wall, "states": sorted(set(states)), "requests": dict(counts),
            "total": len(served)}


def run(workdir: Path, *, steps: int = 50) -> Section:
    """Run the scenarios and build the table."""
    section = Section("vertex", f"{steps} deferred Vertex AI steps: JobService requests with shared polling")
    small, results = polling_scenarios(workdir, "vertex", steps, f"jobs run {SLEEP:.0f} s")
    polling_rows(section, steps, small, results, INTERVAL,
                 lambda res: res["requests"].get("job lists", 0) + res["requests"].get("job gets", 0),
                 (f"log reads (Cloud Logging entries:list), {steps} steps, both modes", "log reads"))
    section.notes += [
        f"poll interval {INTERVAL:.0f} s; each job runs `sleep {SLEEP:.0f}`; requests counted by the emulator.",
        "status requests = ListCustomJobs (shared: one per round, filtered by update_time) and GetCustomJob "
        "(shared: once per new step, then every 20th round for all).",
        "log reads stay per step: each running step's new lines are read from Cloud Logging every round.",
    ]
    section.data["sleep"] = SLEEP
    return section


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        emit(worker(int(sys.argv[2]), bool(int(sys.argv[3]))))
