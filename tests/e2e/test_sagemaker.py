"""The ``sagemaker`` flavor end to end through real Airflow, against the session's SageMaker emulator.

The emulator (``sm_emulator``, started once per session by tests/conftest.py: moto's S3, SageMaker and
CloudWatch Logs in this process, training jobs as local processes) is reached by Airflow's processes
through ``aws_default`` and ``sm_step_operator`` (tests/e2e/conftest.py). The tests read training jobs
(status, tags, transitions, log streams), S3 objects and API requests straight from the emulator, and
what the steps wrote into files named by the run's conf, and check:

- ``airflow dags test``: an upstream XCom into a training job, its result into a downstream task;
- live services: the deferred wait in the triggerer with the job's CloudWatch lines in the task log;
- a worker's task process SIGKILLed mid-step: the retry re-attaches to the one job, which runs once;
- a deferred step marked failed through the REST API: StopTrainingJob, the job ends ``Stopped`` and its
  processes are gone;
- a managed spot job interrupted too close to its MaxWaitTimeInSeconds to restart (SageMaker stops it
  ``MaxWaitTimeExceeded``, the flavor reports preemption): Airflow's retry is a new job that resumes from
  the checkpoints the first one left in the task instance's shared checkpoint prefix.
"""

from __future__ import annotations

import json
import signal
import time

import psutil
import pytest

from .steps import step_digest, task_runner_process, terminal

pytestmark = pytest.mark.slow

SM_STEP_OPERATOR = "sm_step_operator"
SM_TRIGGER = "airflow_stepops.triggers.sagemaker.SageMakerStepOperatorTrigger"
BUCKET = "stepops-tests"
ARTIFACT_PREFIX = "e2e"  # the connection's artifact store: s3://stepops-tests/e2e
CONN_ENV = "from-sm-connection"  # the connection's environment (tests/e2e/conftest.py)
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/stepops-python:3"
ROLE = "arn:aws:iam::123456789012:role/stepops-tests"
SPOT_SECONDS = 12  # MaxRuntimeInSeconds == MaxWaitTimeInSeconds of the spot step (dags/e2e_sagemaker_dags.py)


def _job_of_try(sm, dag_id: str, run_id: str, task_id: str, try_number: int) -> dict | None:
    """The training job of one try, found by its deterministic name (``...-t<try>-<digest>``)."""
    suffix = f"-t{try_number}-{step_digest(dag_id, run_id, task_id, try_number)[:10]}"
    found = [job for job in sm.jobs() if job["TrainingJobName"].endswith(suffix)]
    assert len(found) <= 1, found
    return found[0] if found else None


class Jobs:
    """Training jobs of the emulator, by their ``stepops:*`` tags."""

    def __init__(self, sm) -> None:
        self.sm = sm
        self.sagemaker = sm.client("sagemaker")
        self.s3 = sm.client("s3")

    def tags(self, job: dict) -> dict[str, str]:
        listed = self.sagemaker.list_tags(ResourceArn=job["TrainingJobArn"])["Tags"]
        return {tag["Key"]: tag["Value"] for tag in listed}

    def of_task(self, dag_id: str, task_id: str) -> list[dict]:
        """Every training job of one task (any run, any try), oldest first."""
        found = []
        for job in self.sm.jobs():
            tags = self.tags(job)
            if tags.get("stepops:dag-id") == dag_id and tags.get("stepops:task-id") == task_id:
                found.append(job)
        return found

    def check_identity(self, job: dict, dag_id: str, run_id: str, task_id: str, try_number: int) -> None:
        digest = step_digest(dag_id, run_id, task_id, try_number)
        assert job["TrainingJobName"].endswith(f"-t{try_number}-{digest[:10]}"), job["TrainingJobName"]
        tags = self.tags(job)
        assert {k: v for k, v in tags.items() if k.startswith("stepops:")} == {
            "stepops:dag-id": dag_id, "stepops:run-id": run_id, "stepops:task-id": task_id,
            "stepops:map-index": "-1", "stepops:try-number": str(try_number), "stepops:step": digest[:40]}, tags

    def task_prefix_entries(self, dag_id: str, task_id: str) -> set[str]:
        """What lies under the task instance's prefix in the artifact store (``try-<n>``, ``checkpoints``)."""
        listed = self.s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{ARTIFACT_PREFIX}/{dag_id}/").get("Contents", [])
        # <prefix>/<dag>/<run>/<task>/<map index>/<entry>/...
        parts = [obj["Key"].split("/") for obj in listed]
        return {p[5] for p in parts if len(p) > 6 and p[3] == task_id}

    def read_json(self, uri: str) -> dict:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return json.loads(self.s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def _transitions(job: dict) -> list[str]:
    return [t["Status"] for t in job["SecondaryStatusTransitions"]]


def _check_request(job: dict, dag_id: str, *, spot: bool) -> None:
    """What the flavor asked SageMaker for, as the emulator recorded it."""
    assert job["AlgorithmSpecification"]["TrainingImage"] == IMAGE
    assert job["RoleArn"] == ROLE
    assert job["ResourceConfig"]["InstanceType"] == "ml.m5.large"  # the connection's default
    assert job["EnableManagedSpotTraining"] is spot
    env = job["Environment"]
    assert env["STEPOPS_FLAVOR"] == "sagemaker" and env["E2E_FROM_CONN"] == CONN_ENV, env
    assert env["STEPOPS_CHECKPOINT_DIR"] == "/opt/ml/checkpoints", env
    store = f"s3://{BUCKET}/{ARTIFACT_PREFIX}/{dag_id}/"
    assert job["OutputDataConfig"]["S3OutputPath"].startswith(store), job["OutputDataConfig"]
    assert job["CheckpointConfig"]["S3Uri"].startswith(store), job["CheckpointConfig"]
    assert [c["ChannelName"] for c in job["InputDataConfig"]] == ["bundle"], job["InputDataConfig"]


@pytest.fixture
def sm(airflow_env):
    if airflow_env.sm is None:
        pytest.skip("moto or the aws extra is not installed: no sm_step_operator in this session")
    return airflow_env.sm


@pytest.fixture
def jobs(sm):
    return Jobs(sm)


# ---------------------------------------------------------------------------------------------
# airflow dags test
# ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(420)
def test_sagemaker_step_with_dags_test(airflow_env, sm, jobs, dags_test):
    af, dag_id, task_id = airflow_env, "stepops_e2e_sm_pipeline", "sm_sum_squares"
    run = dags_test(dag_id)
    run_id = run.run_id
    assert run.returncode == 0, run.output_tail()
    assert af.dag_run(dag_id, run_id)["state"] == "success", run.output_tail()
    states = {t: ti["state"] for (t, _), ti in af.task_instances(dag_id, run_id).items()}
    assert states == dict.fromkeys(["sm_numbers", task_id, "sm_report"], "success"), run.output_tail()

    # exactly one training job for the task, created for this run's try 1, which completed
    info = af.xcom(dag_id, run_id, task_id, key="stepops_job")
    assert (info["flavor"], info["step_operator"]) == ("sagemaker", SM_STEP_OPERATOR), info
    (job,) = jobs.of_task(dag_id, task_id)
    name = job["TrainingJobName"]
    assert name == info["job_id"] and name in info["console_url"], info
    jobs.check_identity(job, dag_id, run_id, task_id, 1)
    assert (job["TrainingJobStatus"], job["SecondaryStatus"]) == ("Completed", "Completed"), job
    _check_request(job, dag_id, spot=False)
    model = job["ModelArtifacts"]["S3ModelArtifacts"]
    assert model == f"{job['OutputDataConfig']['S3OutputPath']}/{name}/output/model.tar.gz"
    bucket, _, key = model.removeprefix("s3://").partition("/")
    assert jobs.s3.head_object(Bucket=bucket, Key=key)["ContentLength"] > 0

    # the step got its upstream XCom, ran in that job with the connection's environment and the run's
    # context; the downstream task got its result
    assert af.xcom(dag_id, run_id, task_id) == {"total": 50, "run_id": run_id, "env": CONN_ENV, "job": name}
    assert af.xcom(dag_id, run_id, "sm_report") == f"total=50 env={CONN_ENV}"

    # the step's printed line went to CloudWatch Logs and from there into the task log (`dags test` runs
    # the trigger inline and logs the tasks to its output)
    line = f"e2e-sm-step values=[3, 4, 5] total=50 flavor=sagemaker job={name}"
    assert line in sm.logs(name)
    assert f"[sagemaker] {line}" in run.output, run.output_tail()
    assert "::stepops-output:" not in run.output, run.output_tail()


# ---------------------------------------------------------------------------------------------
# live services
# ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(480)  # includes starting the services on first use
def test_deferred_sagemaker_step_streams_logs_and_resumes(airflow_env, sm, jobs, airflow_services):
    af, dag_id, task_id = airflow_env, "stepops_e2e_sm_deferred", "sm_deferred_step"
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

    # deferred with the sagemaker trigger, then back on a worker
    events = [row["event"] for row in af.query(
        "SELECT event FROM log WHERE dag_id = ? AND run_id = ? AND task_id = ? ORDER BY id", dag_id, run_id, task_id)]
    assert "deferred" in events and "running" in events[events.index("deferred"):], events
    assert "deferred" in seen and seen[-1] == "success", seen
    assert list(triggers.values()) == [SM_TRIGGER], triggers
    for trigger_id in triggers:
        assert not af.query('SELECT id FROM "trigger" WHERE id = ?', trigger_id)

    # the result, computed in the training job with the connection's environment and the run's context
    assert af.xcom(dag_id, run_id, task_id) == {"answer": 42, "run_id": run_id, "env": CONN_ENV}
    info = af.xcom(dag_id, run_id, task_id, key="stepops_job")
    assert (info["flavor"], info["step_operator"]) == ("sagemaker", SM_STEP_OPERATOR), info
    (job,) = jobs.of_task(dag_id, task_id)
    assert job["TrainingJobName"] == info["job_id"]
    jobs.check_identity(job, dag_id, run_id, task_id, 1)
    assert (job["TrainingJobStatus"], job["SecondaryStatus"]) == ("Completed", "Completed"), job
    _check_request(job, dag_id, spot=False)

    # the triggerer read the job's CloudWatch stream into the task log, prefixed with the flavor, in order
    begin = f"e2e-sm-remote-line begin run_id={run_id}"
    end = f"e2e-sm-remote-line end env={CONN_ENV}"
    remote = sm.logs(info["job_id"])
    assert begin in remote and end in remote, remote
    assert f"[sagemaker] {begin}" in log and f"[sagemaker] {end}" in log, log[-5000:]
    assert log.index(f"[sagemaker] {begin}") < log.index(f"[sagemaker] {end}")
    assert "::stepops-output:" not in log, log[-5000:]
    assert f"Step ran as sagemaker job {info['job_id']}" in log, log[-5000:]


@pytest.mark.timeout(480)
def test_worker_sigkill_then_retry_reattaches_to_the_one_training_job(airflow_env, sm, jobs, airflow_services,
                                                                       tmp_path):
    af, dag_id, task_id = airflow_env, "stepops_e2e_sm_reattach", "sm_slow_step"
    marker = tmp_path / "invocations.txt"
    run_id = airflow_services.trigger(dag_id, {"marker": str(marker), "seconds": 8})

    def stored_handle() -> dict | None:
        rows = af.query("SELECT value FROM task_state_store WHERE dag_id = ? AND run_id = ? AND task_id = ? "
                        "AND map_index = -1 AND key = 'stepops_job'", dag_id, run_id, task_id)
        return json.loads(rows[0]["value"]) if rows else None

    # try 1 runs on a worker, its training job's step has started and the handle is in the task state store
    def step_started(row: dict) -> bool:
        return (row["state"] == "running" and row["try_number"] == 1 and marker.exists()
                and _job_of_try(sm, dag_id, run_id, task_id, 1) is not None and stored_handle() is not None)

    seen: list[str] = []
    running = airflow_services.watch_ti(dag_id, run_id, task_id, until=step_started, timeout=120, seen=seen)
    runner = af.wait_for(lambda: task_runner_process(running), timeout=30, message="the task runner process")
    name = _job_of_try(sm, dag_id, run_id, task_id, 1)["TrainingJobName"]
    handle = stored_handle()
    assert (handle["flavor"], handle["job_id"], handle["try_number"], handle["conn_id"]) == (
        "sagemaker", name, 1, SM_STEP_OPERATOR), handle
    step_pid = int(marker.read_text().split()[0])
    (container_pid,) = sm.pids(name)
    assert step_pid in {p.pid for p in psutil.Process(container_pid).children(recursive=True)}

    runner.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    af.wait_for(lambda: af.process_gone(runner.pid), timeout=10, message="the task runner to die")
    assert not af.process_gone(step_pid), "the training job's step must survive its worker"
    assert sm.describe(name)["TrainingJobStatus"] == "InProgress"

    final = airflow_services.watch_ti(dag_id, run_id, task_id, until=terminal, timeout=150, seen=seen)
    try2_log = af.task_log_text(dag_id, run_id, task_id, try_number=2)
    assert final["state"] == "success", f"states seen: {seen}\n{try2_log[-5000:]}"
    assert final["try_number"] == 2, seen
    assert time.monotonic() - killed_at < 120

    # try 1 failed and was retried; try 2 re-attached to try 1's job instead of creating one
    history = af.ti_history(dag_id, run_id, task_id)
    assert [h["try_number"] for h in history] == [1], history
    assert history[0]["state"] in ("failed", "up_for_retry"), history
    assert f"Re-attaching to job {name} of try 1" in try2_log, try2_log[-5000:]
    assert "Submitted step" not in try2_log, try2_log[-5000:]

    # exactly one training job for the task (try 1's, completed, never restarted), exactly one
    # invocation of the step, and its result
    (job,) = jobs.of_task(dag_id, task_id)
    assert job["TrainingJobName"] == name
    jobs.check_identity(job, dag_id, run_id, task_id, 1)
    assert (job["TrainingJobStatus"], job["SecondaryStatus"]) == ("Completed", "Completed"), job
    assert _transitions(job).count("Training") == 1 and len(sm.log_streams(name)) == 1, _transitions(job)
    assert marker.read_text().split("\n") == [f"{step_pid} {name}", ""]
    assert af.xcom(dag_id, run_id, task_id) == {"value": "survived-worker-kill", "pid": step_pid}
    assert jobs.task_prefix_entries(dag_id, task_id) == {"try-1"}  # try 2 wrote no bundle


@pytest.mark.timeout(480)
def test_mark_deferred_sagemaker_step_failed_stops_the_training_job(airflow_env, sm, jobs, airflow_services,
                                                                   tmp_path):
    af, dag_id, task_id = airflow_env, "stepops_e2e_sm_cancel", "sm_long_step"
    pid_file = tmp_path / "step.pid"
    # the step ignores SIGTERM: stopping its job needs the escalation to SIGKILL after the grace period
    run_id = airflow_services.trigger(dag_id, {"pid_file": str(pid_file), "ignore_sigterm": "yes"})

    # the trigger runs in the triggerer (claimed, and streaming the job's log lines): a task marked failed
    # before that has no running trigger whose on_kill could stop the job
    def trigger_running(row: dict) -> bool:
        if terminal(row):
            pytest.fail(f"the step ended before it could be marked failed: {row['state']}\n"
                        f"{af.task_log_text(dag_id, run_id, task_id)[-5000:]}")
        if row["state"] != "deferred" or row["trigger_id"] is None or not pid_file.exists():
            return False
        claimed = af.query('SELECT triggerer_id FROM "trigger" WHERE id = ?', row["trigger_id"])
        return bool(claimed and claimed[0]["triggerer_id"] is not None
                    and "[sagemaker] e2e-sm-long-step running" in af.task_log_text(dag_id, run_id, task_id))

    seen: list[str] = []
    airflow_services.watch_ti(dag_id, run_id, task_id, seen=seen, timeout=120, until=trigger_running)
    (job,) = jobs.of_task(dag_id, task_id)
    jobs.check_identity(job, dag_id, run_id, task_id, 1)
    name = job["TrainingJobName"]
    (container_pid,) = sm.pids(name)  # the job's entry process (pod_entry.py)
    step_pid = int(pid_file.read_text())  # the step itself, a child of the entry process
    assert step_pid in {p.pid for p in psutil.Process(container_pid).children(recursive=True)}
    assert sm.describe(name)["TrainingJobStatus"] == "InProgress"
    stops_before = len(sm.requests("sagemaker", "StopTrainingJob"))

    response = airflow_services.mark_ti(dag_id, run_id, task_id, "failed")
    assert [ti["state"] for ti in response["task_instances"]] == ["failed"], response

    def job_stopped() -> dict | None:
        described = sm.describe(name)
        done = (described["TrainingJobStatus"] == "Stopped" and not sm.pids(name)
                and af.process_gone(container_pid) and af.process_gone(step_pid))
        return described if done else None

    stopped = af.wait_for(job_stopped, timeout=60, message=lambda: f"training job {name} to stop and its processes "
                          f"to end\n{af.task_log_text(dag_id, run_id, task_id)[-3000:]}\n"
                          f"{airflow_services.diagnostics(30)}")
    # stopped by the trigger's on_kill through StopTrainingJob (not by a time limit)
    stops = sm.requests("sagemaker", "StopTrainingJob")[stops_before:]
    assert stops and stops[0]["status"] == 200, stops
    assert stopped["SecondaryStatus"] == "Stopped", stopped
    assert "Stopping" in _transitions(stopped), _transitions(stopped)
    assert len(jobs.of_task(dag_id, task_id)) == 1

    assert af.ti(dag_id, run_id, task_id)["state"] == "failed"
    assert "Task killed while deferred: stopping remote job" in af.task_log_text(dag_id, run_id, task_id)
    listed = jobs.s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{ARTIFACT_PREFIX}/{dag_id}/").get("Contents", [])
    assert not [o["Key"] for o in listed if o["Key"].endswith("/output/result.json")], listed


@pytest.mark.timeout(480)
def test_spot_interruption_then_retry_resumes_from_the_checkpoint(airflow_env, sm, jobs, airflow_services,
                                                                  tmp_path):
    af, dag_id, task_id = airflow_env, "stepops_e2e_sm_spot", "sm_spot_step"
    progress = tmp_path / "progress.txt"
    epochs, epoch_seconds = 26, 0.5  # 13 s of training: more than one job's 12 s budget
    run_id = airflow_services.trigger(dag_id, {"progress": str(progress), "epochs": epochs,
                                               "epoch_seconds": epoch_seconds})

    def noted() -> list[tuple[str, str, int]]:
        text = progress.read_text() if progress.exists() else ""
        return [(kind, job, int(n)) for kind, job, n in (line.split() for line in text.splitlines())]

    # try 1's spot job trains and checkpoints its epochs
    def first_epoch_done() -> dict | None:
        job = _job_of_try(sm, dag_id, run_id, task_id, 1)
        return job if job and any(kind == "epoch" for kind, _, _ in noted()) else None

    job1 = af.wait_for(first_epoch_done, timeout=120, message=lambda: f"try 1's first epoch\n"
                       f"{af.task_log_text(dag_id, run_id, task_id)[-3000:]}\n{airflow_services.diagnostics(25)}")
    name1 = job1["TrainingJobName"]
    assert job1["StoppingCondition"] == {"MaxRuntimeInSeconds": SPOT_SECONDS, "MaxWaitTimeInSeconds": SPOT_SECONDS}
    # interrupt the instance shortly before MaxWaitTimeInSeconds (counted from the job's creation) runs out:
    # less time left than the emulator waits before restarting an interrupted spot job (0.5 s) and the
    # job's processes need to stop, so SageMaker stops it MaxWaitTimeExceeded instead of restarting it
    strike_at = job1["CreationTime"].timestamp() + SPOT_SECONDS - 0.4
    assert time.time() < strike_at - 1, "try 1 started too late to be interrupted before its wait budget ran out"
    while time.time() < strike_at:
        time.sleep(min(0.05, max(strike_at - time.time(), 0)))
    sm.disrupt(name1, "spot_interruption")

    job1 = sm.wait_for_job(name1, timeout=30)
    assert (job1["TrainingJobStatus"], job1["SecondaryStatus"]) == ("Stopped", "MaxWaitTimeExceeded"), job1
    statuses = _transitions(job1)
    assert statuses.count("Training") == 1 and statuses[-2:] == ["Interrupted", "MaxWaitTimeExceeded"], statuses
    assert len(sm.log_streams(name1)) == 1  # one run: never restarted
    # what it had checkpointed was synced to the task instance's checkpoint prefix when it was interrupted
    checkpoint_uri = job1["CheckpointConfig"]["S3Uri"]
    saved = jobs.read_json(f"{checkpoint_uri}/progress.json")
    done_by_try1 = saved["epoch"]
    assert 1 <= done_by_try1 < epochs and saved["starts"] == [{"job": name1, "from_epoch": 0}], saved

    final = airflow_services.watch_ti(dag_id, run_id, task_id, until=terminal, timeout=180)
    try1_log = af.task_log_text(dag_id, run_id, task_id, try_number=1)
    try2_log = af.task_log_text(dag_id, run_id, task_id, try_number=2)
    assert final["state"] == "success", f"{try1_log[-3000:]}\n{try2_log[-5000:]}"
    assert final["try_number"] == 2

    # try 1 ended as a preemption and was retried ...
    history = af.ti_history(dag_id, run_id, task_id)
    assert [(h["try_number"], h["state"]) for h in history] in ([(1, "up_for_retry")], [(1, "failed")]), history
    assert f"job {name1} was preempted by sagemaker" in try1_log, try1_log[-5000:]
    assert "MaxWaitTimeInSeconds" in try1_log, try1_log[-5000:]
    # ... by a new spot job (try 2's), not by re-attaching to the stopped one
    assert "Re-attaching" not in try2_log and "Submitted step" in try2_log, try2_log[-5000:]
    task_jobs = jobs.of_task(dag_id, task_id)
    assert len(task_jobs) == 2 and task_jobs[0]["TrainingJobName"] == name1, task_jobs
    job2 = task_jobs[1]
    name2 = job2["TrainingJobName"]
    jobs.check_identity(task_jobs[0], dag_id, run_id, task_id, 1)
    jobs.check_identity(job2, dag_id, run_id, task_id, 2)
    assert (job2["TrainingJobStatus"], job2["SecondaryStatus"]) == ("Completed", "Completed"), job2
    assert _transitions(job2).count("Training") == 1 and len(sm.log_streams(name2)) == 1, _transitions(job2)
    for job in (job1, job2):
        _check_request(job, dag_id, spot=True)
    assert job2["CheckpointConfig"] == job1["CheckpointConfig"]  # one checkpoint prefix for all tries
    assert jobs.task_prefix_entries(dag_id, task_id) == {"try-1", "try-2", "checkpoints"}

    # try 2's job restored try 1's checkpoint and trained only the remaining epochs
    expected = {"epoch": epochs, "starts": [{"job": name1, "from_epoch": 0}, {"job": name2, "from_epoch": done_by_try1}]}
    assert af.xcom(dag_id, run_id, task_id) == expected
    assert jobs.read_json(f"{checkpoint_uri}/progress.json") == expected
    lines = noted()
    assert [line for line in lines if line[0] == "start"] == [("start", name1, 0), ("start", name2, done_by_try1)]
    assert [n for kind, job, n in lines if kind == "epoch" and job == name2] == list(range(done_by_try1 + 1, epochs + 1))
    # try 1's job noted each epoch once, up to the one it checkpointed (perhaps not the very last: the
    # interruption may fall between saving the checkpoint and noting it)
    try1_epochs = [n for kind, job, n in lines if kind == "epoch" and job == name1]
    assert try1_epochs == list(range(1, len(try1_epochs) + 1)), try1_epochs
    assert len(try1_epochs) in (done_by_try1 - 1, done_by_try1), (try1_epochs, done_by_try1)
    assert f"[sagemaker] e2e-sm-spot start job={name2} from_epoch={done_by_try1}" in try2_log, try2_log[-5000:]
