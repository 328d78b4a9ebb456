"""The ``azureml`` flavor end to end through real Airflow, against the session's Azure ML emulator.

The emulator (``az_emulator``, started once per session by tests/conftest.py: an HTTPS REST front for ARM,
run history and a managed identity endpoint in this process, Azurite for blobs, command jobs as local
processes) is reached by Airflow's processes through its environment (``AZUREML_DEV_URL_MFE``, the CA bundle,
``IDENTITY_ENDPOINT``/``IDENTITY_HEADER`` for DefaultAzureCredential), ``az_step_operator`` and the
``azurite_storage`` connection of its artifact store (tests/e2e/conftest.py). The tests read jobs (status,
tags, the request the flavor sent, error), their log lines, blobs and API requests straight from the
emulator, and what the steps wrote into files named by the run's conf, and check:

- ``airflow dags test``: an upstream XCom into a command job, its result into a downstream task;
- live services: the deferred wait in the triggerer with the job's ``user_logs/std_log.txt`` lines in the
  task log;
- a worker's task process SIGKILLed mid-step: the retry re-attaches to the one command job, which runs once;
- a deferred step marked failed through the REST API: the job is cancelled (``Canceled``) and its process is
  gone;
- a deferred step whose azure connection is kept only in the metadata DB (``az_db_step_operator``): the
  triggerer must be able to read it (the regression the Vertex flavor had).
"""

from __future__ import annotations

import json
import signal
import time

import psutil
import pytest

from .steps import deferral_settled, step_digest, task_runner_process, terminal

pytestmark = pytest.mark.slow

AZ_STEP_OPERATOR = "az_step_operator"
AZ_DB_STEP_OPERATOR = "az_db_step_operator"
AZ_DB_CLIENT_ID = "stepops-e2e-db-identity"  # the managed identity client id of azure_e2e_db (conftest.py)
AZ_TRIGGER = "airflow_stepops.triggers.azureml.AzureMLStepOperatorTrigger"
DATASTORE = "workspaceblobstore"
ARTIFACT_PREFIX = "e2e"  # the connection's artifact store: azureml://datastores/workspaceblobstore/paths/e2e
CONN_ENV = "from-az-connection"  # the connection's environment (tests/e2e/conftest.py)
CONN_TAGS = {"team": "e2e"}  # the connection's tags


def _tags(job: dict) -> dict[str, str]:
    return job["properties"].get("tags") or {}


def _env(job: dict) -> dict[str, str]:
    return job["properties"].get("environmentVariables") or {}


class Jobs:
    """Command jobs of the emulator, by their ``stepops-*`` tags, and the artifact store's blobs."""

    def __init__(self, az) -> None:
        self.az = az
        self.container = az.datastores[DATASTORE]

    def of_task(self, dag_id: str, task_id: str) -> list[dict]:
        """Every job of one task (any run, any try), oldest first."""
        return [job for job in self.az.jobs
                if _tags(job).get("stepops-dag") == dag_id and _tags(job).get("stepops-task") == task_id]

    def of_try(self, dag_id: str, run_id: str, task_id: str, try_number: int) -> dict | None:
        """The job of one step try, found by its identity tag."""
        digest = step_digest(dag_id, run_id, task_id, try_number)[:40]
        found = [job for job in self.az.jobs if _tags(job).get("stepops-step") == digest]
        assert len(found) <= 1, found
        return found[0] if found else None

    def check_identity(self, job: dict, dag_id: str, run_id: str, task_id: str, try_number: int) -> None:
        digest = step_digest(dag_id, run_id, task_id, try_number)
        assert job["name"].endswith(f"-t{try_number}-{digest[:10]}"), job["name"]
        tags = _tags(job)
        assert {k: v for k, v in tags.items() if k.startswith("stepops-")} == {
            "stepops-step": digest[:40], "stepops-try": str(try_number), "stepops-dag": dag_id,
            "stepops-task": task_id, "stepops-map-index": "-1", "stepops-run": run_id}, tags
        assert {k: v for k, v in tags.items() if not k.startswith("stepops-")} == CONN_TAGS, tags

    def blobs(self, dag_id: str) -> list[str]:
        """The names of every blob of one DAG in the artifact store."""
        container = self.az.blob_service_client().get_container_client(self.container)
        return [blob.name for blob in container.list_blobs(name_starts_with=f"{ARTIFACT_PREFIX}/{dag_id}/")]

    def task_prefix_entries(self, dag_id: str, task_id: str) -> set[str]:
        """What lies under the task instance's prefix in the artifact store (``try-<n>``, ...)."""
        # <prefix>/<dag>/<run>/<task>/<map index>/<entry>/...
        parts = [name.split("/") for name in self.blobs(dag_id)]
        return {p[5] for p in parts if len(p) > 6 and p[3] == task_id}

    def creates(self, since: float, name: str | None = None) -> list[dict]:
        """PUTs of jobs (create_or_update) served since ``since``."""
        return [r for r in self.az.requests if r["time"] >= since and r["method"] == "PUT" and "/jobs/" in r["path"]
                and (name is None or r["path"].endswith(f"/jobs/{name}"))]


def _check_request(job: dict, dag_id: str) -> None:
    """What the flavor asked Azure ML for, as the emulator recorded it."""
    props = job["properties"]
    assert props["jobType"] == "Command", props
    env = _env(job)
    assert env["STEPOPS_FLAVOR"] == "azureml" and env["E2E_FROM_CONN"] == CONN_ENV, env
    assert job["compute"] in (None, "", "serverless") or job["compute"].endswith("serverless"), job["compute"]
    bundle = props["inputs"]["bundle"]
    assert bundle["uri"].startswith(f"azureml://datastores/{DATASTORE}/paths/{ARTIFACT_PREFIX}/{dag_id}/"), bundle


@pytest.fixture
def az(airflow_env):
    if airflow_env.az is None:
        pytest.skip("the azure extra, adlfs or Azurite is not installed: no az_step_operator in this session")
    return airflow_env.az


@pytest.fixture
def jobs(az):
    return Jobs(az)


# ---------------------------------------------------------------------------------------------
# airflow dags test
# ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(420)
def test_azureml_step_with_dags_test(airflow_env, az, jobs, dags_test):
    af, dag_id, task_id = airflow_env, "stepops_e2e_az_pipeline", "az_sum_squares"
    run = dags_test(dag_id)
    run_id = run.run_id
    assert run.returncode == 0, run.output_tail()
    assert af.dag_run(dag_id, run_id)["state"] == "success", run.output_tail()
    states = {t: ti["state"] for (t, _), ti in af.task_instances(dag_id, run_id).items()}
    assert states == dict.fromkeys(["az_numbers", task_id, "az_report"], "success"), run.output_tail()

    # exactly one command job for the task, created for this run's try 1, which completed
    info = af.xcom(dag_id, run_id, task_id, key="stepops_job")
    assert (info["flavor"], info["step_operator"]) == ("azureml", AZ_STEP_OPERATOR), info
    (job,) = jobs.of_task(dag_id, task_id)
    job_id = job["name"]
    assert job_id == info["job_id"], info
    assert info["console_url"].startswith(f"https://ml.azure.com/runs/{job_id}?wsid=/subscriptions/"), info
    assert info["azureml_status"] == "Completed", info
    jobs.check_identity(job, dag_id, run_id, task_id, 1)
    assert job["status"] == "Completed" and not job["error"], job
    _check_request(job, dag_id)
    assert jobs.task_prefix_entries(dag_id, task_id) == {"try-1"}

    # the step got its upstream XCom, ran in that job with the connection's environment and the run's
    # context; the downstream task got its result
    assert af.xcom(dag_id, run_id, task_id) == {"total": 50, "run_id": run_id, "env": CONN_ENV, "job": job_id}
    assert af.xcom(dag_id, run_id, "az_report") == f"total=50 env={CONN_ENV}"

    # the step's printed line went to the job's std_log.txt and from there into the task log (`dags test`
    # runs the trigger inline and logs the tasks to its output)
    line = f"e2e-az-step values=[3, 4, 5] total=50 flavor=azureml job={job_id}"
    assert line in az.logs(job_id)
    assert f"[azureml] {line}" in run.output, run.output_tail()
    assert "::stepops-output:" not in run.output, run.output_tail()


# ---------------------------------------------------------------------------------------------
# live services
# ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(480)  # includes starting the services on first use
def test_deferred_azureml_step_streams_logs_and_resumes(airflow_env, az, jobs, airflow_services, tmp_path):
    af, dag_id, task_id = airflow_env, "stepops_e2e_az_deferred", "az_deferred_step"
    release = tmp_path / "release"  # the step prints its first line, then waits for this file
    run_id = airflow_services.trigger(dag_id, {"release": str(release)})
    begin = f"e2e-az-remote-line begin run_id={run_id}"
    end = f"e2e-az-remote-line end env={CONN_ENV}"

    seen: list[str] = []
    triggers: dict[int, str] = {}

    def record_trigger(row: dict) -> None:
        if row["state"] == "deferred" and row["trigger_id"] is not None:
            for trig in af.query('SELECT id, classpath FROM "trigger" WHERE id = ?', row["trigger_id"]):
                triggers[trig["id"]] = trig["classpath"]

    # deferred, and the triggerer streams the running job's first line into the task log
    def streaming(row: dict) -> bool:
        if terminal(row):
            pytest.fail(f"the step ended while waiting for the test: {row['state']}\n"
                        f"{af.task_log_text(dag_id, run_id, task_id)[-5000:]}")
        return (row["state"] == "deferred" and f"[azureml] {begin}" in af.task_log_text(dag_id, run_id, task_id)
                and deferral_settled(airflow_services, dag_id, run_id, task_id, 1))

    airflow_services.watch_ti(dag_id, run_id, task_id, until=streaming, timeout=120, seen=seen, on_row=record_trigger)
    (job,) = jobs.of_task(dag_id, task_id)
    assert az.job(job["name"])["status"] == "Running"
    assert f"[azureml] {end}" not in af.task_log_text(dag_id, run_id, task_id)
    release.touch()

    final = airflow_services.watch_ti(dag_id, run_id, task_id, until=terminal, timeout=120, seen=seen,
                                      on_row=record_trigger)
    log = af.task_log_text(dag_id, run_id, task_id)
    assert final["state"] == "success", f"states seen: {seen}\n{log[-5000:]}"
    assert final["try_number"] == 1

    # deferred with the azureml trigger, then back on a worker
    events = [row["event"] for row in af.query(
        "SELECT event FROM log WHERE dag_id = ? AND run_id = ? AND task_id = ? ORDER BY id", dag_id, run_id, task_id)]
    assert "deferred" in events and "running" in events[events.index("deferred"):], events
    assert "deferred" in seen and seen[-1] == "success", seen
    assert list(triggers.values()) == [AZ_TRIGGER], triggers
    for trigger_id in triggers:
        assert not af.query('SELECT id FROM "trigger" WHERE id = ?', trigger_id)

    # the result, computed in the job with the connection's environment and the run's context
    assert af.xcom(dag_id, run_id, task_id) == {"answer": 42, "run_id": run_id, "env": CONN_ENV}
    info = af.xcom(dag_id, run_id, task_id, key="stepops_job")
    assert (info["flavor"], info["step_operator"]) == ("azureml", AZ_STEP_OPERATOR), info
    (job,) = jobs.of_task(dag_id, task_id)
    job_id = job["name"]
    assert job_id == info["job_id"]
    jobs.check_identity(job, dag_id, run_id, task_id, 1)
    assert job["status"] == "Completed", job
    _check_request(job, dag_id)

    # the triggerer read the job's std_log.txt into the task log, prefixed with the flavor, in order
    remote = az.logs(job_id)
    assert begin in remote and end in remote, remote
    assert f"[azureml] {begin}" in log and f"[azureml] {end}" in log, log[-5000:]
    assert log.index(f"[azureml] {begin}") < log.index(f"[azureml] {end}")
    assert log.count(f"[azureml] {begin}") == 1, log[-5000:]  # each line read once
    assert "::stepops-output:" not in log, log[-5000:]
    assert f"Step ran as azureml job {job_id}" in log, log[-5000:]
    # the triggerer's status polls read the job resource (ARM), the log's SAS URL came from run history
    paths = [r["path"] for r in az.requests]
    assert any(p.endswith(f"/jobs/{job_id}") for p in paths), paths[-20:]
    assert any(job_id in p and "/history/" in p for p in paths), paths[-20:]


@pytest.mark.timeout(480)
def test_worker_sigkill_then_retry_reattaches_to_the_one_azureml_job(airflow_env, az, jobs, airflow_services,
                                                                     tmp_path):
    af, dag_id, task_id = airflow_env, "stepops_e2e_az_reattach", "az_slow_step"
    marker = tmp_path / "invocations.txt"
    release = tmp_path / "release"  # the step waits for this file: the retry re-attaches to a running job
    started = time.time()
    run_id = airflow_services.trigger(dag_id, {"marker": str(marker), "release": str(release)})

    def stored_handle() -> dict | None:
        rows = af.query("SELECT value FROM task_state_store WHERE dag_id = ? AND run_id = ? AND task_id = ? "
                        "AND map_index = -1 AND key = 'stepops_job'", dag_id, run_id, task_id)
        return json.loads(rows[0]["value"]) if rows else None

    # try 1 runs on a worker, its job's step has started and the handle is in the task state store
    def step_started(row: dict) -> bool:
        return (row["state"] == "running" and row["try_number"] == 1 and marker.exists()
                and jobs.of_try(dag_id, run_id, task_id, 1) is not None and stored_handle() is not None)

    seen: list[str] = []
    running = airflow_services.watch_ti(dag_id, run_id, task_id, until=step_started, timeout=120, seen=seen)
    runner = af.wait_for(lambda: task_runner_process(running), timeout=30, message="the task runner process")
    job_id = jobs.of_try(dag_id, run_id, task_id, 1)["name"]
    handle = stored_handle()
    assert (handle["flavor"], handle["job_id"], handle["try_number"], handle["conn_id"]) == (
        "azureml", job_id, 1, AZ_STEP_OPERATOR), handle
    step_pid = int(marker.read_text().split()[0])
    (job_pid,) = az.pids(job_id)  # the job's command (bash -c ...), its own process group; the step is in it
    assert step_pid == job_pid or step_pid in {p.pid for p in psutil.Process(job_pid).children(recursive=True)}

    runner.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    af.wait_for(lambda: af.process_gone(runner.pid), timeout=10, message="the task runner to die")
    assert not af.process_gone(step_pid), "the job's step must survive its worker"
    assert az.job(job_id)["status"] == "Running"

    # try 2 finds try 1's handle in the task state store and re-attaches to the job while it still runs
    def reattached(row: dict) -> bool:
        if terminal(row):
            pytest.fail(f"the task ended before its retry re-attached: {row['state']} (states seen: {seen})\n"
                        f"{af.task_log_text(dag_id, run_id, task_id, try_number=row['try_number'])[-5000:]}")
        return (row["try_number"] == 2 and row["state"] == "running" and "Re-attaching to job"
                in af.task_log_text(dag_id, run_id, task_id, try_number=2))

    airflow_services.watch_ti(dag_id, run_id, task_id, until=reattached, timeout=120, seen=seen)
    assert az.job(job_id)["status"] == "Running" and not af.process_gone(step_pid)
    release.touch()

    final = airflow_services.watch_ti(dag_id, run_id, task_id, until=terminal, timeout=120, seen=seen)
    try2_log = af.task_log_text(dag_id, run_id, task_id, try_number=2)
    assert final["state"] == "success", f"states seen: {seen}\n{try2_log[-5000:]}"
    assert final["try_number"] == 2, seen
    assert time.monotonic() - killed_at < 120

    # try 1 failed and was retried; try 2 re-attached to try 1's job instead of creating one
    history = af.ti_history(dag_id, run_id, task_id)
    assert [h["try_number"] for h in history] == [1], history
    assert history[0]["state"] in ("failed", "up_for_retry"), history
    assert f"Re-attaching to job {job_id} of try 1 (running)" in try2_log, try2_log[-5000:]
    assert "Submitted step" not in try2_log, try2_log[-5000:]

    # exactly one job carries this step's tags, across tries (try 1's, completed), exactly one invocation of
    # the step, and its result
    (job,) = jobs.of_task(dag_id, task_id)
    assert job["name"] == job_id and jobs.of_try(dag_id, run_id, task_id, 2) is None
    jobs.check_identity(job, dag_id, run_id, task_id, 1)
    assert job["status"] == "Completed", job
    assert [line for line in az.logs(job_id) if line.startswith("e2e-az-slow-step started")] == [
        f"e2e-az-slow-step started pid={step_pid}"]
    assert marker.read_text().split("\n") == [f"{step_pid} {job_id}", ""]
    assert af.xcom(dag_id, run_id, task_id) == {"value": "survived-worker-kill", "pid": step_pid}
    assert jobs.task_prefix_entries(dag_id, task_id) == {"try-1"}  # try 2 wrote no bundle
    creates = jobs.creates(started)
    assert [(r["path"].rsplit("/", 1)[-1], r["status"]) for r in creates] == [(job_id, 201)], creates


@pytest.mark.timeout(480)
def test_mark_deferred_azureml_step_failed_cancels_the_job(airflow_env, az, jobs, airflow_services, tmp_path):
    af, dag_id, task_id = airflow_env, "stepops_e2e_az_cancel", "az_long_step"
    pid_file = tmp_path / "step.pid"
    # the step ignores SIGTERM: cancelling its job needs the escalation to SIGKILL after the grace period
    run_id = airflow_services.trigger(dag_id, {"pid_file": str(pid_file), "ignore_sigterm": "yes"})

    # the trigger runs in the triggerer (claimed, and streaming the job's log lines): a task marked failed
    # before that has no running trigger whose on_kill could cancel the job
    def trigger_running(row: dict) -> bool:
        if terminal(row):
            pytest.fail(f"the step ended before it could be marked failed: {row['state']}\n"
                        f"{af.task_log_text(dag_id, run_id, task_id)[-5000:]}")
        if row["state"] != "deferred" or row["trigger_id"] is None or not pid_file.exists():
            return False
        claimed = af.query('SELECT triggerer_id FROM "trigger" WHERE id = ?', row["trigger_id"])
        return bool(claimed and claimed[0]["triggerer_id"] is not None
                    and "[azureml] e2e-az-long-step running" in af.task_log_text(dag_id, run_id, task_id))

    seen: list[str] = []
    airflow_services.watch_ti(dag_id, run_id, task_id, seen=seen, timeout=120, until=trigger_running)
    (job,) = jobs.of_task(dag_id, task_id)
    jobs.check_identity(job, dag_id, run_id, task_id, 1)
    job_id = job["name"]
    (job_pid,) = az.pids(job_id)  # the job's command, leader of its process group
    step_pid = int(pid_file.read_text())  # the step itself, in that group
    assert step_pid == job_pid or step_pid in {p.pid for p in psutil.Process(job_pid).children(recursive=True)}
    assert az.job(job_id)["status"] == "Running"
    marked_at = time.time()

    response = airflow_services.mark_ti(dag_id, run_id, task_id, "failed")
    assert [ti["state"] for ti in response["task_instances"]] == ["failed"], response

    def job_cancelled() -> dict | None:
        current = az.job(job_id)
        done = (current["status"] == "Canceled" and not az.pids(job_id)
                and af.process_gone(job_pid) and af.process_gone(step_pid))
        return current if done else None

    cancelled = af.wait_for(job_cancelled, timeout=60, message=lambda: f"job {job_id} to be cancelled and its "
                            f"process to end ({az.job(job_id)['status']})\n"
                            f"{af.task_log_text(dag_id, run_id, task_id)[-3000:]}\n{airflow_services.diagnostics(30)}")
    # cancelled by the trigger's on_kill through the jobs' cancel action (not by a timeout)
    cancels = [r for r in az.requests if r["time"] >= marked_at and r["path"].endswith("/cancel")]
    assert [(r["method"], r["path"].endswith(f"/jobs/{job_id}/cancel"), r["status"]) for r in cancels] == [
        ("POST", True, 202)], cancels
    assert cancelled["cancel_requested"], cancelled
    assert "CancelRequested" in [h["status"] for h in cancelled["history"]], cancelled["history"]
    assert len(jobs.of_task(dag_id, task_id)) == 1

    assert af.ti(dag_id, run_id, task_id)["state"] == "failed"
    assert "Task killed while deferred: stopping remote job" in af.task_log_text(dag_id, run_id, task_id)


@pytest.mark.timeout(300)
def test_deferred_azureml_step_with_the_azure_connection_in_the_metadata_db(airflow_env, az, jobs, airflow_services,
                                                                            tmp_path):
    """Regression guard: the hook reads its azure connection (kept only in the metadata DB) in the triggerer,
    whose shared status poller and ``on_kill`` run outside a trigger's own ``run()``."""
    af, dag_id, task_id = airflow_env, "stepops_e2e_az_db_conn", "az_db_conn_step"
    release = tmp_path / "release"
    started = time.time()
    run_id = airflow_services.trigger(dag_id, {"release": str(release)})
    line = f"[azureml] e2e-az-db-conn-step run_id={run_id}"
    seen: list[str] = []

    def streaming_or_over(row: dict) -> bool:  # over: e.g. its trigger failed (and the worker cancelled the job)
        return terminal(row) or (row["state"] == "deferred" and line in af.task_log_text(dag_id, run_id, task_id)
                                  and deferral_settled(airflow_services, dag_id, run_id, task_id, 1))

    airflow_services.watch_ti(dag_id, run_id, task_id, until=streaming_or_over, timeout=120, seen=seen)
    assert "isn't defined" not in af.task_log_text(dag_id, run_id, task_id)
    release.touch()
    final = airflow_services.watch_ti(dag_id, run_id, task_id, until=terminal, timeout=120, seen=seen)
    log = af.task_log_text(dag_id, run_id, task_id)
    assert "deferred" in seen, seen
    assert final["state"] == "success", f"states seen: {seen}\n{log[-5000:]}"
    assert "isn't defined" not in log, log[-5000:]
    (job,) = jobs.of_task(dag_id, task_id)
    assert job["status"] == "Completed", job
    assert af.xcom(dag_id, run_id, task_id) == {"run_id": run_id}
    assert line in log, log[-5000:]
    # the credentials came from the DB connection: its managed identity client id was asked for tokens
    tokens = [r for r in az.requests if r["time"] >= started and r["path"].endswith("/msi/token")]
    assert tokens and all(AZ_DB_CLIENT_ID in json.dumps(r.get("query")) for r in tokens), tokens
