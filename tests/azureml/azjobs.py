"""Helpers that submit real command jobs to the Azure ML emulator through the azureml hook."""

from __future__ import annotations

from typing import Any

from airflow_stepops.artifacts import store_path
from airflow_stepops.bundle import StepIdentity, build_meta, pickle_payload, write_bundle
from airflow_stepops.hooks.azureml import AzureMLStepOperatorHook
from airflow_stepops.hooks.base import StepSpec
from airflow_stepops.resources import ResourceSettings
from airflow_stepops.settings.azureml import AzureMLStepOperatorSettings

from ..kubernetes.k8sjobs import run_trigger as _run_trigger


def make_hook(conn_id: str = "azureml_step_operator") -> AzureMLStepOperatorHook:
    return AzureMLStepOperatorHook(step_operator_conn_id=conn_id)


def make_spec(hook: AzureMLStepOperatorHook, fn, *args: Any, task_id: str, try_number: int = 1,
              resources: ResourceSettings | None = None, settings: AzureMLStepOperatorSettings | None = None,
              refs: list | None = None, timeout_seconds: float | None = None, dag_id: str = "az_tests",
              **kwargs: Any) -> StepSpec:
    identity = StepIdentity(dag_id, "run-1", task_id, -1, try_number)
    prefix = identity.prefix(hook.artifact_root())
    spec = StepSpec(identity=identity, bundle_uri=str(prefix / "bundle"), output_uri=str(prefix / "output"),
                    resources=resources or ResourceSettings(), settings=settings or AzureMLStepOperatorSettings(),
                    refs=list(refs or []), task_label=f"{dag_id}.{task_id}", timeout_seconds=timeout_seconds)
    meta = build_meta(identity, multiple_outputs=False, max_result_bytes=10**10, inline_result_max_bytes=48_000,
                      task_label=spec.task_label)
    hook.render(spec)
    write_bundle(store_path(spec.bundle_uri), pickle_payload(fn, list(args), kwargs), meta)
    return spec


def run_trigger(hook: AzureMLStepOperatorHook, handle: dict, **kwargs: Any) -> dict[str, Any]:
    from airflow_stepops.triggers.azureml import AzureMLStepOperatorTrigger

    return _run_trigger(hook, handle, trigger_class=AzureMLStepOperatorTrigger, **kwargs)
