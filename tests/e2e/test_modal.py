"""The ``modal`` flavor end to end through real Airflow, against the session's Modal emulator.

The emulator (``md_emulator``, started once per session by tests/conftest.py: Modal's gRPC control plane and
blob storage in this process, function calls as local processes) is reached by Airflow's processes through
``MODAL_SERVER_URL``, ``md_step_operator`` and the modal connection ``modal_default``, which holds the
emulator's token and is kept only in the metadata DB (tests/e2e/conftest.py). The tests read apps, function
definitions, calls (state, history, task, processes), their log lines and the RPCs served straight from the
emulator, and what the steps wrote into files named by the run's conf, and check:

- ``airflow dags test``: an upstream XCom into a Modal call, its result into a downstream task;
- live services: the deferred wait in the triggerer with the call's log lines in the task log;
- a worker's task process SIGKILLed mid-step: the retry re-attaches to the one call, which runs once;
- a deferred step marked failed through the REST API: the call is cancelled (terminated) and its processes
  are gone;
- a deferred step whose modal connection is only in the metadata DB (no ``AIRFLOW_CONN_MODAL_DEFAULT``, no
  ``MODAL_TOKEN_*``): the triggerer must read it there (the regression the Vertex flavor had).
"""

from __future__ import annotations

import json
import signal
import time

import psutil
import pytest

from .steps import deferral_settled, task_runner_process, terminal

pytestmark = pytest.mark.slow

MD_STEP_OPERATOR = "md_step_operator"
MD_TRIGGER = "airflow_stepops.triggers.modal.ModalStepOperatorTrigger"
MODAL_CONN = "modal_default"  # the modal connection of md_step_operator, only in the metadata DB
ENVIRONMENT = "main"  # the Modal environment of the connections (tests/e2e/conftest.py)
APP_NAME = "stepops-e2e"  # md_step_operator's app name prefix: apps are stepops-e2e-<12 hex>
CONN_ENV = "from-md-connection"  # the connection's environment (tests/e2e/conftest.py)
CONSOLE = "https://modal.com/id/{call_id}"


def _stored_handle(af, dag_id: str, run_id: str, task_id: str) -> dict | None:
    """The job handle the operator keeps in the task state store (key ``stepops_job``)."""
    rows = af.query("SELECT value FROM task_state_store WHERE dag_id = ? AND run_id = ? AND task_id = ? "
                    "AND map_index = -1 AND key = 'stepops_job'", dag_id, run_id, task_id)
    return json.loads(rows[0]["value"]) if rows else None


def _descendants(pid: int) -> set[int]:
    return {p.pid for p in psutil.Process(pid).children(recursive=True)}


class Calls:
    """Apps, calls and served RPCs of the emulator."""

    def __init__(self, md) -> None:
        self.md = md

    def app(self, name: str) -> dict:
        (app,) = [a for a in self.md.apps if a["name"] == name and a["environment"] == ENVIRONMENT]
        return app

    def of_app(self, name: str) -> list[dict]:
        """Every call of the app's functions, oldest first."""
        app_id = self.app(name)["id"]
        return [call for call in self.md.calls if call["app_id"] == app_id]

    def requests(self, method: str, since: float, until: float | None = None) -> list[dict]:
        """The ``method`` RPCs served in [since, until]."""
        return [r for r in self.md.request_log if r["method"] == method and r["time"] >= since
                and (until is None or r["time"] <= until)]

    def check(self, call: dict, app_name: str) -> None:
        """A spawned call of ``run_step`` in the app, in the connection's environment."""
        assert call["id"].startswith("fc-") and call["function"] == "run_step", call
        assert call["environment"] == ENVIRONMENT and call["app_id"] == self.app(app_name)["id"], call
        assert call["invocation_type"] == "FUNCTION_CALL_INVOCATION_TYPE_ASYNC", call  # .spawn()


def _check_handle(info: dict, md) -> dict:
    """The ``stepops_job`` XCom: flavor, step operator, an ``fc-`` id the emulator knows, the console URL."""
    assert (info["flavor"], info["step_operator"]) == ("modal", MD_STEP_OPERATOR), info
    call_id = info["job_id"]
    assert call_id.startswith("fc-"), info
    assert info["console_url"] == CONSOLE.format(call_id=call_id), info
    return md.call(call_id)  # KeyError if the emulator never saw it


@pytest.fixture
def md(airflow_env):
    if airflow_env.md is None:
        pytest.skip("the modal client or the modal provider is not installed: no md_step_operator in this session")
    return airflow_env.md


@pytest.fixture
def calls(md):
    return Calls(md)


# ---------------------------------------------------------------------------------------------
# airflow dags test
# ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(420)
def test_modal_step_with_dags_test(airflow_env, md, calls, dags_test):
    af, dag_id, task_id = airflow_env, "stepops_e2e_md_pipeline", "md_sum_squares"
    started = time.time()
    run = dags_test(dag_id)
    ended = time.time()
    run_id = run.run_id
    assert run.returncode == 0, run.output_tail()
    assert af.dag_run(dag_id, run_id)["state"] == "success", run.output_tail()
    states = {t: ti["state"] for (t, _), ti in af.task_instances(dag_id, run_id).items()}
    assert states == dict.fromkeys(["md_numbers", task_id, "md_report"], "success"), run.output_tail()

    # exactly one call for the task: the XCom's fc- id, the one call made while `dags test` ran, the one call
    # of its app, and it succeeded on its first container
    info = af.xcom(dag_id, run_id, task_id, key="stepops_job")
    call = _check_handle(info, md)
    call_id = call["id"]
    app_name = info["app_name"]
    assert app_name.startswith(f"{APP_NAME}-") and len(app_name) == len(APP_NAME) + 13, info
    assert len(calls.requests("FunctionMap", started, ended)) == 1
    assert [c["id"] for c in calls.of_app(app_name)] == [call_id]
    calls.check(call, app_name)
    assert call["state"] == "success" and call["status"] == "GENERIC_STATUS_SUCCESS", call
    assert call["history"] == ["pending", "running", "success"] and call["attempts"] == 1, call
    assert (info["modal_status"], info["call_id"]) == ("success", call_id), info
    assert info.get("modal_task_id") in (None, call["task_id"]), info  # a poll that saw it running names its container
    assert abs(info["started_at"] - call["started_at"]) < 1, (info, call)  # when its input started, as Modal says
    # the function was deployed with the step's settings
    function = md.function(app_name, "run_step", environment=ENVIRONMENT)
    assert (function["milli_cpu"], function["memory_mb"], function["timeout_secs"]) == (1000, 512, 300), function
    assert function["gpu"] == [] and function["retries"] == 0, function  # a retry is Airflow's, as a new call

    # the step got its upstream XCom, ran in that call's container with the connection's environment and the
    # run's context; the downstream task got its result
    assert af.xcom(dag_id, run_id, task_id) == {"total": 50, "run_id": run_id, "env": CONN_ENV,
                                                "task": call["task_id"], "modal_environment": ENVIRONMENT}
    assert af.xcom(dag_id, run_id, "md_report") == f"total=50 env={CONN_ENV}"

    # the step's printed line went to the call's logs and from there into the task log (`dags test` runs the
    # trigger inline and logs the tasks to its output)
    line = f"e2e-md-step values=[3, 4, 5] total=50 flavor=modal task={call['task_id']}"
    assert line in md.logs(call_id)
    assert f"[modal] {line}" in run.output, run.output_tail()
    assert "::stepops-output:" not in run.output, run.output_tail()


# ---------------------------------------------------------------------------------------------
# live services
# ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(480)  # includes starting the services on first use
def test_deferred_modal_step_streams_logs_and_resumes(airflow_env, md, calls, airflow_services, tmp_path):
    af, dag_id, task_id = airflow_env, "stepops_e2e_md_deferred", "md_deferred_step"
    release = tmp_path / "release"  # the step prints its first line, then waits for this file
    started = time.time()
    run_id = airflow_services.trigger(dag_id, {"release": str(release)})
    begin = f"e2e-md-remote-line begin run_id={run_id}"
    end = f"e2e-md-remote-line end env={CONN_ENV}"

    seen: list[str] = []
    triggers: dict[int, str] = {}

    def record_trigger(row: dict) -> None:
        if row["state"] == "deferred" and row["trigger_id"] is not None:
            for trig in af.query('SELECT id, classpath FROM "trigger" WHERE id = ?', row["trigger_id"]):
                triggers[trig["id"]] = trig["classpath"]

    # deferred, and the triggerer streams the running call's first line into the task log
    def streaming(row: dict) -> bool:
        if terminal(row):
            pytest.fail(f"the step ended while waiting for the test: {row['state']}\n"
                        f"{af.task_log_text(dag_id, run_id, task_id)[-5000:]}")
        return (row["state"] == "deferred" and f"[modal] {begin}" in af.task_log_text(dag_id, run_id, task_id)
                and deferral_settled(airflow_services, dag_id, run_id, task_id, 1))

    airflow_services.watch_ti(dag_id, run_id, task_id, until=streaming, timeout=120, seen=seen, on_row=record_trigger)
    call_id = _stored_handle(af, dag_id, run_id, task_id)["job_id"]
    assert md.call(call_id)["state"] == "running" and md.pid(call_id) is not None
    assert f"[modal] {end}" not in af.task_log_text(dag_id, run_id, task_id)
    release.touch()

    final = airflow_services.watch_ti(dag_id, run_id, task_id, until=terminal, timeout=120, seen=seen,
                                      on_row=record_trigger)
    log = af.task_log_text(dag_id, run_id, task_id)
    assert final["state"] == "success", f"states seen: {seen}\n{log[-5000:]}"
    assert final["try_number"] == 1

    # deferred with the modal trigger, then back on a worker
    events = [row["event"] for row in af.query(
        "SELECT event FROM log WHERE dag_id = ? AND run_id = ? AND task_id = ? ORDER BY id", dag_id, run_id, task_id)]
    assert "deferred" in events and "running" in events[events.index("deferred"):], events
    assert "deferred" in seen and seen[-1] == "success", seen
    assert list(triggers.values()) == [MD_TRIGGER], triggers
    for trigger_id in triggers:
        assert not af.query('SELECT id FROM "trigger" WHERE id = ?', trigger_id)

    # the result, computed in the call's container with the connection's environment and the run's context
    assert af.xcom(dag_id, run_id, task_id) == {"answer": 42, "run_id": run_id, "env": CONN_ENV}
    info = af.xcom(dag_id, run_id, task_id, key="stepops_job")
    call = _check_handle(info, md)
    assert call["id"] == call_id
    calls.check(call, info["app_name"])
    assert call["state"] == "success" and call["attempts"] == 1, call
    assert len(calls.requests("FunctionMap", started)) == 1
    assert _stored_handle(af, dag_id, run_id, task_id) is None  # forgotten once the step succeeded

    # the triggerer read the call's log lines into the task log, prefixed with the flavor, in order, each once
    remote = md.logs(call_id)
    assert begin in remote and end in remote, remote
    assert log.index(f"[modal] {begin}") < log.index(f"[modal] {end}")
    for line in remote:
        assert log.count(f"[modal] {line}") == 1, (line, log[-5000:])
    assert "::stepops-output:" not in log, log[-5000:]
    assert f"Step ran as modal job {call_id}" in log, log[-5000:]
    # the status polls read the call's outputs and whether its input started; the log lines came from the app's logs
    methods = {r["method"] for r in md.request_log if r["time"] >= started}
    assert {"FunctionGetOutputs", "AppFetchLogs"} <= methods, sorted(methods)
    assert methods & {"FunctionCallGetInfo", "FunctionGetCallGraph"}, sorted(methods)


@pytest.mark.timeout(480)
def test_worker_sigkill_then_retry_reattaches_to_the_one_modal_call(airflow_env, md, calls, airflow_services,
                                                                    tmp_path):
    af, dag_id, task_id = airflow_env, "stepops_e2e_md_reattach", "md_slow_step"
    marker = tmp_path / "invocations.txt"
    release = tmp_path / "release"  # the step waits for this file: the retry re-attaches to a running call
    started = time.time()
    run_id = airflow_services.trigger(dag_id, {"marker": str(marker), "release": str(release)})

    # try 1 runs on a worker, its call's step has started and the handle is in the task state store
    def step_started(row: dict) -> bool:
        return (row["state"] == "running" and row["try_number"] == 1 and marker.exists()
                and _stored_handle(af, dag_id, run_id, task_id) is not None)

    seen: list[str] = []
    running = airflow_services.watch_ti(dag_id, run_id, task_id, until=step_started, timeout=120, seen=seen)
    runner = af.wait_for(lambda: task_runner_process(running), timeout=30, message="the task runner process")
    handle = _stored_handle(af, dag_id, run_id, task_id)
    call_id = handle["job_id"]
    assert call_id.startswith("fc-"), handle
    assert (handle["flavor"], handle["try_number"], handle["conn_id"], handle["environment"]) == (
        "modal", 1, MD_STEP_OPERATOR, ENVIRONMENT), handle
    app_name = handle["app_name"]
    call = md.call(call_id)
    calls.check(call, app_name)
    assert call["state"] == "running", call
    step_pid = int(marker.read_text().split()[0])
    container_pid = md.pid(call_id)  # the call's container process (group leader); the step is its descendant
    assert container_pid is not None and container_pid in md.pids
    assert step_pid in _descendants(container_pid)

    runner.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    af.wait_for(lambda: af.process_gone(runner.pid), timeout=10, message="the task runner to die")
    assert not af.process_gone(step_pid), "the call's step must survive its worker"
    assert md.call(call_id)["state"] == "running" and md.pid(call_id) == container_pid

    # try 2 finds try 1's handle in the task state store and re-attaches to the call while it still runs
    def reattached(row: dict) -> bool:
        if terminal(row):
            pytest.fail(f"the task ended before its retry re-attached: {row['state']} (states seen: {seen})\n"
                        f"{af.task_log_text(dag_id, run_id, task_id, try_number=row['try_number'])[-5000:]}")
        return (row["try_number"] == 2 and row["state"] == "running" and "Re-attaching to job"
                in af.task_log_text(dag_id, run_id, task_id, try_number=2))

    airflow_services.watch_ti(dag_id, run_id, task_id, until=reattached, timeout=120, seen=seen)
    assert md.call(call_id)["state"] == "running" and not af.process_gone(step_pid)
    release.touch()

    final = airflow_services.watch_ti(dag_id, run_id, task_id, until=terminal, timeout=120, seen=seen)
    ended = time.time()
    try2_log = af.task_log_text(dag_id, run_id, task_id, try_number=2)
    assert final["state"] == "success", f"states seen: {seen}\n{try2_log[-5000:]}"
    assert final["try_number"] == 2, seen
    assert time.monotonic() - killed_at < 120

    # try 1 failed and was retried; try 2 re-attached to try 1's call instead of spawning one
    history = af.ti_history(dag_id, run_id, task_id)
    assert [h["try_number"] for h in history] == [1], history
    assert history[0]["state"] in ("failed", "up_for_retry"), history
    assert f"Re-attaching to job {call_id} of try 1 (running)" in try2_log, try2_log[-5000:]
    assert "Submitted step" not in try2_log, try2_log[-5000:]
    assert f"Step ran as modal job {call_id}" in try2_log, try2_log[-5000:]

    # exactly one call was spawned (one FunctionMap in all, try 1's; one call of the app), it ran on one
    # container and succeeded; one invocation of the step, and its result
    assert len(calls.requests("FunctionMap", started, ended)) == 1
    assert [c["id"] for c in calls.of_app(app_name)] == [call_id]
    call = md.call(call_id)
    assert call["state"] == "success" and call["attempts"] == 1 and len(call["task_ids"]) == 1, call
    assert [line for line in md.logs(call_id) if line.startswith("e2e-md-slow-step started")] == [
        f"e2e-md-slow-step started pid={step_pid}"]
    assert marker.read_text().split("\n") == [f"{step_pid} {call['task_id']}", ""]
    assert af.xcom(dag_id, run_id, task_id) == {"value": "survived-worker-kill", "pid": step_pid}
    info = af.xcom(dag_id, run_id, task_id, key="stepops_job")
    assert _check_handle(info, md)["id"] == call_id


@pytest.mark.timeout(480)
def test_mark_deferred_modal_step_failed_cancels_the_call(airflow_env, md, calls, airflow_services, tmp_path):
    af, dag_id, task_id = airflow_env, "stepops_e2e_md_cancel", "md_long_step"
    pid_file = tmp_path / "step.pid"
    started = time.time()
    # the step ignores SIGTERM: stopping its container needs the SIGKILL
    run_id = airflow_services.trigger(dag_id, {"pid_file": str(pid_file), "ignore_sigterm": "yes"})

    # the trigger runs in the triggerer (claimed, and streaming the call's log lines): a task marked failed
    # before that has no running trigger whose on_kill could cancel the call
    def trigger_running(row: dict) -> bool:
        if terminal(row):
            pytest.fail(f"the step ended before it could be marked failed: {row['state']}\n"
                        f"{af.task_log_text(dag_id, run_id, task_id)[-5000:]}")
        if row["state"] != "deferred" or row["trigger_id"] is None or not pid_file.exists():
            return False
        claimed = af.query('SELECT triggerer_id FROM "trigger" WHERE id = ?', row["trigger_id"])
        return bool(claimed and claimed[0]["triggerer_id"] is not None
                    and "[modal] e2e-md-long-step running" in af.task_log_text(dag_id, run_id, task_id))

    seen: list[str] = []
    airflow_services.watch_ti(dag_id, run_id, task_id, seen=seen, timeout=120, until=trigger_running)
    call = _check_handle(af.xcom(dag_id, run_id, task_id, key="stepops_job"), md)  # pushed when spawned
    call_id = call["id"]
    handle = _stored_handle(af, dag_id, run_id, task_id)
    assert handle["job_id"] == call_id and handle["conn_id"] == MD_STEP_OPERATOR, handle
    calls.check(call, handle["app_name"])
    container_pid = md.pid(call_id)  # the call's container process
    step_pid = int(pid_file.read_text())  # the step itself, a descendant of it
    assert container_pid is not None
    assert step_pid in _descendants(container_pid)
    assert md.call(call_id)["state"] == "running"
    marked_at = time.time()

    response = airflow_services.mark_ti(dag_id, run_id, task_id, "failed")
    assert [ti["state"] for ti in response["task_instances"]] == ["failed"], response

    def call_cancelled() -> dict | None:
        current = md.call(call_id)
        done = (current["state"] == "terminated" and md.pid(call_id) is None
                and af.process_gone(container_pid) and af.process_gone(step_pid))
        return current if done else None

    cancelled = af.wait_for(call_cancelled, timeout=60, message=lambda: f"call {call_id} to be cancelled and its "
                            f"processes to end ({md.call(call_id)['state']})\n"
                            f"{af.task_log_text(dag_id, run_id, task_id)[-3000:]}\n{airflow_services.diagnostics(30)}")
    # cancelled by the trigger's on_kill through FunctionCallCancel (not by a timeout)
    cancels = calls.requests("FunctionCallCancel", marked_at)
    assert [r["status"] for r in cancels] == ["OK"], cancels
    assert cancelled["status"] == "GENERIC_STATUS_TERMINATED" and cancelled["history"][-1] == "terminated", cancelled
    assert f"Function call {call_id} was cancelled" in (cancelled["exception"] or ""), cancelled
    assert container_pid not in md.pids
    assert len(calls.requests("FunctionMap", started)) == 1  # one call spawned, none after the cancel

    assert af.ti(dag_id, run_id, task_id)["state"] == "failed"
    log = af.task_log_text(dag_id, run_id, task_id)
    assert f"Task killed while deferred: stopping remote job {call_id}" in log, log[-5000:]


@pytest.mark.timeout(300)
def test_deferred_modal_step_with_the_modal_connection_only_in_the_metadata_db(airflow_env, md, calls,
                                                                              airflow_services, tmp_path):
    """Regression guard: the hook builds its modal client (reading ``modal_default``, kept only in the metadata
    DB) in a thread in the triggerer, whose shared status poller and ``on_kill`` run outside a trigger's own
    ``run()``. Without the token in the environment, a failed lookup cannot fall back on ambient credentials."""
    af, dag_id, task_id = airflow_env, "stepops_e2e_md_db_conn", "md_db_conn_step"
    # modal_default is in the metadata DB only, and nothing else gives the Airflow processes a Modal token
    (conn,) = af.query("SELECT conn_type, login FROM connection WHERE conn_id = ?", MODAL_CONN)
    assert (conn["conn_type"], conn["login"]) == ("modal", md.token_id), conn
    assert f"AIRFLOW_CONN_{MODAL_CONN.upper()}" not in af.env
    assert not [k for k in af.env if k.startswith("MODAL_TOKEN")], sorted(af.env)
    assert af.env["MODAL_SERVER_URL"] == md.server_url

    release = tmp_path / "release"
    started = time.time()
    run_id = airflow_services.trigger(dag_id, {"release": str(release)})
    line = f"[modal] e2e-md-db-conn-step run_id={run_id}"
    seen: list[str] = []

    def streaming_or_over(row: dict) -> bool:  # over: e.g. its trigger failed (and the worker cancelled the call)
        return terminal(row) or (row["state"] == "deferred" and line in af.task_log_text(dag_id, run_id, task_id)
                                  and deferral_settled(airflow_services, dag_id, run_id, task_id, 1))

    airflow_services.watch_ti(dag_id, run_id, task_id, until=streaming_or_over, timeout=120, seen=seen)
    assert "isn't defined" not in af.task_log_text(dag_id, run_id, task_id)
    release.touch()
    final = airflow_services.watch_ti(dag_id, run_id, task_id, until=terminal, timeout=120, seen=seen)
    log = af.task_log_text(dag_id, run_id, task_id)
    assert "deferred" in seen, seen
    assert final["state"] == "success", f"states seen: {seen}\n{log[-5000:]}"
    for bad in ("isn't defined", "using ambient Modal credentials", "Status poll failed"):
        assert bad not in log, (bad, log[-5000:])
    assert af.xcom(dag_id, run_id, task_id) == {"run_id": run_id}
    assert line in log, log[-5000:]
    info = af.xcom(dag_id, run_id, task_id, key="stepops_job")
    call = _check_handle(info, md)
    assert call["state"] == "success", call
    # every RPC since the trigger carried the connection's token: none was refused
    refused = [r for r in md.request_log if r["time"] >= started
               and r["status"] in ("UNAUTHENTICATED", "PERMISSION_DENIED")]
    assert not refused, refused
