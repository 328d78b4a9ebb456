"""The ``vertex`` flavor end to end through real Airflow, against the session's Vertex AI emulator.

The emulator (``vx_emulator``, started once per session by tests/conftest.py: JobService, Cloud Logging
and a token endpoint in this process, fake-gcs-server for Cloud Storage, CustomJobs as local processes
with a local ``/gcs`` mount) is reached by Airflow's processes through ``google_cloud_default`` and
``vx_step_operator`` (tests/e2e/conftest.py). The tests read CustomJobs (state, labels, error, the request
the flavor sent), log entries, GCS objects and API requests straight from the emulator, and what the
steps wrote into files named by the run's conf, and check:

- ``airflow dags test``: an upstream XCom into a CustomJob, its result into a downstream task;
- live services: the deferred wait in the triggerer with the job's Cloud Logging lines in the task log;
- a worker's task process SIGKILLed mid-step: the retry re-attaches to the one CustomJob, which runs once;
- a deferred step marked failed through the REST API: the CustomJob is cancelled (JOB_STATE_CANCELLED)
  and its processes are gone;
- a Spot job preempted while it runs (Vertex fails it with a STOCKOUT, the flavor reports preemption):
  Airflow's retry is a new CustomJob that resumes from the checkpoint the first one left in
  ``STEPOPS_CHECKPOINT_DIR``, shared by all tries of the task instance;
- (expected to fail until the flavor is fixed) a deferred step whose google connection is kept only in
  the metadata DB, as ``aws_default`` is for SageMaker: the triggerer must be able to read it.
"""

from __future__ import annotations

import json
import signal
import time

import psutil
import pytest

from .steps import deferral_settled, step_digest, task_runner_process, terminal

pytestmark = pytest.mark.slow

VX_STEP_OPERATOR = "vx_step_operator"
VX_TRIGGER = "airflow_stepops.triggers.vertex.VertexStepOperatorTrigger"
BUCKET = "stepops-tests"
ARTIFACT_PREFIX = "e2e"  # the connection's artifact store: gs://stepops-tests/e2e
CONN_ENV = "from-vx-connection"  # the connection's environment (tests/e2e/conftest.py)
CONN_LABELS = {"team": "e2e"}  # the connection's labels
IMAGE = "us-docker.pkg.dev/stepops-tests/ml/python:3"
CONSOLE = "https://console.cloud.google.com/vertex-ai/locations/{location}/training/{job_id}/cpu?project={project}"


def _job_id(job: dict) -> str:
    return job["name"].rsplit("/", 1)[-1]


def _env(job: dict) -> dict[str, str]:
    pool = job["jobSpec"]["workerPoolSpecs"][0]
    return {e["name"]: e.get("value", "") for e in pool["containerSpec"].get("env", [])}


def _spot(job: dict) -> bool:
    return job["jobSpec"].get("scheduling", {}).get("strategy") == "SPOT"


class Jobs:
    """CustomJobs of the emulator, by their ``stepops-*`` labels, and the artifact store's objects."""

    def __init__(self, vx) -> None:
        self.vx = vx
        self.bucket = vx.storage_client().bucket(BUCKET)

    def of_task(self, dag_id: str, task_id: str) -> list[dict]:
        """Every CustomJob of one task (any run, any try), oldest first."""
        return [job for job in self.vx.jobs
                if job.get("labels", {}).get("stepops-dag") == dag_id
                and job.get("labels", {}).get("stepops-task") == task_id]

    def of_try(self, dag_id: str, run_id: str, task_id: str, try_number: int) -> dict | None:
        """The CustomJob of one step try, found by its identity label as the flavor's ``find_job`` does."""
        digest = step_digest(dag_id, run_id, task_id, try_number)[:40]
        found = [job for job in self.vx.jobs if job.get("labels", {}).get("stepops-step") == digest]
        assert len(found) <= 1, found
        return found[0] if found else None

    def check_identity(self, job: dict, dag_id: str, run_id: str, task_id: str, try_number: int) -> None:
        digest = step_digest(dag_id, run_id, task_id, try_number)
        assert job["displayName"].endswith(f"-t{try_number}-{digest[:10]}"), job["displayName"]
        labels = job["labels"]
        assert {k: v for k, v in labels.items() if k.startswith("stepops-")} == {
            "stepops-step": digest[:40], "stepops-try": str(try_number), "stepops-dag": dag_id,
            "stepops-task": task_id, "stepops-map-index": "n1"}, labels
        assert {k: v for k, v in labels.items() if not k.startswith("stepops-")} == CONN_LABELS, labels

    def task_prefix_entries(self, dag_id: str, task_id: str) -> set[str]:
        """What lies under the task instance's prefix in the artifact store (``try-<n>``, ``checkpoints``)."""
        # <prefix>/<dag>/<run>/<task>/<map index>/<entry>/...
        parts = [name.split("/") for name in self.objects(dag_id)]
        return {p[5] for p in parts if len(p) > 6 and p[3] == task_id}

    def objects(self, dag_id: str) -> list[str]:
        """The names of every object of one DAG in the artifact store."""
        return [blob.name for blob in self.bucket.client.list_blobs(BUCKET, prefix=f"{ARTIFACT_PREFIX}/{dag_id}/")]

    def read_mounted_json(self, path: str) -> dict:
        """A JSON object by the ``/gcs/<bucket>/<key>`` path a job saw it under."""
        bucket, _, key = path.removeprefix("/gcs/").partition("/")
        assert bucket == BUCKET, path
        return json.loads(self.bucket.blob(key).download_as_bytes())


def _check_request(job: dict, dag_id: str, *, spot: bool) -> None:
    """What the flavor asked Vertex AI for, as the emulator recorded it."""
    pool = job["jobSpec"]["workerPoolSpecs"][0]
    assert pool["containerSpec"]["imageUri"] == IMAGE
    assert pool["machineSpec"] == {"machineType": "n1-standard-4"}, pool  # no resources asked: the default
    assert _spot(job) is spot, job["jobSpec"].get("scheduling")
    env = _env(job)
    assert env["STEPOPS_FLAVOR"] == "vertex" and env["E2E_FROM_CONN"] == CONN_ENV, env
    mounted = f"/gcs/{BUCKET}/{ARTIFACT_PREFIX}/{dag_id}/"
    for name in ("STEPOPS_BUNDLE_PATH", "STEPOPS_OUTPUT_PATH", "STEPOPS_CHECKPOINT_DIR"):
        assert env[name].startswith(mounted), (name, env)
    assert env["STEPOPS_CHECKPOINT_DIR"].endswith("/-1/checkpoints"), env
    assert pool["containerSpec"]["command"] == ["python3", f"{env['STEPOPS_BUNDLE_PATH']}/pod_entry.py"], pool


@pytest.fixture
def vx(airflow_env):
    if airflow_env.vx is None:
        pytest.skip("the gcp extra or fake-gcs-server is not installed: no vx_step_operator in this session")
    return airflow_env.vx


@pytest.fixture
def jobs(vx):
    return Jobs(vx)


# ---------------------------------------------------------------------------------------------
# airflow dags test
# ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(420)
def test_vertex_step_with_dags_test(airflow_env, vx, jobs, dags_test):
    af, dag_id, task_id = airflow_env, "stepops_e2e_vx_pipeline", "vx_sum_squares"
    run = dags_test(dag_id)
    run_id = run.run_id
    assert run.returncode == 0, run.output_tail()
    assert af.dag_run(dag_id, run_id)["state"] == "success", run.output_tail()
    states = {t: ti["state"] for (t, _), ti in af.task_instances(dag_id, run_id).items()}
    assert states == dict.fromkeys(["vx_numbers", task_id, "vx_report"], "success"), run.output_tail()

    # exactly one CustomJob for the task, created for this run's try 1, which succeeded
    info = af.xcom(dag_id, run_id, task_id, key="stepops_job")
    assert (info["flavor"], info["step_operator"]) == ("vertex", VX_STEP_OPERATOR), info
    (job,) = jobs.of_task(dag_id, task_id)
    job_id = _job_id(job)
    assert job_id == info["job_id"], info
    assert info["console_url"] == CONSOLE.format(location=vx.location, job_id=job_id, project=vx.project), info
    assert info["vertex_state"] == "JOB_STATE_SUCCEEDED" and info["machine_type"] == "n1-standard-4", info
    assert job["name"] == f"projects/{vx.project_number}/locations/{vx.location}/customJobs/{job_id}"
    jobs.check_identity(job, dag_id, run_id, task_id, 1)
    assert job["state"] == "JOB_STATE_SUCCEEDED" and "error" not in job, job
    _check_request(job, dag_id, spot=False)
    assert jobs.task_prefix_entries(dag_id, task_id) == {"try-1"}
    output = _env(job)["STEPOPS_OUTPUT_PATH"].removeprefix(f"/gcs/{BUCKET}/")
    assert [name for name in jobs.objects(dag_id) if name.startswith(output + "/")], jobs.objects(dag_id)

    # the step got its upstream XCom, ran in that job with the connection's environment and the run's
    # context; the downstream task got its result
    assert af.xcom(dag_id, run_id, task_id) == {"total": 50, "run_id": run_id, "env": CONN_ENV, "job": job_id}
    assert af.xcom(dag_id, run_id, "vx_report") == f"total=50 env={CONN_ENV}"

    # the step's printed line went to Cloud Logging and from there into the task log (`dags test` runs the
    # trigger inline and logs the tasks to its output)
    line = f"e2e-vx-step values=[3, 4, 5] total=50 flavor=vertex job={job_id}"
    assert line in vx.logs(job_id)
    assert f"[vertex] {line}" in run.output, run.output_tail()
    assert "::stepops-output:" not in run.output, run.output_tail()


# ---------------------------------------------------------------------------------------------
# live services
# ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(480)  # includes starting the services on first use
def test_deferred_vertex_step_streams_logs_and_resumes(airflow_env, vx, jobs, airflow_services, tmp_path):
    af, dag_id, task_id = airflow_env, "stepops_e2e_vx_deferred", "vx_deferred_step"
    release = tmp_path / "release"  # the step prints its first line, then waits for this file
    run_id = airflow_services.trigger(dag_id, {"release": str(release)})
    begin = f"e2e-vx-remote-line begin run_id={run_id}"
    end = f"e2e-vx-remote-line end env={CONN_ENV}"

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
        return (row["state"] == "deferred" and f"[vertex] {begin}" in af.task_log_text(dag_id, run_id, task_id)
                and deferral_settled(airflow_services, dag_id, run_id, task_id, 1))

    airflow_services.watch_ti(dag_id, run_id, task_id, until=streaming, timeout=120, seen=seen, on_row=record_trigger)
    (job,) = jobs.of_task(dag_id, task_id)
    assert vx.job(_job_id(job))["state"] == "JOB_STATE_RUNNING"
    assert f"[vertex] {end}" not in af.task_log_text(dag_id, run_id, task_id)
    release.touch()

    final = airflow_services.watch_ti(dag_id, run_id, task_id, until=terminal, timeout=120, seen=seen,
                                      on_row=record_trigger)
    log = af.task_log_text(dag_id, run_id, task_id)
    assert final["state"] == "success", f"states seen: {seen}\n{log[-5000:]}"
    assert final["try_number"] == 1

    # deferred with the vertex trigger, then back on a worker
    events = [row["event"] for row in af.query(
        "SELECT event FROM log WHERE dag_id = ? AND run_id = ? AND task_id = ? ORDER BY id", dag_id, run_id, task_id)]
    assert "deferred" in events and "running" in events[events.index("deferred"):], events
    assert "deferred" in seen and seen[-1] == "success", seen
    assert list(triggers.values()) == [VX_TRIGGER], triggers
    for trigger_id in triggers:
        assert not af.query('SELECT id FROM "trigger" WHERE id = ?', trigger_id)

    # the result, computed in the CustomJob with the connection's environment and the run's context
    assert af.xcom(dag_id, run_id, task_id) == {"answer": 42, "run_id": run_id, "env": CONN_ENV}
    info = af.xcom(dag_id, run_id, task_id, key="stepops_job")
    assert (info["flavor"], info["step_operator"]) == ("vertex", VX_STEP_OPERATOR), info
    (job,) = jobs.of_task(dag_id, task_id)
    job_id = _job_id(job)
    assert job_id == info["job_id"]
    jobs.check_identity(job, dag_id, run_id, task_id, 1)
    assert job["state"] == "JOB_STATE_SUCCEEDED", job
    _check_request(job, dag_id, spot=False)

    # the triggerer read the job's Cloud Logging entries into the task log, prefixed with the flavor, in order
    remote = vx.logs(job_id)
    assert begin in remote and end in remote, remote
    assert f"[vertex] {begin}" in log and f"[vertex] {end}" in log, log[-5000:]
    assert log.index(f"[vertex] {begin}") < log.index(f"[vertex] {end}")
    assert log.count(f"[vertex] {begin}") == 1, log[-5000:]  # each entry read once
    assert "::stepops-output:" not in log, log[-5000:]
    assert f"Step ran as vertex job {job_id}" in log, log[-5000:]
    # the triggerer's status polls went through the JobService REST API, the log reads through entries:list
    paths = [r["path"] for r in vx.requests]
    assert any(p.endswith(f"/customJobs/{job_id}") for p in paths) and any(p.endswith("entries:list") for p in paths)


@pytest.mark.timeout(480)
def test_worker_sigkill_then_retry_reattaches_to_the_one_custom_job(airflow_env, vx, jobs, airflow_services,
                                                                     tmp_path):
    af, dag_id, task_id = airflow_env, "stepops_e2e_vx_reattach", "vx_slow_step"
    marker = tmp_path / "invocations.txt"
    release = tmp_path / "release"  # the step waits for this file: the retry re-attaches to a running job
    started = time.time()
    run_id = airflow_services.trigger(dag_id, {"marker": str(marker), "release": str(release)})

    def stored_handle() -> dict | None:
        rows = af.query("SELECT value FROM task_state_store WHERE dag_id = ? AND run_id = ? AND task_id = ? "
                        "AND map_index = -1 AND key = 'stepops_job'", dag_id, run_id, task_id)
        return json.loads(rows[0]["value"]) if rows else None

    # try 1 runs on a worker, its CustomJob's step has started and the handle is in the task state store
    def step_started(row: dict) -> bool:
        return (row["state"] == "running" and row["try_number"] == 1 and marker.exists()
                and jobs.of_try(dag_id, run_id, task_id, 1) is not None and stored_handle() is not None)

    seen: list[str] = []
    running = airflow_services.watch_ti(dag_id, run_id, task_id, until=step_started, timeout=120, seen=seen)
    runner = af.wait_for(lambda: task_runner_process(running), timeout=30, message="the task runner process")
    job_id = _job_id(jobs.of_try(dag_id, run_id, task_id, 1))
    handle = stored_handle()
    assert (handle["flavor"], handle["job_id"], handle["try_number"], handle["conn_id"]) == (
        "vertex", job_id, 1, VX_STEP_OPERATOR), handle
    step_pid = int(marker.read_text().split()[0])
    container_pid = vx.pid(job_id)  # the job's entry process (pod_entry.py); the step is its child
    assert container_pid is not None and container_pid in vx.pids
    assert step_pid in {p.pid for p in psutil.Process(container_pid).children(recursive=True)}

    runner.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    af.wait_for(lambda: af.process_gone(runner.pid), timeout=10, message="the task runner to die")
    assert not af.process_gone(step_pid), "the CustomJob's step must survive its worker"
    assert vx.job(job_id)["state"] == "JOB_STATE_RUNNING"

    # try 2 finds try 1's handle in the task state store and re-attaches to the job while it still runs
    def reattached(row: dict) -> bool:
        if terminal(row):
            pytest.fail(f"the task ended before its retry re-attached: {row['state']} (states seen: {seen})\n"
                        f"{af.task_log_text(dag_id, run_id, task_id, try_number=row['try_number'])[-5000:]}")
        return (row["try_number"] == 2 and row["state"] == "running" and "Re-attaching to job"
                in af.task_log_text(dag_id, run_id, task_id, try_number=2))

    airflow_services.watch_ti(dag_id, run_id, task_id, until=reattached, timeout=120, seen=seen)
    assert vx.job(job_id)["state"] == "JOB_STATE_RUNNING" and not af.process_gone(step_pid)
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

    # exactly one CustomJob carries this step's labels, across tries (try 1's, succeeded), exactly one
    # invocation of the step, and its result
    (job,) = jobs.of_task(dag_id, task_id)
    assert _job_id(job) == job_id and jobs.of_try(dag_id, run_id, task_id, 2) is None
    jobs.check_identity(job, dag_id, run_id, task_id, 1)
    assert job["state"] == "JOB_STATE_SUCCEEDED", job
    assert [line for line in vx.logs(job_id) if line.startswith("e2e-vx-slow-step started")] == [
        f"e2e-vx-slow-step started pid={step_pid}"]
    assert marker.read_text().split("\n") == [f"{step_pid} {job_id}", ""]
    assert af.xcom(dag_id, run_id, task_id) == {"value": "survived-worker-kill", "pid": step_pid}
    assert jobs.task_prefix_entries(dag_id, task_id) == {"try-1"}  # try 2 wrote no bundle
    creates = [r for r in vx.requests if r["time"] >= started and r["method"] == "POST"
               and r["path"].endswith("/customJobs")]
    assert [r["status"] for r in creates] == [200], creates  # one create call in all, try 1's


@pytest.mark.timeout(480)
def test_mark_deferred_vertex_step_failed_cancels_the_custom_job(airflow_env, vx, jobs, airflow_services, tmp_path):
    af, dag_id, task_id = airflow_env, "stepops_e2e_vx_cancel", "vx_long_step"
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
                    and "[vertex] e2e-vx-long-step running" in af.task_log_text(dag_id, run_id, task_id))

    seen: list[str] = []
    airflow_services.watch_ti(dag_id, run_id, task_id, seen=seen, timeout=120, until=trigger_running)
    (job,) = jobs.of_task(dag_id, task_id)
    jobs.check_identity(job, dag_id, run_id, task_id, 1)
    job_id = _job_id(job)
    container_pid = vx.pid(job_id)  # the job's entry process (pod_entry.py)
    step_pid = int(pid_file.read_text())  # the step itself, a child of the entry process
    assert container_pid is not None
    assert step_pid in {p.pid for p in psutil.Process(container_pid).children(recursive=True)}
    assert vx.job(job_id)["state"] == "JOB_STATE_RUNNING"
    marked_at = time.time()

    response = airflow_services.mark_ti(dag_id, run_id, task_id, "failed")
    assert [ti["state"] for ti in response["task_instances"]] == ["failed"], response

    def job_cancelled() -> dict | None:
        current = vx.job(job_id)
        done = (current["state"] == "JOB_STATE_CANCELLED" and vx.pid(job_id) is None
                and af.process_gone(container_pid) and af.process_gone(step_pid))
        return current if done else None

    cancelled = af.wait_for(job_cancelled, timeout=60, message=lambda: f"CustomJob {job_id} to be cancelled and its "
                            f"processes to end ({vx.job(job_id)['state']})\n"
                            f"{af.task_log_text(dag_id, run_id, task_id)[-3000:]}\n{airflow_services.diagnostics(30)}")
    # cancelled by the trigger's on_kill through CancelCustomJob (not by a timeout)
    cancels = [r for r in vx.requests if r["time"] >= marked_at and r["path"].endswith(":cancel")]
    assert [(r["method"], r["path"].endswith(f"/{job['name']}:cancel"), r["status"]) for r in cancels] == [
        ("POST", True, 200)], cancels
    assert cancelled["error"] == {"code": 1, "message": "CANCELED"}, cancelled
    assert container_pid not in vx.pids
    assert len(jobs.of_task(dag_id, task_id)) == 1

    assert af.ti(dag_id, run_id, task_id)["state"] == "failed"
    assert "Task killed while deferred: stopping remote job" in af.task_log_text(dag_id, run_id, task_id)
    output = _env(job)["STEPOPS_OUTPUT_PATH"].removeprefix(f"/gcs/{BUCKET}/")
    assert not [name for name in jobs.objects(dag_id) if name.startswith(output + "/")], jobs.objects(dag_id)


@pytest.mark.timeout(480)
def test_spot_preemption_then_retry_resumes_from_the_checkpoint(airflow_env, vx, jobs, airflow_services, tmp_path):
    af, dag_id, task_id = airflow_env, "stepops_e2e_vx_spot", "vx_spot_step"
    progress = tmp_path / "progress.txt"
    # try 1's job waits for <gate>/hold (never made) after epoch `hold_after`: it is preempted there; try 2's
    # waits for <gate>/resume before training
    gate = tmp_path / "gate"
    gate.mkdir()
    epochs, epoch_seconds, hold_after = 6, 0.2, 2
    run_id = airflow_services.trigger(dag_id, {"progress": str(progress), "epochs": epochs, "gate": str(gate),
                                               "epoch_seconds": epoch_seconds, "hold_after": hold_after})

    def noted() -> list[tuple[str, str, int]]:
        text = progress.read_text() if progress.exists() else ""
        return [(kind, job, int(n)) for kind, job, n in (line.split() for line in text.splitlines())]

    def waiting(try_number: int, line: tuple[str, int]) -> dict | None:
        """The try's job, once its step noted ``line`` and the task is settled in deferral."""
        job = jobs.of_try(dag_id, run_id, task_id, try_number)
        row = af.ti(dag_id, run_id, task_id)
        return job if (job and (line[0], _job_id(job), line[1]) in noted() and row["state"] == "deferred"
                       and row["try_number"] == try_number
                       and deferral_settled(airflow_services, dag_id, run_id, task_id, try_number)) else None

    # try 1's Spot job trains and checkpoints its epochs up to `hold_after`
    job1 = af.wait_for(lambda: waiting(1, ("epoch", hold_after)), timeout=120, message=lambda: f"try 1's epoch "
                       f"{hold_after}\n{af.task_log_text(dag_id, run_id, task_id)[-3000:]}\n"
                       f"{airflow_services.diagnostics(25)}")
    id1 = _job_id(job1)
    assert vx.job(id1)["state"] == "JOB_STATE_RUNNING"
    # Vertex reclaims the Spot VM: the step gets SIGTERM (SIGKILL after the grace period), what it wrote
    # under /gcs is uploaded, and the job fails with a STOCKOUT
    vx.inject("preemption", job=id1)
    job1 = af.wait_for(lambda: (current := vx.job(id1))["state"] in ("JOB_STATE_FAILED", "JOB_STATE_SUCCEEDED")
                       and current, timeout=30, message=f"CustomJob {id1} to end")
    assert job1["state"] == "JOB_STATE_FAILED" and job1["error"]["code"] == 8, job1  # RESOURCE_EXHAUSTED
    assert "preempted" in job1["error"]["message"], job1
    # what it had checkpointed went to the task instance's checkpoint directory in the bucket
    checkpoint_dir = _env(job1)["STEPOPS_CHECKPOINT_DIR"]
    saved = jobs.read_mounted_json(f"{checkpoint_dir}/progress.json")
    done_by_try1 = saved["epoch"]
    assert saved == {"epoch": hold_after, "starts": [{"job": id1, "from_epoch": 0}]}, saved

    # try 2's job restores the checkpoint and waits to train
    job2 = af.wait_for(lambda: waiting(2, ("start", hold_after)), timeout=120, message=lambda: f"try 2's start\n"
                       f"{af.task_log_text(dag_id, run_id, task_id, try_number=2)[-3000:]}\n"
                       f"{airflow_services.diagnostics(25)}")
    (gate / "resume").touch()

    final = airflow_services.watch_ti(dag_id, run_id, task_id, until=terminal, timeout=180)
    try1_log = af.task_log_text(dag_id, run_id, task_id, try_number=1)
    try2_log = af.task_log_text(dag_id, run_id, task_id, try_number=2)
    assert final["state"] == "success", f"{try1_log[-3000:]}\n{try2_log[-5000:]}"
    assert final["try_number"] == 2

    # try 1 ended as a preemption and was retried ...
    history = af.ti_history(dag_id, run_id, task_id)
    assert [(h["try_number"], h["state"]) for h in history] in ([(1, "up_for_retry")], [(1, "failed")]), history
    assert f"job {id1} was preempted by vertex" in try1_log, try1_log[-5000:]
    assert "the Spot VM was reclaimed" in try1_log, try1_log[-5000:]
    # ... by a new Spot job (try 2's), not by re-attaching to the failed one
    assert "Re-attaching" not in try2_log and "Submitted step" in try2_log, try2_log[-5000:]
    task_jobs = jobs.of_task(dag_id, task_id)
    assert len(task_jobs) == 2 and _job_id(task_jobs[0]) == id1, task_jobs
    assert _job_id(task_jobs[1]) == _job_id(job2)
    job2 = task_jobs[1]
    id2 = _job_id(job2)
    jobs.check_identity(task_jobs[0], dag_id, run_id, task_id, 1)
    jobs.check_identity(job2, dag_id, run_id, task_id, 2)
    assert job2["state"] == "JOB_STATE_SUCCEEDED" and "error" not in job2, job2
    for job in (job1, job2):
        _check_request(job, dag_id, spot=True)
    assert _env(job2)["STEPOPS_CHECKPOINT_DIR"] == checkpoint_dir  # one checkpoint directory for all tries
    assert _env(job2)["STEPOPS_OUTPUT_PATH"] != _env(job1)["STEPOPS_OUTPUT_PATH"]
    assert jobs.task_prefix_entries(dag_id, task_id) == {"try-1", "try-2", "checkpoints"}

    # try 2's job restored try 1's checkpoint and trained only the remaining epochs
    expected = {"epoch": epochs, "starts": [{"job": id1, "from_epoch": 0}, {"job": id2, "from_epoch": done_by_try1}]}
    assert af.xcom(dag_id, run_id, task_id) == expected
    assert jobs.read_mounted_json(f"{checkpoint_dir}/progress.json") == expected
    lines = noted()
    assert [line for line in lines if line[0] == "start"] == [("start", id1, 0), ("start", id2, done_by_try1)]
    assert [n for kind, job, n in lines if kind == "epoch" and job == id2] == list(range(done_by_try1 + 1, epochs + 1))
    # try 1's job noted each epoch it checkpointed, once
    assert [n for kind, job, n in lines if kind == "epoch" and job == id1] == list(range(1, hold_after + 1)), lines
    assert f"[vertex] e2e-vx-spot start job={id2} from_epoch={done_by_try1}" in try2_log, try2_log[-5000:]


@pytest.mark.timeout(300)
def test_deferred_vertex_step_with_the_google_connection_in_the_metadata_db(airflow_env, vx, jobs, airflow_services,
                                                                            tmp_path):
    """Regression: the hook reads its google connection in a thread in the triggerer (its shared status
    poller and ``on_kill`` run outside a trigger's own ``run()``, where a DB lookup fails)."""
    af, dag_id, task_id = airflow_env, "stepops_e2e_vx_db_conn", "vx_db_conn_step"
    release = tmp_path / "release"
    run_id = airflow_services.trigger(dag_id, {"release": str(release)})
    line = f"[vertex] e2e-vx-db-conn-step run_id={run_id}"
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
    (job,) = jobs.of_task(dag_id, task_id)
    assert job["state"] == "JOB_STATE_SUCCEEDED", job
    assert af.xcom(dag_id, run_id, task_id) == {"run_id": run_id}
    assert line in log, log[-5000:]
