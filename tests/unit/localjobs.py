"""Helpers that build real local jobs for the hook and trigger tests."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from airflow_stepops.artifacts import store_path
from airflow_stepops.bundle import StepIdentity, build_meta, pickle_payload, write_bundle
from airflow_stepops.hooks.base import JobHandle, JobState, JobStatus, StepSpec
from airflow_stepops.hooks.local import LocalStepOperatorHook
from airflow_stepops.resources import ResourceSettings
from airflow_stepops.settings.local import LocalStepOperatorConfig, LocalStepOperatorSettings


def make_hook(tmp_path: Path, **config: Any) -> LocalStepOperatorHook:
    cfg = LocalStepOperatorConfig(jobs_dir=str(tmp_path / "jobs"), artifact_store=f"file://{tmp_path}/store", **config)
    return LocalStepOperatorHook(step_operator_conn_id="test_local", config=cfg)


def make_spec(hook: LocalStepOperatorHook, fn, *args: Any, task_id: str = "step", try_number: int = 1,
              resources: ResourceSettings | None = None, settings: LocalStepOperatorSettings | None = None,
              **kwargs: Any) -> StepSpec:
    identity = StepIdentity("dag", "run-1", task_id, -1, try_number)
    prefix = identity.prefix(hook.artifact_root())
    spec = StepSpec(identity=identity, bundle_uri=str(prefix / "bundle"), output_uri=str(prefix / "output"),
                    resources=resources or ResourceSettings(), settings=settings or LocalStepOperatorSettings(),
                    task_label=f"dag.{task_id}")
    meta = build_meta(identity, multiple_outputs=False, max_result_bytes=10**9, inline_result_max_bytes=48_000,
                      task_label=spec.task_label)
    write_bundle(store_path(spec.bundle_uri), pickle_payload(fn, list(args), kwargs), meta)
    return spec


def wait_terminal(hook: LocalStepOperatorHook, handle: JobHandle, timeout: float = 60) -> JobStatus:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = hook.get_status(handle)
        if status.state.terminal:
            return status
        time.sleep(0.1)
    raise AssertionError(f"job {handle['job_id']} not finished after {timeout}s")


def wait_running(hook: LocalStepOperatorHook, handle: JobHandle, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while hook.get_status(handle).state is not JobState.RUNNING:
        if time.monotonic() > deadline:
            raise AssertionError("job did not start")
        time.sleep(0.05)
