"""Helpers that submit real steps to a flavor's emulator through its hook, and wait for them the way a
deferred task does (its trigger). The flavor comes from the hook; the connections are tests/conftest.py's."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from airflow_stepops.artifacts import ArtifactRef, store_path
from airflow_stepops.bundle import StepIdentity, build_meta, pickle_payload, write_bundle
from airflow_stepops.flavors import get_flavor
from airflow_stepops.hooks.base import JobHandle, StepOperatorHook, StepSpec
from airflow_stepops.requirements import requirements_text
from airflow_stepops.resources import ResourceSettings
from airflow_stepops.settings.base import BaseStepOperatorSettings

#: flavor -> (the DAG id of its test steps, its step operator connection)
FLAVORS = {"kubernetes": ("k8s_tests", "k8s_step_operator"), "sagemaker": ("sm_tests", "sagemaker_step_operator"),
           "vertex": ("vx_tests", "vertex_step_operator"), "azureml": ("az_tests", "azureml_step_operator"),
           "modal": ("md_tests", "modal_step_operator")}
#: flavor -> the session fixture of its emulator (tests/conftest.py)
EMULATORS = {"kubernetes": "k8s_emulator", "sagemaker": "sm_emulator", "vertex": "vx_emulator",
             "azureml": "az_emulator", "modal": "md_emulator"}


def connection_like(monkeypatch: Any, conn_id: str, like: str, **extra: Any) -> str:
    """Register the step operator ``conn_id``: the connection ``like`` with ``extra`` over its extras (None drops
    one)."""
    conn = json.loads(os.environ[f"AIRFLOW_CONN_{like.upper()}"])
    conn["extra"] = {k: v for k, v in {**conn["extra"], **extra}.items() if v is not None}
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))
    return conn_id


def make_hook(flavor: str, conn_id: str | None = None, monkeypatch: Any = None, like: str = "", **extra: Any) -> Any:
    """The hook of ``flavor``'s test step operator, or of ``conn_id``: given ``monkeypatch``, registered first as
    the connection ``like`` (the flavor's) with ``extra`` over its extras."""
    if monkeypatch is not None:
        connection_like(monkeypatch, str(conn_id), like or FLAVORS[flavor][1], **extra)
    return get_flavor(flavor).hook()(step_operator_conn_id=conn_id or FLAVORS[flavor][1])


def hook_maker(flavor: str) -> Callable[..., Any]:
    """``make_hook`` of one flavor, for its test modules."""
    return partial(make_hook, flavor)


def make_spec(hook: StepOperatorHook, fn: Callable[..., Any], *args: Any, task_id: str, try_number: int = 1,
              resources: ResourceSettings | None = None, settings: BaseStepOperatorSettings | None = None,
              refs: list | None = None, timeout_seconds: float | None = None, dag_id: str = "", run_key: str = "",
              **kwargs: Any) -> StepSpec:
    """The step's spec, rendered by the hook, with its bundle written where the hook will look for it."""
    dag_id = dag_id or FLAVORS[hook.flavor][0]
    identity = StepIdentity(dag_id, "run-1", task_id, -1, try_number, run_key)
    prefix = identity.prefix(hook.artifact_root())
    spec = StepSpec(identity=identity, bundle_uri=str(prefix / "bundle"), output_uri=str(prefix / "output"),
                    resources=resources or ResourceSettings(),
                    settings=settings or get_flavor(hook.flavor).settings_model()(),
                    refs=list(refs or []), task_label=f"{dag_id}.{task_id}", timeout_seconds=timeout_seconds)
    meta = build_meta(identity, multiple_outputs=False, max_result_bytes=10**10, inline_result_max_bytes=48_000,
                      task_label=spec.task_label,
                      requirements=requirements_text(getattr(spec.settings, "requirements", None), None))
    hook.render(spec)
    write_bundle(store_path(spec.bundle_uri), pickle_payload(fn, list(args), kwargs), meta)
    return spec


def declare(flavor: str, **kwargs: Any) -> None:
    """Declare a step task of ``flavor`` as a DAG file does: errors here are DAG parse (import) errors."""
    from airflow.sdk import DAG, task

    with DAG(f"{flavor}_parse_checks", schedule=None):
        @task.step_operator(step_operator=FLAVORS[flavor][1], **kwargs)
        def step() -> None:
            pass

        step()


def stored_ref(hook: StepOperatorHook, value: Any, local: Path | None = None) -> ArtifactRef:
    """``value`` as an artifact an earlier step left in the hook's artifact store, or at a ``local`` path."""
    import cloudpickle

    path = local or store_path(make_spec(hook, int, task_id="ref_source").output_uri).parent / "ref.pkl"
    data = cloudpickle.dumps(value)
    path.write_bytes(data)
    return ArtifactRef(uri=f"file://{path}" if local else str(path), size=len(data),
                       type=f"{type(value).__module__}.{type(value).__qualname__}",
                       sha256=hashlib.sha256(data).hexdigest())


async def poll_together(hook: StepOperatorHook, handles: list[JobHandle], rounds: int = 60) -> list[list[Any]]:
    """Poll the jobs as a triggerer's shared poller does (``aget_statuses`` of one hook, every 0.5 s) until all
    are over; the statuses of every round."""
    seen = []
    for _ in range(rounds):
        statuses = await hook.aget_statuses(handles)
        seen.append(statuses)
        if all(not isinstance(s, BaseException) and s.state.terminal for s in statuses):
            return seen
        await asyncio.sleep(0.5)
    raise AssertionError("the jobs did not finish")


def run_trigger(hook: StepOperatorHook, handle: JobHandle, *, deadline: float | None = None,
                timeout: float = 60) -> dict[str, Any]:
    """Wait the way a deferred task does; returns the trigger's event payload."""
    trigger = get_flavor(hook.flavor).trigger()(conn_id=hook.step_operator_conn_id, handle=handle,
                                                poll_interval=0.5, deadline=deadline)

    async def first() -> dict[str, Any]:
        async for event in trigger.run():
            return event.payload
        raise AssertionError("the trigger ended without an event")

    payload = asyncio.run(asyncio.wait_for(first(), timeout))
    json.dumps(payload)  # it must be storable in the metadata DB
    return payload


def run_example(name: str, **returns: Any) -> tuple[Any, dict[str, Any]]:
    """``dags_examples/<name>.py`` run by Airflow's ``dag.test()``, which must succeed, each task named in
    ``returns`` returning that: the run and its task instances."""
    from airflow_stepops._compat import dagbag_class

    from .unit.test_operator import _run, _xcom

    examples = Path(__file__).resolve().parents[1] / "dags_examples"
    run, tis = _run(dagbag_class()(dag_folder=str(examples / f"{name}.py")).get_dag(name))
    assert run.state == "success", {k: ti.state for k, ti in tis.items()}
    assert {task_id: _xcom(tis[task_id]) for task_id in returns} == returns
    return run, tis


def run_pipeline(dag: Any, flavor: str) -> tuple[Any, dict[str, Any], ArtifactRef, dict[str, Any]]:
    """A pipeline of tests/dags/flavor_pipelines.py run by ``dag.test()``, which must compute what it computes,
    its model handed on as an artifact, its ``train`` step run by ``flavor``: the run, its task instances, that
    artifact and the job record of ``train``."""
    from .unit.test_operator import _run, _xcom

    run, tis = _run(dag)
    assert run.state == "success", {k: ti.state for k, ti in tis.items()}
    assert _xcom(tis["report"]) == {"total": 18, "model": [1, 2, 3], "doubled": [2, 10]}
    ref = _xcom(tis["train"], key="model")
    assert ref.type == "builtins.frozenset" and ref.load() == frozenset({1, 2, 3})
    record = _xcom(tis["train"], key="stepops_job")
    assert record["flavor"] == flavor, record
    return run, tis, ref, record


def render(emulator: Any, flavor: str, dag_id: str, task_id: str) -> dict[str, Any]:
    """What ``stepops render`` prints for a task of the test DAGs, one of ``flavor`` (its ``request``, ``image``,
    ``install`` ...): it must submit nothing to the flavor's ``emulator``."""
    before = set(emulator.job_ids)
    out = subprocess.run([sys.executable, "-m", "airflow_stepops.cli", "render", dag_id, task_id],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout[out.stdout.index("{"):])
    assert body["flavor"] == flavor and set(emulator.job_ids) <= before, body
    return body
