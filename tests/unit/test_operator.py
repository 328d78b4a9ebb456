"""Step tasks through Airflow's own ``dag.test()``: XCom args, templating, mapping, outputs, errors."""

from __future__ import annotations

import os
import time

import pytest

from airflow_stepops import ArtifactRef, RemoteStepError, StepOperatorConfigError
from airflow_stepops.exceptions import rebuild_remote_error
from airflow_stepops.operators.local import LocalStepOperator
from tests.dags import step_features

pytestmark = pytest.mark.usefixtures("airflow_db")


def _run(dag, **conf):
    run = dag.test(run_conf=conf or None)
    tis = {ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]": ti for ti in run.get_task_instances()}
    return run, tis


def _xcom(ti, key="return_value"):
    from airflow.models.xcom import XComModel
    from airflow.sdk.serde import deserialize
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.query(XComModel).filter_by(dag_id=ti.dag_id, run_id=ti.run_id, task_id=ti.task_id,
                                                 map_index=ti.map_index, key=key).one()
        value = XComModel.deserialize_value(row)
    return deserialize(value) if isinstance(value, dict) and "__classname__" in value else value


def test_xcom_args_templating_multiple_outputs_and_mapping():
    run, tis = _run(step_features.step_features)
    assert run.state == "success", {k: ti.state for k, ti in tis.items()}
    assert _xcom(tis["collect"]) == {"total": 60, "label": "run 10", "squares": [1, 4, 9]}
    assert _xcom(tis["stats"], key="pid") != os.getpid()
    assert _xcom(tis["stats"], key="tripled") == 18  # helper module of the DAG folder travelled by value
    assert _xcom(tis["stats"], key="date_type") == "datetime.datetime"  # no pendulum needed remotely
    job = _xcom(tis["stats"], key="stepops_job")
    assert job["flavor"] == "local" and job["step_operator"] == "local_step_operator" and job["job_id"]
    assert {tis[f"square[{i}]"].state for i in range(3)} == {"success"}


def test_artifacts_pass_between_steps_and_load_in_normal_tasks():
    run, tis = _run(step_features.step_artifacts)
    assert run.state == "success"
    ref = _xcom(tis["make"])
    assert isinstance(ref, ArtifactRef) and ref.type == "builtins.set" and ref.uri.startswith("file://")
    assert _xcom(tis["consume"]) == ["a", "b", "set"]
    assert _xcom(tis["inspect_ref"]) == {"is_ref": "ArtifactRef", "value": ["a", "b"], "size": ref.size}


def test_remote_exception_fails_the_task_and_retries_run_again(tmp_path):
    marker = tmp_path / "attempts"
    _, tis = _run(step_features.step_errors, marker=str(marker))
    assert tis["broken"].state == "failed"
    assert tis["flaky"].state == "success" and _xcom(tis["flaky"]) == "second try ok"
    assert marker.read_text() == "xx"


def test_a_run_re_created_with_the_same_run_id_runs_its_step_again(tmp_path):
    """dag.test() with one logical date deletes and re-creates the run under the same run_id, as a
    reset metadata DB does: the new run must not re-attach to the old run's job and replay its result."""
    import datetime as dt

    marker, when = tmp_path / "runs", dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    jobs = []
    for _ in range(2):
        run = step_features.step_rerun.test(run_after=when, logical_date=when, run_conf={"marker": str(marker)})
        (ti,) = run.get_task_instances()
        jobs.append((run.run_id, _xcom(ti), _xcom(ti, key="stepops_job")["job_id"]))
        _delete_run(run.dag_id, run.run_id)
    (run_1, value_1, job_1), (run_2, value_2, job_2) = jobs
    assert run_1 == run_2 and job_1 != job_2
    assert (value_1, value_2, marker.read_text()) == (1, 2, "xx")


def _delete_run(dag_id: str, run_id: str) -> None:
    from airflow.models import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        session.delete(session.query(DagRun).filter_by(dag_id=dag_id, run_id=run_id).one())


def test_remote_errors_keep_type_message_and_traceback():
    err = rebuild_remote_error("builtins.ValueError", "bad row", "Traceback...\n  File step.py, in train\n")
    assert isinstance(err, ValueError) and isinstance(err, RemoteStepError)
    assert "ValueError: bad row" in str(err) and "in train" in str(err)
    custom = rebuild_remote_error("mylib.TrainingDiverged", "loss is nan", "tb")
    assert type(custom) is RemoteStepError and custom.remote_type == "mylib.TrainingDiverged"


def test_execution_timeout_stops_the_remote_job(tmp_path):
    from airflow_stepops.runtime.local_launcher import process_start_time

    pid_file = tmp_path / "pid"
    _, tis = _run(step_features.step_timeout, pid_file=str(pid_file))
    assert tis["slow"].state == "failed"
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 15  # SIGTERM now, SIGKILL after the grace period at the latest
    while process_start_time(pid) is not None:
        assert time.monotonic() < deadline, "remote step still running after the timeout"
        time.sleep(0.1)


def test_artifact_ref_survives_airflow_serde():
    from airflow.sdk.serde import deserialize, serialize

    ref = ArtifactRef(uri="file:///x/y.pkl", type="builtins.set", size=3, sha256="ab")
    assert deserialize(serialize(ref)) == ref


def test_unknown_connection_lists_registered_step_operators(monkeypatch):
    from airflow_stepops.connections import load_step_operator_connection

    monkeypatch.setenv("AIRFLOW_CONN_GPU_BOX", '{"conn_type": "stepops_local"}')
    with pytest.raises(StepOperatorConfigError) as info:
        load_step_operator_connection("gpu_bx")
    text = str(info.value)
    assert "step_operator 'gpu_bx': no Airflow connection with this id" in text
    assert "gpu_box (local)" in text and "local_step_operator (local)" in text


def test_connection_of_another_type_is_refused(monkeypatch):
    from airflow_stepops.connections import load_step_operator_connection

    monkeypatch.setenv("AIRFLOW_CONN_MY_S3", '{"conn_type": "aws"}')
    with pytest.raises(StepOperatorConfigError, match=r"connection type 'aws' is not a step operator; .*stepops_local"):
        load_step_operator_connection("my_s3")


def test_unknown_connection_extra_is_refused(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_TYPO", '{"conn_type": "stepops_local", "extra": {"pyhton": "/usr/bin/python3"}}')
    op = LocalStepOperator(task_id="t", python_callable=lambda: 1, step_operator="typo")
    with pytest.raises(StepOperatorConfigError, match=r"connection 'typo' \(stepops_local\) extra.pyhton: unknown field; did you mean 'python'\? allowed: .*python"):
        op.get_hook()


def test_local_operator_works_without_any_registration(monkeypatch):
    op = LocalStepOperator(task_id="t", python_callable=lambda: 1)
    assert op.step_operator == "stepops_local_default"
    assert op.get_hook().config.python is None  # built-in defaults


def test_unpicklable_xcom_argument_fails_before_submitting(tmp_path):
    import threading

    from airflow_stepops.bundle import pickle_payload

    with pytest.raises(StepOperatorConfigError, match=r"op_args\[1\] cannot be serialised by cloudpickle"):
        pickle_payload(lambda a, b: None, [1, threading.Lock()], {})


def test_on_kill_stops_the_remote_job(tmp_path):
    from airflow_stepops.hooks.base import JobState
    from airflow_stepops.settings.local import LocalStepOperatorSettings

    from .localjobs import make_hook, make_spec, wait_running

    hook = make_hook(tmp_path)
    handle = hook.submit(make_spec(hook, __import__("time").sleep, 60,
                                   settings=LocalStepOperatorSettings(cancel_grace_period_seconds=1)))
    wait_running(hook, handle)
    op = LocalStepOperator(task_id="t", python_callable=lambda: 1, deferrable=False)
    op._hook, op._handle = hook, handle  # as after submission in execute()
    op.on_kill()
    assert hook.get_status(handle).state is JobState.CANCELLED


def test_lost_track_of_a_job_stops_it(tmp_path):
    from airflow_stepops.exceptions import StepFailedError
    from airflow_stepops.hooks.base import JobState
    from airflow_stepops.settings.local import LocalStepOperatorSettings

    from .localjobs import make_hook, make_spec, wait_running, wait_terminal

    hook = make_hook(tmp_path)
    handle = hook.submit(make_spec(hook, __import__("time").sleep, 60,
                                   settings=LocalStepOperatorSettings(cancel_grace_period_seconds=1)))
    wait_running(hook, handle)
    class _TaskInstance:  # receives the job record the operator publishes
        pushed: dict = {}

        def xcom_push(self, key, value):
            self.pushed[key] = value

    op = LocalStepOperator(task_id="t", python_callable=lambda: 1)
    op._hook = hook
    ti = _TaskInstance()
    with pytest.raises(StepFailedError, match="status polling failed"):
        op.execute_complete({"ti": ti}, {"status": "error", "handle": handle,
                                         "message": "status polling failed repeatedly"})
    assert ti.pushed["stepops_job"]["job_id"] == handle["job_id"]
    assert wait_terminal(hook, handle, timeout=15).state is JobState.CANCELLED


def test_remote_builtin_errors_with_special_constructors_keep_their_text():
    err = rebuild_remote_error("builtins.UnicodeDecodeError", "'utf-8' codec can't decode", "tb")
    assert isinstance(err, RemoteStepError) and "UnicodeDecodeError" in str(err)


def test_an_older_try_being_killed_leaves_a_job_a_newer_try_adopted(tmp_path):
    from airflow_stepops.hooks.base import JobState
    from airflow_stepops.operators.base import STATE_KEY

    from .localjobs import make_hook, make_spec, wait_running

    class _Store:  # the task_state_store both tries share (it survives retries)
        def __init__(self):
            self.data = {}

        def get(self, key, default=None):
            return self.data.get(key, default)

        def set(self, key, value):
            self.data[key] = value

    hook = make_hook(tmp_path)
    handle = hook.submit(make_spec(hook, __import__("time").sleep, 30))
    wait_running(hook, handle)
    store = _Store()
    store.set(STATE_KEY, {**handle, "attached_by_try": 2})  # try 2 re-attached
    old_try = LocalStepOperator(task_id="t", python_callable=lambda: 1, deferrable=False)
    old_try._hook, old_try._handle, old_try._state_store = hook, {**handle, "attached_by_try": 1}, store
    old_try.on_kill()
    assert hook.get_status(handle).state is JobState.RUNNING
    hook.cancel(handle)


def test_a_succeeded_job_whose_output_the_backend_cannot_return_fails_with_the_backends_reason(tmp_path):
    """The backend's own word on an output it cannot return (e.g. a Kubernetes log block rotated away) is the
    task's error, not a generic "left no result"."""
    import shutil

    from airflow_stepops.artifacts import store_path
    from airflow_stepops.exceptions import StepFailedError
    from airflow_stepops.hooks.base import JobState

    from .localjobs import make_hook, make_spec, wait_terminal

    hook = make_hook(tmp_path)
    handle = hook.submit(make_spec(hook, int, "7"))
    assert wait_terminal(hook, handle, timeout=30).state is JobState.SUCCEEDED
    shutil.rmtree(store_path(handle["output_uri"]).path)  # what the backend could not bring back

    def collect_output(handle):
        raise StepFailedError("the result's log block was rotated away; use a pvc:// artifact_store")

    hook.collect_output = collect_output
    op = LocalStepOperator(task_id="t", python_callable=lambda: 1)
    op._hook = hook
    with pytest.raises(StepFailedError, match="rotated away; use a pvc://"):
        op.execute_complete({}, {"status": "succeeded", "handle": handle})


class StateStore(dict):
    """The task state store's interface (``context["task_state_store"]``), in memory."""

    def set(self, key, value, **_):
        self[key] = value

    def delete(self, key):
        self.pop(key, None)


def test_airflow_trigger_timeout_stops_the_job_and_raises_step_timeout_error(tmp_path):
    """Airflow resumes a task whose trigger timeout passed into ``__fail__`` and calls no trigger on_kill."""
    from airflow_stepops.cost import CHARGES_KEY
    from airflow_stepops.exceptions import StepTimeoutError
    from airflow_stepops.hooks.base import JobState
    from airflow_stepops.operators.base import STATE_KEY
    from airflow_stepops.settings.local import LocalStepOperatorSettings

    from .localjobs import make_hook, make_spec, wait_running, wait_terminal

    hook = make_hook(tmp_path)
    handle = hook.submit(make_spec(hook, __import__("time").sleep, 60,
                                   settings=LocalStepOperatorSettings(cancel_grace_period_seconds=1)))
    wait_running(hook, handle)
    op = LocalStepOperator(task_id="t", python_callable=lambda: 1, queue="gpu")
    op._hook = hook  # a fresh operator, as in the worker Airflow starts to fail the task: no handle in memory
    store = StateStore({STATE_KEY: {**handle, "attached_by_try": 1}})
    with pytest.raises(StepTimeoutError, match=rf"trigger timeout.*'gpu'.*job {handle['job_id']} was stopped"):
        op.resume_execution("__fail__", {"error": "Trigger timeout"}, {"task_state_store": store})
    assert wait_terminal(hook, handle, timeout=15).state is JobState.CANCELLED
    (charge,) = store[CHARGES_KEY]  # whether it ran is not known here: counted, not priced as nothing
    assert charge["job_id"] == handle["job_id"] and charge["amount"] is None, charge


def test_a_crashed_trigger_stops_the_job_and_keeps_airflows_error(tmp_path):
    from airflow.sdk.exceptions import TaskDeferralError

    from airflow_stepops.hooks.base import JobState
    from airflow_stepops.operators.base import STATE_KEY
    from airflow_stepops.settings.local import LocalStepOperatorSettings

    from .localjobs import make_hook, make_spec, wait_running, wait_terminal

    hook = make_hook(tmp_path)
    handle = hook.submit(make_spec(hook, __import__("time").sleep, 60,
                                   settings=LocalStepOperatorSettings(cancel_grace_period_seconds=1)))
    wait_running(hook, handle)
    op = LocalStepOperator(task_id="t", python_callable=lambda: 1)
    op._hook = hook
    with pytest.raises(TaskDeferralError, match="Trigger failure"):
        op.resume_execution("__fail__", {"error": "Trigger failure", "traceback": ["boom"]},
                            {"task_state_store": StateStore({STATE_KEY: handle})})
    assert wait_terminal(hook, handle, timeout=15).state is JobState.CANCELLED


def test_airflow_trigger_timeout_comes_before_the_backends_own_time_limit():
    """The backends stop a job at its execution_timeout + 60 s as a failure; Airflow's trigger timeout, whose
    resume stops it as a cancel with StepTimeoutError, must come first."""
    from types import SimpleNamespace

    from airflow_stepops.operators.base import StepOperator

    now = time.time()
    margin = StepOperator._defer_timeout(SimpleNamespace(deadline=now + 100)).total_seconds() - 100
    assert 0 < margin < 60 - 15  # minus the scheduler's default trigger_timeout_check_interval
    assert StepOperator._defer_timeout(SimpleNamespace(deadline=None)) is None
