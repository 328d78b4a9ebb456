"""The polling trigger on real local jobs: log streaming, shared polling, deadline, on_kill."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

from airflow_stepops.hooks.base import JobState
from airflow_stepops.settings.local import LocalStepOperatorSettings
from airflow_stepops.triggers.base import SharedStatusPoller
from airflow_stepops.triggers.local import LocalStepOperatorTrigger

from .localjobs import make_hook, make_spec, wait_running, wait_terminal


def _trigger(hook, handle, **kwargs):
    trigger = LocalStepOperatorTrigger(conn_id="test_local", handle=handle, poll_interval=0.1, **kwargs)
    trigger.get_hook = lambda: hook  # the connection lives only in this test, not in Airflow
    return trigger


async def _first(trigger):
    async for event in trigger.run():
        return event.payload
    return None


def test_trigger_round_trips_through_serialize():
    trigger = LocalStepOperatorTrigger(conn_id="c", handle={"job_id": "j"}, poll_interval=2, deadline=5.0)
    path, kwargs = trigger.serialize()
    assert path == "airflow_stepops.triggers.local.LocalStepOperatorTrigger"
    rebuilt = LocalStepOperatorTrigger(**kwargs)
    assert rebuilt.serialize() == (path, kwargs)


def test_streams_remote_log_lines_and_reports_success(tmp_path, capsys):
    hook = make_hook(tmp_path)

    def step():
        import time

        for i in range(3):
            print(f"epoch {i}", flush=True)
            time.sleep(0.2)
        return "done"

    handle = hook.submit(make_spec(hook, step))
    event = asyncio.run(_first(_trigger(hook, handle)))
    assert event["status"] == "succeeded"
    # Airflow's structlog writes log records to stdout; in a task they land in the task log
    logged = [line for line in capsys.readouterr().out.splitlines() if "epoch" in line]
    assert [re.search(r"\[local\] epoch \d", line).group(0) for line in logged] == [
        "[local] epoch 0", "[local] epoch 1", "[local] epoch 2"]
    assert "epoch 2" in event["log_tail"]


def test_failure_event_carries_the_log_tail(tmp_path):
    hook = make_hook(tmp_path)

    def step():
        raise ValueError("bad input row 7")

    handle = hook.submit(make_spec(hook, step))
    event = asyncio.run(_first(_trigger(hook, handle)))
    assert event["status"] == "failed"
    assert any("bad input row 7" in line for line in event["log_tail"])


def test_deadline_stops_the_job(tmp_path):
    hook = make_hook(tmp_path)
    handle = hook.submit(make_spec(hook, time.sleep, 60, settings=LocalStepOperatorSettings(cancel_grace_period_seconds=1)))
    event = asyncio.run(_first(_trigger(hook, handle, deadline=time.time() + 1)))
    assert event["status"] == "timeout"
    assert wait_terminal(hook, handle, timeout=10).state is JobState.CANCELLED


def test_on_kill_stops_the_job(tmp_path):
    hook = make_hook(tmp_path)
    handle = hook.submit(make_spec(hook, time.sleep, 60, settings=LocalStepOperatorSettings(cancel_grace_period_seconds=1)))
    wait_running(hook, handle)
    asyncio.run(_trigger(hook, handle).on_kill())  # returns once the stop was requested
    assert wait_terminal(hook, handle, timeout=10).state is JobState.CANCELLED


def test_status_polling_is_shared_by_all_triggers_of_a_backend(tmp_path):
    hook = make_hook(tmp_path)
    handles = [hook.submit(make_spec(hook, time.sleep, 1.5, task_id=f"t{i}")) for i in range(8)]

    async def main():
        before = SharedStatusPoller.calls
        events = await asyncio.gather(*(_first(_trigger(hook, h)) for h in handles))
        return events, SharedStatusPoller.calls - before

    started = time.monotonic()
    events, calls = asyncio.run(main())
    rounds = (time.monotonic() - started) / 0.1
    assert all(e["status"] == "succeeded" for e in events)
    # one backend call per round for all 8 triggers (unshared polling would make ~8 per round);
    # a few extra fast rounds come from the quick start after each new subscription
    assert calls <= rounds + 8
    assert calls < 8 * rounds / 3


def test_one_broken_job_does_not_fail_the_others(tmp_path):
    hook = make_hook(tmp_path)
    good = hook.submit(make_spec(hook, time.sleep, 0.5, task_id="good"))
    bad = hook.submit(make_spec(hook, lambda: 1, task_id="bad"))
    wait_terminal(hook, bad)
    (Path(bad["job_dir"]) / "status.json").write_text("{}")  # corrupt: no "state"

    async def main():
        return await asyncio.gather(_first(_trigger(hook, good)), _first(_trigger(hook, bad)))

    good_event, bad_event = asyncio.run(main())
    assert good_event["status"] == "succeeded"
    assert bad_event["status"] == "error" and "status polling failed" in bad_event["message"]


def _reported_as(hook, states):
    """``hook`` whose status polls report ``states`` first (then the job's real state)."""
    from airflow_stepops.hooks.base import JobStatus

    real, left = hook.aget_statuses, list(states)

    async def statuses(handles):
        if left:
            return [JobStatus(left.pop(0), "held", {}) for _ in handles]
        return await real(handles)

    hook.aget_statuses = statuses
    return hook


def test_a_job_queued_past_max_queue_seconds_since_submission_is_stopped(tmp_path):
    hook = _reported_as(make_hook(tmp_path), [JobState.QUEUED] * 1000)
    handle = hook.submit(make_spec(hook, time.sleep, 60, settings=LocalStepOperatorSettings(cancel_grace_period_seconds=1)))
    handle = {**handle, "max_queue_seconds": 5, "submitted_at": time.time() - 6}  # a triggerer restarted meanwhile
    event = asyncio.run(_first(_trigger(hook, handle)))
    assert event["status"] == "failed" and event["details"] == {"reason": "queue_timeout", "max_queue_seconds": 5}
    assert "max_queue_seconds=5" in event["message"]
    assert wait_terminal(hook, handle, timeout=10).state is JobState.CANCELLED


def test_a_job_queued_again_after_it_ran_is_no_queue_timeout(tmp_path):
    hook = _reported_as(make_hook(tmp_path), [JobState.RUNNING, JobState.QUEUED, JobState.QUEUED])
    handle = hook.submit(make_spec(hook, int, 7))
    handle = {**handle, "max_queue_seconds": 1, "submitted_at": time.time() - 60}
    event = asyncio.run(_first(_trigger(hook, handle)))
    assert event["status"] == "succeeded", event
