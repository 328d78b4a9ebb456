"""A step operator connection whose extra is not a JSON object is refused with one error naming the
connection and the JSON problem, wherever the connection is read: operator, hook, trigger and CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys

import pytest

from airflow_stepops.exceptions import StepOperatorConfigError

BAD = {"conn_type": "stepops_local", "extra": '{"jobs_dir": "/tmp/x",}'}  # a trailing comma


@pytest.fixture
def bad_extra(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_BAD_EXTRA", json.dumps(BAD))
    monkeypatch.setenv("AIRFLOW_CONN_LIST_EXTRA", json.dumps({"conn_type": "stepops_local", "extra": "[1, 2]"}))


@pytest.mark.usefixtures("bad_extra")
def test_operator_hook_and_trigger_refuse_a_non_json_extra(caplog):
    from airflow_stepops.connections import load_step_operator_connection
    from airflow_stepops.hooks.local import LocalStepOperatorHook
    from airflow_stepops.triggers.local import LocalStepOperatorTrigger

    message = r"connection 'bad_extra' extra: not valid JSON \(Expecting property name .*line 1 column 23"
    with caplog.at_level(logging.INFO):
        with pytest.raises(StepOperatorConfigError, match=message):
            load_step_operator_connection("bad_extra", "local")
    assert caplog.text.count("Failed to deserialize") <= 1  # only Airflow's own lookup logs it, once
    with pytest.raises(StepOperatorConfigError, match=message):
        _ = LocalStepOperatorHook("bad_extra").config
    trigger = LocalStepOperatorTrigger(conn_id="bad_extra", handle={"job_dir": "/nonexistent"}, poll_interval=1)
    with pytest.raises(StepOperatorConfigError, match=message):
        asyncio.run(trigger.get_ready_hook())
    with pytest.raises(StepOperatorConfigError, match=r"connection 'list_extra' extra: must be a JSON object .*list"):
        load_step_operator_connection("list_extra")


@pytest.mark.usefixtures("bad_extra")
def test_stepops_list_and_describe_call_it_invalid():
    run = lambda *args: subprocess.run([sys.executable, "-m", "airflow_stepops.cli", *args], capture_output=True,  # noqa: E731
                                       text=True, env=dict(os.environ), timeout=180)
    rows = {line.split()[0]: line for line in run("list").stdout.splitlines()[1:]}
    assert "INVALID: connection 'bad_extra' extra: not valid JSON" in rows["bad_extra"]
    described = run("describe", "bad_extra")
    assert described.returncode != 0 and "connection 'bad_extra' extra: not valid JSON" in described.stderr
