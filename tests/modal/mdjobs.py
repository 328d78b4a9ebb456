"""Helpers that spawn real Modal calls on the Modal emulator through the modal hook."""

from __future__ import annotations

from typing import Any

from airflow_stepops.artifacts import store_path
from airflow_stepops.bundle import StepIdentity, build_meta, pickle_payload, write_bundle
from airflow_stepops.hooks.base import StepSpec
from airflow_stepops.hooks.modal import ModalStepOperatorHook
from airflow_stepops.resources import ResourceSettings
from airflow_stepops.settings.modal import ModalStepOperatorSettings

from ..kubernetes.k8sjobs import run_trigger as _run_trigger


def make_hook(conn_id: str = "modal_step_operator") -> ModalStepOperatorHook:
    return ModalStepOperatorHook(step_operator_conn_id=conn_id)


def make_spec(hook: ModalStepOperatorHook, fn, *args: Any, task_id: str, try_number: int = 1,
              resources: ResourceSettings | None = None, settings: ModalStepOperatorSettings | None = None,
              refs: list | None = None, timeout_seconds: float | None = None, **kwargs: Any) -> StepSpec:
    identity = StepIdentity("md_tests", "run-1", task_id, -1, try_number)
    prefix = identity.prefix(hook.artifact_root())
    spec = StepSpec(identity=identity, bundle_uri=str(prefix / "bundle"), output_uri=str(prefix / "output"),
                    resources=resources or ResourceSettings(), settings=settings or ModalStepOperatorSettings(),
                    refs=list(refs or []), task_label=f"md_tests.{task_id}", timeout_seconds=timeout_seconds)
    meta = build_meta(identity, multiple_outputs=False, max_result_bytes=10**10, inline_result_max_bytes=48_000,
                      task_label=spec.task_label)
    hook.render(spec)
    write_bundle(store_path(spec.bundle_uri), pickle_payload(fn, list(args), kwargs), meta)
    return spec


def run_trigger(hook: ModalStepOperatorHook, handle: dict, **kwargs: Any) -> dict[str, Any]:
    from airflow_stepops.triggers.modal import ModalStepOperatorTrigger

    return _run_trigger(hook, handle, trigger_class=ModalStepOperatorTrigger, **kwargs)
