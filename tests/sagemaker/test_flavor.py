"""The sagemaker flavor against the emulator: boto3 and aiobotocore, real training-job processes."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("moto")

from airflow_stepops.artifacts import store_path
from airflow_stepops.bundle import read_outcome
from airflow_stepops.resources import ResourceSettings
from airflow_stepops.runtime.protocol import FAILURE_MARKER
from airflow_stepops.settings.sagemaker import SageMakerStepOperatorSettings

from ..flavorjobs import hook_maker, make_spec, poll_together, run_trigger
from ..steps import greet, print_lines, raise_value_error, sleep_then_return

make_hook = hook_maker("sagemaker")

pytestmark = pytest.mark.usefixtures("sm_emulator")


def test_step_runs_as_a_training_job_with_logs_and_result(sm_emulator):
    hook = make_hook()
    handle = hook.submit(make_spec(hook, greet, "ada", task_id="greet",
                                   resources=ResourceSettings(cpu_count=2, memory="4GiB")))
    event = run_trigger(hook, handle)
    assert event["status"] == "succeeded", event
    assert "hello ada from sagemaker" in event["log_tail"]
    assert read_outcome(store_path(handle["output_uri"])).value["greeting"] == "hi ada"
    job = sm_emulator.describe(handle["job_id"])
    assert job["ResourceConfig"]["InstanceType"] == "ml.m5.large"  # the connection's default
    assert hook.console_url(handle).endswith(f"#/jobs/{handle['job_id']}")


def test_mark_failed_while_a_log_client_is_being_made_still_stops_the_job(sm_emulator, monkeypatch):
    """Airflow's triggerer calls on_kill only for a cancellation carrying its user-action message; the AWS hook
    makes its clients through asgiref's sync_to_async, which re-raises a bare CancelledError. Cancelled there,
    as Airflow's own trigger runner cancels on mark-failed, the trigger must still stop the job."""
    import asyncio
    import threading

    from airflow.jobs.triggerer_job_runner import TriggerRunner
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

    from airflow_stepops.triggers.sagemaker import SageMakerStepOperatorTrigger

    hook = make_hook()
    handle = hook.submit(make_spec(hook, sleep_then_return, 120, task_id="killed-in-client"))
    sm_emulator.wait_for_status(handle["job_id"], "Training")
    making, release = threading.Event(), threading.Event()
    original = AwsBaseHook._get_async_conn

    def held_log_client(self):
        if self.client_type == "logs" and not release.is_set():
            making.set()
            release.wait(30)
        return original(self)

    monkeypatch.setattr(AwsBaseHook, "_get_async_conn", held_log_client)
    monkeypatch.setenv("AIRFLOW_DISABLE_GREENBACK_PORTAL", "true")

    async def main() -> None:
        runner = TriggerRunner()
        trigger = SageMakerStepOperatorTrigger(conn_id=hook.step_operator_conn_id, handle=handle, poll_interval=0.2)
        task = asyncio.create_task(runner.run_trigger(1, trigger))
        runner.triggers[1] = {"task": task, "name": "killed-in-client", "events": 0, "is_watcher": False}
        assert await asyncio.to_thread(making.wait, 30), "the trigger never read logs"
        runner.to_cancel.append(1)  # what the triggerer does when the task instance is marked failed
        await runner.cancel_triggers()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    job = sm_emulator.wait_for_job(handle["job_id"])
    assert job["TrainingJobStatus"] == "Stopped", job["TrainingJobStatus"]


def test_insufficient_capacity_is_a_capacity_failure(sm_emulator):
    hook = make_hook()
    spec = make_spec(hook, greet, "x", task_id="capacity")
    sm_emulator.inject("insufficient_capacity", job=f"sm-tests-capacity-t1-{spec.identity.digest[:10]}")
    event = run_trigger(hook, hook.submit(spec))
    assert event["status"] == "failed" and "CapacityError" in event["message"], event
    assert event["details"]["reason"] == "insufficient_capacity", event


def _raise_like_capacity() -> None:
    raise ValueError("CapacityError: Unable to provision requested ML compute capacity (from the step)")


def test_a_step_error_naming_capacity_is_no_preemption(sm_emulator):
    hook = make_hook()
    event = run_trigger(hook, hook.submit(make_spec(hook, _raise_like_capacity, task_id="fake_capacity")))
    assert event["status"] == "failed" and "ValueError: CapacityError" in event["message"], event
    assert "reason" not in event["details"], event


def _resume_from_checkpoint(epochs: int) -> dict:
    import json
    import os
    import time

    path = os.path.join(os.environ["STEPOPS_CHECKPOINT_DIR"], "state.json")
    state = json.load(open(path)) if os.path.exists(path) else {"epoch": 0, "starts": 0}
    state["starts"] += 1
    for epoch in range(state["epoch"], epochs):
        state["epoch"] = epoch + 1
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            json.dump(state, fh)
        print("epoch", state["epoch"], flush=True)
        time.sleep(0.5)
    return state


def test_spot_interruption_resumes_from_the_checkpoint(sm_emulator):
    hook = make_hook()
    spec = make_spec(hook, _resume_from_checkpoint, 6, task_id="spot",
                     settings=SageMakerStepOperatorSettings(use_spot_instances=True, max_runtime_in_seconds=120))
    handle = hook.submit(spec)
    sm_emulator.wait_for_status(handle["job_id"], "Training")
    time.sleep(1.5)
    sm_emulator.inject("preemption", handle["job_id"])
    event = run_trigger(hook, handle)
    assert event["status"] == "succeeded", event
    result = read_outcome(store_path(handle["output_uri"])).value
    assert result["epoch"] == 6 and result["starts"] == 2  # restarted once, from its checkpoint


def test_a_missing_region_is_a_clear_error(monkeypatch):
    import json

    from airflow_stepops.exceptions import StepOperatorConfigError

    for name in ("AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_NO_REGION_AWS", json.dumps({"conn_type": "aws", "login": "x", "password": "y"}))
    monkeypatch.setenv("AIRFLOW_CONN_SM_NO_REGION", json.dumps({"conn_type": "stepops_sagemaker", "extra": {
        "role": "arn:aws:iam::123456789012:role/r", "aws_conn_id": "no_region_aws", "image": "i",
        "artifact_store": "s3://stepops-tests/artifacts"}}))
    hook = make_hook("sm_no_region")
    with pytest.raises(StepOperatorConfigError, match="region_name: step operator 'sm_no_region' has no AWS region"):
        hook.submit(make_spec(hook, greet, "x", task_id="no_region"))


def test_shared_polling_describes_only_jobs_that_changed(sm_emulator):
    import asyncio

    from airflow_stepops.hooks.base import JobState

    hook = make_hook()
    handles = [hook.submit(make_spec(hook, sleep_then_return, 4, task_id=f"shared_{i}")) for i in range(4)]
    poller = make_hook()  # one hook instance, as a triggerer's shared poller keeps

    before = len(sm_emulator.requests(action="DescribeTrainingJob"))
    seen = asyncio.run(poll_together(poller, handles))
    describes = len(sm_emulator.requests(action="DescribeTrainingJob")) - before
    assert all(s.state is JobState.SUCCEEDED for s in seen[-1])
    assert len(seen) >= 6 and describes < len(seen) * len(handles) / 2, (describes, len(seen))


def _raise_deep(depth: int) -> None:
    import hashlib

    if depth:
        _raise_deep(depth - 1)
    raise ValueError("bad input: " + "".join(hashlib.sha256(str(i).encode()).hexdigest() for i in range(8)))


def _remote_error(hook, handle) -> BaseException:
    """What the operator's execute_complete raises for a failed job: collect_output, then error.json."""
    from airflow_stepops.exceptions import rebuild_remote_error

    hook.collect_output(handle)
    outcome = read_outcome(store_path(handle["output_uri"]))
    assert outcome is not None and outcome.error, "no error record came back"
    return rebuild_remote_error(outcome.error["type"], outcome.error["message"], outcome.error["traceback"])


def test_remote_exception_reaches_the_caller_as_itself(sm_emulator):
    hook = make_hook()
    handle = hook.submit(make_spec(hook, raise_value_error, 7, task_id="raises_back"))
    event = run_trigger(hook, handle)
    assert event["status"] == "failed" and FAILURE_MARKER not in event["message"], event
    assert "ModelArtifacts" not in sm_emulator.describe(handle["job_id"])  # /opt/ml/model is not kept
    error = _remote_error(hook, handle)
    assert isinstance(error, ValueError) and error.remote_message == "bad input 7"
    assert "in raise_value_error" in error.remote_traceback and 'raise ValueError(f"bad input {value}")' in error.remote_traceback


def test_a_long_remote_error_fits_failure_reason(sm_emulator):
    import hashlib

    from airflow_stepops.hooks.sagemaker import failure_record
    from airflow_stepops.runtime.entry import encode_failure

    hook = make_hook()
    handle = hook.submit(make_spec(hook, _raise_deep, 60, task_id="raises_deep"))
    assert run_trigger(hook, handle)["status"] == "failed"
    assert len(sm_emulator.describe(handle["job_id"])["FailureReason"]) <= 1024
    error = _remote_error(hook, handle)
    assert isinstance(error, ValueError) and len(error.remote_message) == len("bad input: ") + 8 * 64
    assert error.remote_traceback.rstrip().endswith('raise ValueError("bad input: " + "".join(hashlib.sha256(str(i)'
                                                    '.encode()).hexdigest() for i in range(8)))') or \
        error.remote_traceback.rstrip().endswith(error.remote_message)
    # forty distinct frames do not fit: the outermost go, the innermost and the whole message stay
    message = "bad input: " + "".join(hashlib.sha256(str(i).encode()).hexdigest() for i in range(8))
    frames = "".join(f'  File "/steps/f{i}.py", line {i}, in f{i}\n    g{i}()\n' for i in range(40))
    text = encode_failure({"type": "builtins.ValueError", "message": message, "phase": "run",
                           "traceback": f"Traceback (most recent call last):\n{frames}ValueError: {message}\n"})
    record = failure_record(f"AlgorithmError: {text}, exit code: 1")
    assert len(text) <= 960 and record is not None and record["message"] == message
    assert record["traceback"].startswith("...\n") and record["traceback"].endswith(f"ValueError: {message}\n")
    assert failure_record(f"AlgorithmError: {text[:-40]}") is None  # a cut record is no record


def test_requests_sagemaker_refuses_are_refused_before_submitting(sm_emulator, monkeypatch):
    from airflow_stepops.exceptions import StepOperatorConfigError

    hook = make_hook()
    with pytest.raises(ValueError, match=r"tags: 'ml~infra' has a character SageMaker refuses"):
        SageMakerStepOperatorSettings(tags={"team": "ml~infra"})  # at parse time already
    bad = SageMakerStepOperatorSettings.model_construct(tags={"team": "ml~infra"})  # the request check still holds
    with pytest.raises(StepOperatorConfigError, match=r"Tags\[\d+\]\.Value: 'ml~infra' does not match the pattern"):
        hook.render(make_spec(hook, greet, "x", task_id="bad_tag", settings=bad))
    too_many = make_hook("sm_tagged", monkeypatch=monkeypatch, tags={f"c{i}": "v" for i in range(30)})
    with pytest.raises(StepOperatorConfigError, match="tags: SageMaker allows 50 tags a job and 6 are the step's"):
        too_many.render(make_spec(too_many, greet, "x", task_id="tags", settings=SageMakerStepOperatorSettings(
            tags={f"s{i}": "v" for i in range(20)})))


def test_identity_tags_are_valid_tag_values(sm_emulator):
    import dataclasses

    from airflow_stepops.bundle import StepIdentity

    hook = make_hook()
    spec = make_spec(hook, greet, "tilde", task_id="tilde_run")
    identity = StepIdentity(spec.identity.dag_id, "manual__2026-12-07~retry", "tilde_run", -1, 1)
    handle = hook.submit(dataclasses.replace(spec, identity=identity))
    tags = {t["Key"]: t["Value"] for t in sm_emulator.client("sagemaker").list_tags(
        ResourceArn=sm_emulator.describe(handle["job_id"])["TrainingJobArn"])["Tags"]}
    assert tags["stepops:run-id"].startswith("manual__2026-12-07_retry-") and "~" not in tags["stepops:run-id"]
    assert hook.find_job(identity)["job_id"] == handle["job_id"]


def test_identity_is_never_assumed(sm_emulator):
    from airflow_stepops.exceptions import StepOperatorConfigError
    from airflow_stepops.hooks.sagemaker import job_name

    hook = make_hook()
    spec = make_spec(hook, sleep_then_return, 30, task_id="identity")
    handle = hook.submit(spec)
    sm_emulator.fail_requests("AccessDeniedException", action="ListTags", count=1, message="not allowed")
    with pytest.raises(StepOperatorConfigError, match="list the tags .* AccessDeniedException"):
        hook.find_job(spec.identity)  # not "ours" for want of tags, nor "not ours"
    hook.cancel(handle)
    stranger = make_spec(hook, greet, "x", task_id="stranger")
    request = hook.render(stranger)
    sm_emulator.client("sagemaker").create_training_job(**{**request, "Tags": [{"Key": "team", "Value": "other"}]})
    assert job_name(stranger.identity) == request["TrainingJobName"]
    with pytest.raises(StepOperatorConfigError, match="was not created for this step try"):
        hook.submit(stranger)


def test_a_lost_create_reply_resolves_to_the_one_job(sm_emulator, monkeypatch):
    hook = make_hook("sm_fast", monkeypatch=monkeypatch, api_timeout_seconds=1, api_max_attempts=2)
    for index, lost in enumerate((1, None)):  # a retry meets the job (ResourceInUse); every reply lost
        spec = make_spec(hook, greet, "lost", task_id=f"lost_reply_{index}")
        fault = sm_emulator.lose_replies("CreateTrainingJob", count=lost, hold=20)
        started = time.monotonic()
        try:
            handle = hook.submit(spec)
        finally:
            sm_emulator.clear_faults()
        assert time.monotonic() - started < 10 and fault.hits >= 1
        assert [j["TrainingJobName"] for j in sm_emulator.jobs].count(handle["job_id"]) == 1
        assert run_trigger(hook, handle)["status"] == "succeeded"


def test_late_log_events_are_shown_once(sm_emulator):
    import asyncio
    from collections import Counter

    hook = make_hook()
    old = sm_emulator.configure(late_log_every=4, late_log_delay=1.2)
    try:
        handle = hook.submit(make_spec(hook, print_lines, 80, 0.04, task_id="late_logs"))
        lines: list[str] = []
        cursor, done = None, 0
        while done < 3:  # until three reads after the job ended
            new, cursor = asyncio.run(hook.aread_logs(handle, cursor))
            lines += new
            done += hook.get_status(handle).state.terminal
            time.sleep(0.3)
    finally:
        sm_emulator.configure(late_log_every=old.late_log_every, late_log_delay=old.late_log_delay)
    counted = Counter(line for line in lines if line.startswith("line "))
    assert counted == Counter(f"line {n}" for n in range(80)), sorted(set(counted.items()) ^ {
        (f"line {n}", 1) for n in range(80)})


def test_an_escalated_attempt_runs_without_managed_spot_and_no_interruption_strikes_it(sm_emulator):
    hook = make_hook()
    spec = make_spec(hook, sleep_then_return, 2, task_id="escalated",
                     settings=SageMakerStepOperatorSettings(use_spot_instances=True, max_wait_time_in_seconds=7200))
    spec.on_demand = True
    rule = sm_emulator.inject("spot_interruption", after=0.5, count=None)  # every new managed spot job
    try:
        handle = hook.submit(spec)
        event = run_trigger(hook, handle, timeout=120)
    finally:
        sm_emulator.clear_faults()
    assert (handle["spot"], handle["on_demand"]) == (False, True), handle
    assert event["status"] == "succeeded" and rule.applied == [], event
    job = hook.sagemaker.describe_training_job(TrainingJobName=handle["job_id"])
    assert job["EnableManagedSpotTraining"] is False and "MaxWaitTimeInSeconds" not in job["StoppingCondition"]
