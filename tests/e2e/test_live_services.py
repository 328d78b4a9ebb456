"""Step tasks under a real scheduler (LocalExecutor), dag-processor, triggerer and api-server.

- deferral: the wait happens in the triggerer, which streams the remote log lines into the task log,
  and the task resumes on a worker with the result;
- a worker's task process SIGKILLed mid-step: the retry re-attaches to the same remote job, which
  runs exactly once;
- a deferred step marked failed through the REST API: the trigger's ``on_kill`` stops the remote job.
"""

from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest

from .steps import task_runner_process, terminal

pytestmark = pytest.mark.slow


LOCAL_TRIGGER = "airflow_stepops.triggers.local.LocalStepOperatorTrigger"


@pytest.mark.timeout(480)  # includes starting the services on first use
def test_services_listen_on_loopback_only(airflow_env, airflow_services):
    pids = {proc.pid for proc in airflow_services.process_tree()}
    listening = [conn for conn in psutil.net_connections(kind="inet")
                 if conn.pid in pids and conn.status == psutil.CONN_LISTEN]
    assert airflow_env.api_port in {conn.laddr.port for conn in listening}, listening
    assert all(conn.laddr.ip in ("127.0.0.1", "::1") for conn in listening), listening


@pytest.mark.timeout(480)  # includes starting the services on first use
def test_deferred_step_resumes_on_worker_with_streamed_logs(airflow_env, airflow_services):
    af, dag_id, task_id = airflow_env, "stepops_e2e_deferred", "deferred_step"
    run_id = airflow_services.trigger(dag_id, {"seconds": 6})

    seen: list[str] = []
    triggers: dict[int, str] = {}

    def record_trigger(row: dict) -> None:
        if row["state"] == "deferred" and row["trigger_id"] is not None:
            for trig in af.query('SELECT id, classpath FROM "trigger" WHERE id = ?', row["trigger_id"]):
                triggers[trig["id"]] = trig["classpath"]

    final = airflow_services.watch_ti(dag_id, run_id, task_id, until=terminal, timeout=150, seen=seen,
                                      on_row=record_trigger)
    log = af.task_log_text(dag_id, run_id, task_id)
    assert final["state"] == "success", f"states seen: {seen}\n{log[-5000:]}"
    assert final["try_number"] == 1

    # it went through the triggerer: deferred with our trigger, then back to a worker
    events = [row["event"] for row in af.query(
        "SELECT event FROM log WHERE dag_id = ? AND run_id = ? AND task_id = ? ORDER BY id", dag_id, run_id, task_id)]
    assert "deferred" in events and "running" in events[events.index("deferred"):], events
    assert events[0] == "running" and events[-1] == "success", events
    assert "deferred" in seen, seen
    assert seen.index("deferred") < len(seen) - 1 and seen[-1] == "success", seen
    assert list(triggers.values()) == [LOCAL_TRIGGER], triggers
    for trigger_id in triggers:  # and the trigger row is gone once the step finished
        assert not af.query('SELECT id FROM "trigger" WHERE id = ?', trigger_id)

    # the result, computed remotely with the connection's environment and the run's context
    assert af.xcom(dag_id, run_id, task_id) == {"answer": 42, "run_id": run_id, "env": "from-e2e-connection"}
    job = af.xcom(dag_id, run_id, task_id, key="stepops_job")
    assert (job["flavor"], job["step_operator"]) == ("local", "e2e_step_operator")
    job_dir = af.jobs_dir / job["job_id"]
    assert json.loads((job_dir / "status.json").read_text())["state"] == "succeeded"

    # the trigger streamed the remote lines into the task's log, prefixed with the flavor
    assert f"[local] e2e-remote-line begin run_id={run_id}" in log, log[-5000:]
    assert "[local] e2e-remote-line end env=from-e2e-connection" in log, log[-5000:]
    # ... and the worker picked the task up again to finish it
    assert f"Step ran as local job {job['job_id']}" in log, log[-5000:]


@pytest.mark.timeout(480)
def test_worker_sigkill_then_retry_reattaches_to_same_remote_job(airflow_env, airflow_services, tmp_path):
    af, dag_id, task_id = airflow_env, "stepops_e2e_reattach", "slow_step"
    marker = tmp_path / "invocations.txt"
    run_id = airflow_services.trigger(dag_id, {"marker": str(marker), "seconds": 15})

    def stored_handle() -> dict | None:
        rows = af.query("SELECT value FROM task_state_store WHERE dag_id = ? AND run_id = ? AND task_id = ? "
                        "AND map_index = -1 AND key = 'stepops_job'", dag_id, run_id, task_id)
        return json.loads(rows[0]["value"]) if rows else None

    # wait until try 1 runs on a worker, its remote step has started and the job handle is in the
    # task state store (the operator stores it right after submitting)
    def step_started(row: dict) -> bool:
        return (row["state"] == "running" and row["try_number"] == 1 and marker.exists()
                and len(af.job_dirs(dag_id, run_id, task_id)) == 1 and stored_handle() is not None)

    seen: list[str] = []
    running = airflow_services.watch_ti(dag_id, run_id, task_id, until=step_started, timeout=120, seen=seen)
    runner = af.wait_for(lambda: task_runner_process(running), timeout=30, message="the task runner process")
    assert running["pid"] == runner.pid, "TI.pid should be the task runner's pid"
    step_pid = int(marker.read_text().split()[0])
    assert not af.process_gone(step_pid)
    handle = stored_handle()
    assert (handle["try_number"], handle["job_id"]) == (1, af.job_dirs(dag_id, run_id, task_id)[0].name), handle

    runner.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    af.wait_for(lambda: af.process_gone(runner.pid), timeout=10, message="the task runner to die")
    assert not af.process_gone(step_pid), "the remote step must survive its worker"

    final = airflow_services.watch_ti(dag_id, run_id, task_id, until=terminal, timeout=150, seen=seen)
    try2_log = af.task_log_text(dag_id, run_id, task_id, try_number=2)
    assert final["state"] == "success", f"states seen: {seen}\n{try2_log[-5000:]}"
    assert final["try_number"] == 2, seen
    assert time.monotonic() - killed_at < 120

    # try 1 failed and was retried. (Airflow 3.3: the supervisor sees the task runner die with -9 but
    # does not report it, as up_for_retry is normally sent by the runner itself; the scheduler then gets
    # "success" from the executor for a TI still running, treats that as a failure and retries it; no
    # heartbeat timeout is involved.) Try 2 re-attached to try 1's job instead of submitting a new one.
    history = af.ti_history(dag_id, run_id, task_id)
    assert [h["try_number"] for h in history] == [1], history
    assert history[0]["state"] in ("failed", "up_for_retry"), history
    assert "Re-attaching to job" in try2_log, try2_log[-5000:]
    assert "Submitted step" not in try2_log, try2_log[-5000:]

    # exactly one invocation of the step, whose result is the task's result
    assert marker.read_text().split() == [str(step_pid)]
    assert af.xcom(dag_id, run_id, task_id) == {"value": "survived-worker-kill", "pid": step_pid}
    # one job directory (try 1's) and one bundle (try 1's): try 2 never submitted anything
    all_job_dirs = sorted(p for p in af.jobs_dir.iterdir() if p.name.startswith("stepops_e2e_reattach-slow_step-"))
    assert len(all_job_dirs) == 1 and "-t1-" in all_job_dirs[0].name, all_job_dirs
    assert af.job_dirs(dag_id, run_id, task_id) == all_job_dirs  # and it is this run's
    assert json.loads((all_job_dirs[0] / "status.json").read_text())["state"] == "succeeded"
    assert json.loads((all_job_dirs[0] / "child.json").read_text())["pid"] == step_pid
    tries = af.home / "stepops" / "artifacts" / dag_id / run_id / task_id / "-1"
    assert sorted(p.name for p in tries.iterdir()) == ["try-1"]


@pytest.mark.timeout(480)
def test_mark_deferred_step_failed_stops_remote_job(airflow_env, airflow_services, tmp_path):
    af, dag_id, task_id = airflow_env, "stepops_e2e_cancel", "long_step"
    pid_file = tmp_path / "step.pid"
    # the step ignores SIGTERM: stopping it needs the launcher's escalation to SIGKILL
    run_id = airflow_services.trigger(dag_id, {"pid_file": str(pid_file), "ignore_sigterm": "yes"})

    # wait until the trigger runs in the triggerer (claimed, and streaming the step's log lines): a
    # task marked failed before that has no running trigger whose on_kill could stop the job
    def trigger_running(row: dict) -> bool:
        if row["state"] != "deferred" or row["trigger_id"] is None or not pid_file.exists():
            return False
        claimed = af.query('SELECT triggerer_id FROM "trigger" WHERE id = ?', row["trigger_id"])
        return bool(claimed and claimed[0]["triggerer_id"] is not None
                    and "[local] e2e-long-step running" in af.task_log_text(dag_id, run_id, task_id))

    seen: list[str] = []
    airflow_services.watch_ti(dag_id, run_id, task_id, seen=seen, timeout=120, until=trigger_running)
    step_pid = int(pid_file.read_text())
    assert not af.process_gone(step_pid)
    assert "bootstrap.py" in " ".join(psutil.Process(step_pid).cmdline())
    (job_dir,) = af.job_dirs(dag_id, run_id, task_id)
    assert not (job_dir / "status.json").exists()

    response = airflow_services.mark_ti(dag_id, run_id, task_id, "failed")
    assert [ti["state"] for ti in response["task_instances"]] == ["failed"], response

    af.wait_for(lambda: af.process_gone(step_pid), timeout=60, message=lambda: f"step pid {step_pid} to be stopped\n"
             f"{af.task_log_text(dag_id, run_id, task_id)[-3000:]}\n{airflow_services.diagnostics(30)}")
    status = af.wait_for(lambda: (job_dir / "status.json").exists() and json.loads((job_dir / "status.json").read_text()),
                      timeout=30, message="the job's status.json")
    assert status["state"] == "cancelled", status
    assert status["exit_code"] == -signal.SIGKILL, status  # SIGTERM ignored: escalated after the grace period
    launcher = json.loads((job_dir / "launcher.json").read_text())
    af.wait_for(lambda: af.process_gone(launcher["pid"]), timeout=15, message="the launcher to exit")

    assert af.ti(dag_id, run_id, task_id)["state"] == "failed"
    assert "Task killed while deferred: stopping remote job" in af.task_log_text(dag_id, run_id, task_id)
    assert not os.path.exists(af.home / "stepops" / "artifacts" / dag_id / run_id / task_id / "-1" / "try-1"
                              / "output" / "result.json")
