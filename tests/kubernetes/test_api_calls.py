"""Every Kubernetes API call of the hook has a timeout and a bounded retry; a lost create reply
re-attaches to the one Job it created."""

from __future__ import annotations

import asyncio
import time

import pytest

from airflow_stepops.exceptions import StepOperatorConfigError
from airflow_stepops.hooks import kubernetes_job as manifest
from airflow_stepops.hooks.base import JobState

from ..flavorjobs import hook_maker, make_spec, run_trigger

make_hook = hook_maker("kubernetes")

NS = "steps"


@pytest.fixture
def fast_hook(k8s_emulator, monkeypatch):
    """The tests' step operator with a 1 s API timeout."""
    yield make_hook("k8s_fast_step_operator", monkeypatch=monkeypatch, api_timeout_seconds=1)
    k8s_emulator.clear_faults()


def _steps_jobs(k8s, handle) -> list:
    return k8s.list_objects("jobs", NS, f"{manifest.STEP_LABEL}={handle['step']}")


def _greet() -> str:
    print("hi there", flush=True)
    return "hi"


def test_a_create_whose_reply_never_comes_re_attaches_to_the_one_job(k8s_emulator, fast_hook):
    spec = make_spec(fast_hook, _greet, task_id="lost_reply")
    k8s_emulator.delay_replies(30, method="POST", path=f"/namespaces/{NS}/jobs$")
    started = time.monotonic()
    handle = fast_hook.submit(spec)
    assert time.monotonic() - started < 10  # one timeout, then the retry's 409 and a lookup
    assert len(_steps_jobs(k8s_emulator, handle)) == 1
    assert handle["job_id"] == manifest.job_name(spec.identity) and handle["transport"] == "inline"
    assert run_trigger(fast_hook, handle)["status"] == "succeeded"


def test_a_create_whose_every_reply_is_lost_still_finds_its_job(k8s_emulator, fast_hook):
    spec = make_spec(fast_hook, _greet, task_id="all_lost")
    k8s_emulator.delay_replies(30, method="POST", path=f"/namespaces/{NS}/jobs$", count=4)
    started = time.monotonic()
    handle = fast_hook.submit(spec)
    assert time.monotonic() - started < 20  # four timeouts and back-off, then a lookup
    assert len(_steps_jobs(k8s_emulator, handle)) == 1


def test_a_create_answered_503_after_commit_re_attaches(k8s_emulator, fast_hook):
    spec = make_spec(fast_hook, _greet, task_id="lost_503")
    k8s_emulator.fail_requests(503, method="POST", path=f"/namespaces/{NS}/jobs$", after_commit=True)
    handle = fast_hook.submit(spec)
    assert len(_steps_jobs(k8s_emulator, handle)) == 1


def test_a_job_of_the_same_name_made_for_another_run_is_never_re_attached(k8s_emulator, fast_hook):
    spec = make_spec(fast_hook, _greet, task_id="same_name")
    handle = fast_hook.submit(spec)
    fast_hook.batch.patch_namespaced_job(handle["job_id"], NS, {"metadata": {"annotations": {
        f"{manifest.LABEL_PREFIX}/run-id": "another-run"}}})
    with pytest.raises(StepOperatorConfigError, match="was not created for this step try"):
        fast_hook.submit(spec)


def test_status_polls_and_log_reads_whose_replies_are_lost_are_retried(k8s_emulator, fast_hook):
    handle = fast_hook.submit(make_spec(fast_hook, _greet, task_id="lost_poll"))
    k8s_emulator.delay_replies(30, method="GET", path=f"/namespaces/{NS}/pods$", count=2)
    k8s_emulator.delay_replies(30, method="GET", path="/log$")
    started = time.monotonic()
    deadline = started + 60
    while True:
        (status,) = asyncio.run(fast_hook.aget_statuses([handle]))
        assert not isinstance(status, BaseException), status
        if status.state.terminal or time.monotonic() > deadline:
            break
    assert status.state is JobState.SUCCEEDED
    lines, _ = asyncio.run(fast_hook.aread_logs(handle, None))
    assert "hi there" in lines and time.monotonic() - started < 20
