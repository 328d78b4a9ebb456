"""Pod log reading and Job status mapping on their own: the cases a live cluster produces rarely."""

from __future__ import annotations

import base64
import hashlib

from airflow_stepops.hooks.base import JobState
from airflow_stepops.hooks.kubernetes_logs import (
    MAX_REMEMBERED,
    block_prefix,
    extract_output_block,
    fresh_cursor,
    new_lines,
    since_seconds,
)
from airflow_stepops.hooks.kubernetes_status import interpret
from airflow_stepops.timestamps import epoch

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def _stamp(offset: float) -> str:
    from datetime import datetime, timezone

    whole = datetime.fromtimestamp(int(T0 + offset), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{whole}.{round((offset % 1) * 1e9):09d}Z"


def test_timestamps_with_offsets_and_trimmed_nanoseconds():
    assert epoch("2027-01-15T08:00:00Z") == T0
    assert epoch("2027-01-15T10:00:00.5+02:00") == T0 + 0.5
    assert abs(epoch("2027-01-15T08:00:00.123456789Z") - (T0 + 0.123456789)) < 1e-6
    assert epoch("unable to retrieve container logs") is None


def test_log_reads_lose_and_repeat_nothing():
    cursor = fresh_cursor(None, "pod-a")
    text = f"{_stamp(0)} a\n{_stamp(0)} a\n{_stamp(1)} progress 10%\rprogress 90%\n"
    lines, cursor = new_lines(text, cursor, "m", now=T0 + 2)
    assert lines == ["a", "a", "progress 90%"]  # identical lines kept, carriage returns are one line
    assert since_seconds(cursor, now=T0 + 3)["since_seconds"] >= 2 + 10
    # the next read overlaps; a stderr line stamped earlier than the newest arrives late
    text += f"{_stamp(0.5)} late stderr line\n{_stamp(2)} b\n"
    lines, cursor = new_lines(text, cursor, "m", now=T0 + 3)
    assert lines == ["late stderr line", "b"]
    lines, cursor = new_lines(text, cursor, "m", now=T0 + 4)
    assert lines == []


def test_more_lines_in_the_overlap_than_remembered_repeat_none_and_lose_none():
    lines_in_window = MAX_REMEMBERED + 7000  # ~27k lines in 5 s: more than the cursor remembers
    text = "".join(f"{_stamp(i * 5 / lines_in_window)} line {i}\n" for i in range(lines_in_window))
    cursor, shown = fresh_cursor(None, "pod-a"), []
    for _ in range(10):  # capped reads of an overlapping window, as the hook makes them
        lines, cursor = new_lines(text, cursor, "m", now=T0 + 6)
        shown += lines
    assert shown == [f"line {i}" for i in range(lines_in_window)]
    late = text + f"{_stamp(5.5)} written after\n"
    assert new_lines(late, cursor, "m", now=T0 + 7)[0] == ["written after"]


def test_a_node_clock_ahead_of_ours_loses_no_lines():
    cursor = fresh_cursor(None, "pod-a")
    _, cursor = new_lines(f"{_stamp(30)} from the future\n", cursor, "m", now=T0)  # node 30 s ahead
    assert since_seconds(cursor, now=T0 + 5)["since_seconds"] >= 5 + 10


def _block(marker: str, data: bytes, chunk: int = 4) -> list[str]:
    text = base64.b64encode(data).decode()
    prefix = block_prefix(marker)
    return ([f"{prefix}begin:"] + [f"{prefix}{n}:{text[i:i + chunk]}" for n, i in enumerate(range(0, len(text), chunk))]
            + [f"{prefix}end:{hashlib.sha256(data).hexdigest()}"])


def test_output_block_is_hidden_and_survives_stray_lines():
    block = _block("job-1", b"result bytes")
    log = ["training done", "last line without newline" + block[0], *block[1:3], "stray background output",
           "Traceback (most recent call last):", *block[3:]]
    assert extract_output_block("\n".join(log), "job-1") == b"result bytes"
    assert extract_output_block("\n".join(log), "job-2") is None  # another job's marker
    stamped = "\n".join(f"{_stamp(i)} {line}" for i, line in enumerate(log))
    lines, _ = new_lines(stamped, fresh_cursor(None, "p"), "job-1", now=T0 + 60)
    assert lines == ["training done", "last line without newline", "stray background output",
                     "Traceback (most recent call last):"]


def test_damaged_output_blocks_are_ignored():
    good, bad = _block("j", b"first"), _block("j", b"second")
    bad[2] = bad[2][:-1] + "!"  # not base64
    assert extract_output_block("\n".join(good + bad), "j") == b"first"
    missing = _block("j", b"third")
    del missing[2]
    assert extract_output_block("\n".join(missing), "j") is None


def _job(created: float, **status) -> dict:
    return {"metadata": {"name": "j", "creationTimestamp": _stamp(created - T0)}, "spec": {}, "status": status}


def _pod(created: float, phase: str, *, scheduled: float | None = None, waiting: dict | None = None) -> dict:
    conditions = []
    if scheduled is not None:
        conditions.append({"type": "PodScheduled", "status": "True", "lastTransitionTime": _stamp(scheduled - T0)})
    state = {"waiting": waiting} if waiting else {}
    return {"metadata": {"name": "j-abcde", "creationTimestamp": _stamp(created - T0)}, "spec": {},
            "status": {"phase": phase, "conditions": conditions,
                       "containerStatuses": [{"name": "step", "state": state}] if waiting else []}}


def _status(job, pods, now):
    return interpret(job, pods, name="ns/j", now=now, unschedulable_timeout=900, start_timeout=1800)


def test_a_job_without_a_pod_fails_after_the_unschedulable_timeout():
    assert _status(_job(T0), [], T0 + 60).state is JobState.QUEUED
    failed = _status(_job(T0), [], T0 + 901)
    assert failed.state is JobState.FAILED and failed.details["stop_job"] and "no pod" in failed.message
    assert failed.details["reason"] == "unschedulable"  # the Job's status names no quota: a capacity failure


def test_max_queue_seconds_shortens_the_unschedulable_timeout_and_names_itself():
    unschedulable = _pod(T0, "Pending")
    unschedulable["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                              "message": "0/1 nodes are available: 1 Insufficient cpu."}]
    status = interpret(_job(T0), [unschedulable], name="ns/j", now=T0 + 61, unschedulable_timeout=900,
                       max_queue=60)
    assert status.state is JobState.FAILED and status.details["reason"] == "queue_timeout", status
    assert "max_queue_seconds=60" in status.message and "Insufficient cpu" in status.message
    longer = interpret(_job(T0), [unschedulable], name="ns/j", now=T0 + 901, unschedulable_timeout=900,
                       max_queue=3600)
    assert longer.details["reason"] == "unschedulable" and "unschedulable_timeout_seconds=900" in longer.message
    assert interpret(_job(T0), [], name="ns/j", now=T0 + 61, unschedulable_timeout=900,
                     max_queue=60).details["reason"] == "queue_timeout"


def test_a_scheduled_pod_that_never_starts_fails_after_the_start_timeout():
    pod = _pod(T0, "Pending", scheduled=T0 + 1, waiting={"reason": "ContainerCreating"})
    assert _status(_job(T0), [pod], T0 + 600).state is JobState.QUEUED  # a big image may pull for minutes
    failed = _status(_job(T0), [pod], T0 + 1802)
    assert failed.state is JobState.FAILED and "ContainerCreating" in failed.message and failed.details["stop_job"]


def test_only_permanent_image_pull_errors_fail_at_once():
    transient = _pod(T0, "Pending", scheduled=T0, waiting={"reason": "ErrImagePull",
                                                            "message": "429 Too Many Requests"})
    assert _status(_job(T0), [transient], T0 + 5).state is JobState.QUEUED
    missing = _pod(T0, "Pending", scheduled=T0, waiting={"reason": "ErrImagePull",
                                                          "message": 'failed to resolve reference: not found'})
    assert _status(_job(T0), [missing], T0 + 5).state is JobState.FAILED
    backoff = _pod(T0, "Pending", scheduled=T0, waiting={"reason": "ImagePullBackOff", "message": "Back-off"})
    assert _status(_job(T0), [backoff], T0 + 5).state is JobState.FAILED


def test_failure_message_skips_the_output_block_in_a_log_tail():
    pod = _pod(T0, "Failed")
    pod["status"]["containerStatuses"] = [{"name": "step", "state": {"terminated": {
        "exitCode": 1, "reason": "Error", "message": "ValueError: bad\n::stepops-output:j:end:abc"}}}]
    job = _job(T0, conditions=[{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}])
    status = _status(job, [pod], T0 + 10)
    assert status.state is JobState.FAILED and status.message.endswith("ValueError: bad")
