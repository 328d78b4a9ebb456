"""The ``kubernetes`` flavor end to end through real Airflow, against the session's Kubernetes emulator.

The emulator (``k8s_emulator``, started once per session by tests/conftest.py) runs each Job's pod as
local processes; Airflow reaches it through ``k8s_step_operator`` (tests/e2e/conftest.py). The tests
read Jobs and pods straight from the emulator and what the steps wrote into files named by the run's
conf, and check:

- ``airflow dags test``: an upstream XCom into a step Job, its result into a downstream task;
- live services: the deferred wait in the triggerer with the pod's log streamed into the task log;
- a worker's task process SIGKILLed mid-step: the retry re-attaches to the one Job, which runs once;
- a deferred step marked failed through the REST API: the Job, its pod and its processes are deleted.
"""

from __future__ import annotations

import json
import signal
import time

import psutil
import pytest

from .steps import task_runner_process, terminal

pytestmark = pytest.mark.slow

NS = "steps"
K8S_STEP_OPERATOR = "k8s_step_operator"
K8S_TRIGGER = "airflow_stepops.triggers.kubernetes.KubernetesStepOperatorTrigger"
LABEL = "stepops.airflow.apache.org"
CONN_ENV = "from-k8s-connection"  # the connection's environment (tests/e2e/conftest.py)


def _jobs(k8s, dag_id: str, task_id: str) -> list[dict]:
    """Every Job of one task in the namespace (any run, any try)."""
    return k8s.list_objects("jobs", NS, f"{LABEL}/dag-id={dag_id},{LABEL}/task-id={task_id}")


def _pods(k8s, job: dict) -> list[dict]:
    return k8s.list_objects("pods", NS, f"{LABEL}/step={job['metadata']['labels'][f'{LABEL}/step']}")


def _condition(job: dict, kind: str) -> bool:
    return any(c["type"] == kind and c["status"] == "True" for c in (job.get("status") or {}).get("conditions") or [])


def _check_job_of(job: dict, run_id: str, try_number: int) -> None:
    annotations, labels = job["metadata"]["annotations"], job["metadata"]["labels"]
    assert annotations[f"{LABEL}/run-id"] == run_id, annotations
    assert labels[f"{LABEL}/try-number"] == str(try_number), labels
    assert labels["app.kubernetes.io/managed-by"] == "airflow-stepops", labels


@pytest.fixture
def k8s(airflow_env):
    if airflow_env.k8s is None:
        pytest.skip("the kubernetes extra is not installed: no k8s_step_operator in this session")
    return airflow_env.k8s


# ---------------------------------------------------------------------------------------------
# airflow dags test
# ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(420)
def test_kubernetes_step_with_dags_test(airflow_env, k8s, dags_test):
    af, dag_id, task_id = airflow_env, "stepops_e2e_k8s_pipeline", "k8s_sum_squares"
    run = dags_test(dag_id)
    run_id = run.run_id
    assert run.returncode == 0, run.output_tail()
    assert af.dag_run(dag_id, run_id)["state"] == "success", run.output_tail()
    states = {t: ti["state"] for (t, _), ti in af.task_instances(dag_id, run_id).items()}
    assert states == dict.fromkeys(["numbers", task_id, "k8s_report"], "success"), run.output_tail()

    # the step got its upstream XCom, ran with the connection's environment and the run's context ...
    result = af.xcom(dag_id, run_id, task_id)
    assert {k: v for k, v in result.items() if k != "pid"} == {"total": 50, "run_id": run_id, "env": CONN_ENV}
    # ... and the downstream task got its result
    assert af.xcom(dag_id, run_id, "k8s_report") == f"total=50 env={CONN_ENV}"

    # it really ran as one Job of the emulator, which completed
    info = af.xcom(dag_id, run_id, task_id, key="stepops_job")
    assert (info["flavor"], info["step_operator"]) == ("kubernetes", K8S_STEP_OPERATOR), info
    assert info["console_url"] == f"https://k8s.example/#/job/{NS}/{info['job_id']}", info
    (job,) = _jobs(k8s, dag_id, task_id)
    assert job["metadata"]["name"] == info["job_id"]
    _check_job_of(job, run_id, 1)
    assert _condition(job, "Complete"), job.get("status")
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.local/stepops-python:3"

    # the step's printed line reached the task log (`dags test` runs the trigger inline and logs the
    # tasks to its output), the output block the pod printed after it did not
    log = run.output
    assert "[kubernetes] e2e-k8s-step values=[3, 4, 5] total=50 flavor=kubernetes" in log, run.output_tail()
    assert "::stepops-output:" not in log, run.output_tail()


# ---------------------------------------------------------------------------------------------
# live services
# ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(480)  # includes starting the services on first use
def test_deferred_kubernetes_step_streams_logs_and_resumes(airflow_env, k8s, airflow_services):
    af, dag_id, task_id = airflow_env, "stepops_e2e_k8s_deferred", "k8s_deferred_step"
    run_id = airflow_services.trigger(dag_id, {"seconds": 4})

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

    # deferred with the kubernetes trigger, then back on a worker
    events = [row["event"] for row in af.query(
        "SELECT event FROM log WHERE dag_id = ? AND run_id = ? AND task_id = ? ORDER BY id", dag_id, run_id, task_id)]
    assert "deferred" in events and "running" in events[events.index("deferred"):], events
    assert "deferred" in seen and seen[-1] == "success", seen
    assert list(triggers.values()) == [K8S_TRIGGER], triggers
    for trigger_id in triggers:
        assert not af.query('SELECT id FROM "trigger" WHERE id = ?', trigger_id)

    # the result, computed in the pod with the connection's environment and the run's context
    assert af.xcom(dag_id, run_id, task_id) == {"answer": 42, "run_id": run_id, "env": CONN_ENV}
    info = af.xcom(dag_id, run_id, task_id, key="stepops_job")
    assert (info["flavor"], info["step_operator"]) == ("kubernetes", K8S_STEP_OPERATOR), info
    (job,) = _jobs(k8s, dag_id, task_id)
    assert job["metadata"]["name"] == info["job_id"]
    _check_job_of(job, run_id, 1)
    assert _condition(job, "Complete"), job.get("status")

    # the triggerer streamed the pod's lines into the task log, prefixed with the flavor, in order
    begin = f"[kubernetes] e2e-k8s-remote-line begin run_id={run_id}"
    end = f"[kubernetes] e2e-k8s-remote-line end env={CONN_ENV}"
    assert begin in log and end in log, log[-5000:]
    assert log.index(begin) < log.index(end)
    assert "::stepops-output:" not in log, log[-5000:]
    assert f"Step ran as kubernetes job {info['job_id']}" in log, log[-5000:]


@pytest.mark.timeout(480)
def test_worker_sigkill_then_retry_reattaches_to_the_one_job(airflow_env, k8s, airflow_services, tmp_path):
    af, dag_id, task_id = airflow_env, "stepops_e2e_k8s_reattach", "k8s_slow_step"
    marker = tmp_path / "invocations.txt"
    run_id = airflow_services.trigger(dag_id, {"marker": str(marker), "seconds": 12})

    def stored_handle() -> dict | None:
        rows = af.query("SELECT value FROM task_state_store WHERE dag_id = ? AND run_id = ? AND task_id = ? "
                        "AND map_index = -1 AND key = 'stepops_job'", dag_id, run_id, task_id)
        return json.loads(rows[0]["value"]) if rows else None

    # try 1 runs on a worker, its pod's step has started and the handle is in the task state store
    def step_started(row: dict) -> bool:
        return (row["state"] == "running" and row["try_number"] == 1 and marker.exists()
                and len(_jobs(k8s, dag_id, task_id)) == 1 and stored_handle() is not None)

    seen: list[str] = []
    running = airflow_services.watch_ti(dag_id, run_id, task_id, until=step_started, timeout=120, seen=seen)
    runner = af.wait_for(lambda: task_runner_process(running), timeout=30, message="the task runner process")
    (job,) = _jobs(k8s, dag_id, task_id)
    _check_job_of(job, run_id, 1)
    handle = stored_handle()
    assert (handle["flavor"], handle["job_id"], handle["namespace"], handle["try_number"]) == (
        "kubernetes", job["metadata"]["name"], NS, 1), handle
    step_pid = int(marker.read_text().split()[0])
    assert not af.process_gone(step_pid)

    runner.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    af.wait_for(lambda: af.process_gone(runner.pid), timeout=10, message="the task runner to die")
    assert not af.process_gone(step_pid), "the pod's step must survive its worker"

    final = airflow_services.watch_ti(dag_id, run_id, task_id, until=terminal, timeout=150, seen=seen)
    try2_log = af.task_log_text(dag_id, run_id, task_id, try_number=2)
    assert final["state"] == "success", f"states seen: {seen}\n{try2_log[-5000:]}"
    assert final["try_number"] == 2, seen
    assert time.monotonic() - killed_at < 120

    # try 1 failed and was retried; try 2 re-attached to try 1's Job instead of creating one
    history = af.ti_history(dag_id, run_id, task_id)
    assert [h["try_number"] for h in history] == [1], history
    assert history[0]["state"] in ("failed", "up_for_retry"), history
    assert f"Re-attaching to job {job['metadata']['name']} of try 1" in try2_log, try2_log[-5000:]
    assert "Submitted step" not in try2_log, try2_log[-5000:]

    # exactly one Job (try 1's, completed) with one pod, exactly one invocation of the step, its result
    jobs = _jobs(k8s, dag_id, task_id)
    assert [j["metadata"]["name"] for j in jobs] == [job["metadata"]["name"]], jobs
    assert len(k8s.list_objects("jobs", NS, f"{LABEL}/task-id={task_id}")) == 1
    _check_job_of(jobs[0], run_id, 1)
    assert _condition(jobs[0], "Complete"), jobs[0].get("status")
    assert len(_pods(k8s, jobs[0])) == 1
    assert marker.read_text().split() == [str(step_pid)]
    assert af.xcom(dag_id, run_id, task_id) == {"value": "survived-worker-kill", "pid": step_pid}
    tries = af.home / "stepops" / "artifacts" / dag_id / run_id / task_id / "-1"
    assert sorted(p.name for p in tries.iterdir()) == ["try-1"]  # try 2 wrote no bundle


@pytest.mark.timeout(480)
def test_mark_deferred_kubernetes_step_failed_deletes_the_job(airflow_env, k8s, airflow_services, tmp_path):
    af, dag_id, task_id = airflow_env, "stepops_e2e_k8s_cancel", "k8s_long_step"
    pid_file = tmp_path / "step.pid"
    # the step ignores SIGTERM: deleting its pod needs the kubelet's SIGKILL after the grace period
    run_id = airflow_services.trigger(dag_id, {"pid_file": str(pid_file), "ignore_sigterm": "yes"})

    # the trigger runs in the triggerer (claimed, and streaming the pod's log lines): a task marked
    # failed before that has no running trigger whose on_kill could delete the Job
    def trigger_running(row: dict) -> bool:
        if terminal(row):
            pytest.fail(f"the step ended before it could be marked failed: {row['state']}\n"
                        f"{af.task_log_text(dag_id, run_id, task_id)[-5000:]}")
        if row["state"] != "deferred" or row["trigger_id"] is None or not pid_file.exists():
            return False
        claimed = af.query('SELECT triggerer_id FROM "trigger" WHERE id = ?', row["trigger_id"])
        return bool(claimed and claimed[0]["triggerer_id"] is not None
                    and "[kubernetes] e2e-k8s-long-step running" in af.task_log_text(dag_id, run_id, task_id))

    seen: list[str] = []
    airflow_services.watch_ti(dag_id, run_id, task_id, seen=seen, timeout=120, until=trigger_running)
    (job,) = _jobs(k8s, dag_id, task_id)
    _check_job_of(job, run_id, 1)
    name = job["metadata"]["name"]
    (pod,) = _pods(k8s, job)
    container_pid = k8s.pids(NS, pod["metadata"]["name"])["step"]  # the pod's entry process
    step_pid = int(pid_file.read_text())  # the step itself, a child of the entry process
    assert not af.process_gone(container_pid) and not af.process_gone(step_pid)
    assert step_pid in {p.pid for p in psutil.Process(container_pid).children(recursive=True)}
    deletes_before = len(k8s.requests(method="DELETE", path=f"/namespaces/{NS}/jobs/{name}$"))

    response = airflow_services.mark_ti(dag_id, run_id, task_id, "failed")
    assert [ti["state"] for ti in response["task_instances"]] == ["failed"], response

    def job_gone() -> bool:
        return (k8s.get_object("jobs", NS, name) is None and not _pods(k8s, job)
                and af.process_gone(container_pid) and af.process_gone(step_pid))

    af.wait_for(job_gone, timeout=60, message=lambda: f"Job {name}, its pod and processes to be "
                f"deleted\n{af.task_log_text(dag_id, run_id, task_id)[-3000:]}\n{airflow_services.diagnostics(30)}")
    # deleted by the trigger's on_kill, with foreground propagation (pods first, then the Job)
    deletes = k8s.requests(method="DELETE", path=f"/namespaces/{NS}/jobs/{name}$")[deletes_before:]
    assert deletes and deletes[0]["query"].get("propagationPolicy") == "Foreground", deletes
    assert not _jobs(k8s, dag_id, task_id)

    assert af.ti(dag_id, run_id, task_id)["state"] == "failed"
    assert "Task killed while deferred: stopping remote job" in af.task_log_text(dag_id, run_id, task_id)
    assert not (af.home / "stepops" / "artifacts" / dag_id / run_id / task_id / "-1" / "try-1" / "output"
                / "result.json").exists()
