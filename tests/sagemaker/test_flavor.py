"""The sagemaker flavor against the emulator: boto3 and aiobotocore, real training-job processes."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("moto")

from airflow_stepops.artifacts import store_path
from airflow_stepops.bundle import read_outcome
from airflow_stepops.resources import ResourceSettings
from airflow_stepops.settings.sagemaker import SageMakerStepOperatorSettings

from .smjobs import make_hook, make_spec, run_trigger

pytestmark = pytest.mark.usefixtures("sm_emulator")


def _greet(name: str) -> dict:
    import os

    print("hello", name, "from", os.environ["STEPOPS_FLAVOR"], flush=True)
    return {"greeting": f"hi {name}"}


def test_step_runs_as_a_training_job_with_logs_and_result(sm_emulator):
    hook = make_hook()
    handle = hook.submit(make_spec(hook, _greet, "ada", task_id="greet",
                                   resources=ResourceSettings(cpu_count=2, memory="4GiB")))
    event = run_trigger(hook, handle)
    assert event["status"] == "succeeded", event
    assert "hello ada from sagemaker" in event["log_tail"]
    assert read_outcome(store_path(handle["output_uri"])).value == {"greeting": "hi ada"}
    job = sm_emulator.describe(handle["job_id"])
    assert job["ResourceConfig"]["InstanceType"] == "ml.m5.large"  # the connection's default
    assert hook.console_url(handle).endswith(f"#/jobs/{handle['job_id']}")


def _raise(value: int) -> None:
    raise ValueError(f"bad input {value}")


def test_remote_exception_is_the_failure_reason(sm_emulator):
    hook = make_hook()
    handle = hook.submit(make_spec(hook, _raise, 7, task_id="raises"))
    event = run_trigger(hook, handle)
    assert event["status"] == "failed" and "ValueError: bad input 7" in event["message"], event
    assert any("Traceback" in line for line in event["log_tail"])


def _sleep(seconds: float) -> str:
    import time

    print("sleeping", flush=True)
    time.sleep(seconds)
    return "done"


def test_trigger_on_kill_stops_the_training_job(sm_emulator):
    import asyncio

    from airflow_stepops.triggers.sagemaker import SageMakerStepOperatorTrigger

    hook = make_hook()
    handle = hook.submit(make_spec(hook, _sleep, 120, task_id="kill"))
    sm_emulator.wait_for_status(handle["job_id"], "Training")
    asyncio.run(SageMakerStepOperatorTrigger(conn_id=hook.step_operator_conn_id, handle=handle).on_kill())
    job = sm_emulator.wait_for_job(handle["job_id"])
    assert job["TrainingJobStatus"] == "Stopped" and not sm_emulator.pids(handle["job_id"])


def test_max_runtime_is_a_timeout(sm_emulator):
    hook = make_hook()
    handle = hook.submit(make_spec(hook, _sleep, 60, task_id="deadline",
                                   settings=SageMakerStepOperatorSettings(max_runtime_in_seconds=2)))
    event = run_trigger(hook, handle)
    assert event["status"] == "failed" and event["details"]["reason"] == "timed_out", event


def test_insufficient_capacity_is_preemption(sm_emulator):
    hook = make_hook()
    spec = make_spec(hook, _greet, "x", task_id="capacity")
    sm_emulator.inject("insufficient_capacity", job=f"sm-tests-capacity-t1-{spec.identity.digest[:10]}")
    event = run_trigger(hook, hook.submit(spec))
    assert event["status"] == "preempted" and "CapacityError" in event["message"], event


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
    sm_emulator.disrupt(handle["job_id"])
    event = run_trigger(hook, handle)
    assert event["status"] == "succeeded", event
    result = read_outcome(store_path(handle["output_uri"])).value
    assert result["epoch"] == 6 and result["starts"] == 2  # restarted once, from its checkpoint


def test_submit_is_exactly_once_per_try(sm_emulator):
    hook = make_hook()
    spec = make_spec(hook, _greet, "once", task_id="exactly_once")
    first = hook.submit(spec)
    again = hook.submit(spec)
    assert again["job_id"] == first["job_id"] and hook.find_job(spec.identity)["job_id"] == first["job_id"]
    assert len([j for j in sm_emulator.jobs() if j["TrainingJobName"] == first["job_id"]]) == 1
    assert hook.find_job(spec.identity.for_try(2)) is None
    assert run_trigger(hook, first)["status"] == "succeeded"


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
        hook.submit(make_spec(hook, _greet, "x", task_id="no_region"))


def test_shared_polling_describes_only_jobs_that_changed(sm_emulator):
    import asyncio

    from airflow_stepops.hooks.base import JobState

    hook = make_hook()
    handles = [hook.submit(make_spec(hook, _sleep, 4, task_id=f"shared_{i}")) for i in range(4)]
    poller = make_hook()  # one hook instance, as a triggerer's shared poller keeps

    async def rounds() -> list[list]:
        seen = []
        for _ in range(60):
            statuses = await poller.aget_statuses(handles)
            seen.append(statuses)
            if all(not isinstance(s, BaseException) and s.state.terminal for s in statuses):
                return seen
            await asyncio.sleep(0.5)
        raise AssertionError("the jobs did not finish")

    before = len(sm_emulator.requests(action="DescribeTrainingJob"))
    seen = asyncio.run(rounds())
    describes = len(sm_emulator.requests(action="DescribeTrainingJob")) - before
    assert all(s.state is JobState.SUCCEEDED for s in seen[-1])
    assert len(seen) >= 6 and describes < len(seen) * len(handles) / 2, (describes, len(seen))
