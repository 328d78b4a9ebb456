"""What a new user meets first: parse-time refusals of step functions that cannot run remotely, and a
quiet task log when a step fails before it was submitted."""

from __future__ import annotations

import pytest

from airflow_stepops.operators.local import LocalStepOperator


def _reads(monkeypatch) -> list[str]:
    from airflow.sdk.execution_time.xcom import XCom

    keys: list[str] = []
    monkeypatch.setattr(XCom, "get_value", lambda *, ti_key, key: keys.append(key) or {"console_url": "u"})
    return keys


def test_the_job_link_reads_no_xcom_when_nothing_was_submitted(monkeypatch):
    # Airflow asks every operator for its links at the end of a try: reading an XCom that was never
    # written logs "XCom not found" at error level after every failure before submit
    keys = _reads(monkeypatch)
    op = LocalStepOperator(task_id="t", python_callable=lambda: 1)
    link = op.operator_extra_links[0]
    assert link.get_link(op, ti_key=None) == "" and keys == []
    op._handle = {"job_id": "j"}
    assert link.get_link(op, ti_key=None) == "u" and keys == ["stepops_job"]
