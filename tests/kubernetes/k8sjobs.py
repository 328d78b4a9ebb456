"""Helpers that submit real step Jobs to the emulator through the kubernetes hook."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from airflow_stepops.artifacts import store_path
from airflow_stepops.bundle import StepIdentity, build_meta, pickle_payload, write_bundle
from airflow_stepops.hooks.base import JobHandle, StepSpec
from airflow_stepops.hooks.kubernetes import KubernetesStepOperatorHook
from airflow_stepops.resources import ResourceSettings
from airflow_stepops.settings.kubernetes import KubernetesStepOperatorSettings
from airflow_stepops.triggers.kubernetes import KubernetesStepOperatorTrigger


def make_hook(conn_id: str = "k8s_step_operator") -> KubernetesStepOperatorHook:
    return KubernetesStepOperatorHook(step_operator_conn_id=conn_id)


def make_spec(hook: KubernetesStepOperatorHook, fn, *args: Any, task_id: str, try_number: int = 1,
              resources: ResourceSettings | None = None, settings: KubernetesStepOperatorSettings | None = None,
              refs: list | None = None, run_key: str = "", **kwargs: Any) -> StepSpec:
    identity = StepIdentity("k8s_tests", "run-1", task_id, -1, try_number, run_key)
    prefix = identity.prefix(hook.artifact_root())
    spec = StepSpec(identity=identity, bundle_uri=str(prefix / "bundle"), output_uri=str(prefix / "output"),
                    resources=resources or ResourceSettings(), settings=settings or KubernetesStepOperatorSettings(),
                    refs=list(refs or []), task_label=f"k8s_tests.{task_id}")
    meta = build_meta(identity, multiple_outputs=False, max_result_bytes=10**10, inline_result_max_bytes=48_000,
                      task_label=spec.task_label)
    hook.render(spec)
    write_bundle(store_path(spec.bundle_uri), pickle_payload(fn, list(args), kwargs), meta)
    return spec


def run_trigger(hook: Any, handle: JobHandle, *, deadline: float | None = None, timeout: float = 60,
                trigger_class: type = KubernetesStepOperatorTrigger) -> dict[str, Any]:
    """Wait the way a deferred task does; returns the trigger's event payload."""
    trigger = trigger_class(conn_id=hook.step_operator_conn_id, handle=handle, poll_interval=0.5, deadline=deadline)

    async def first() -> dict[str, Any]:
        async for event in trigger.run():
            return event.payload
        raise AssertionError("the trigger ended without an event")

    payload = asyncio.run(asyncio.wait_for(first(), timeout))
    json.dumps(payload)  # it must be storable in the metadata DB
    return payload
