"""``stepops cost``: the charges the job summaries record, added up per run, DAG, task, step operator or day."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timezone

import pytest

from airflow_stepops import cli, ledger

DAY = datetime(2026, 12, 1, 10, tzinfo=timezone.utc).timestamp()
CHARGES = [
    {"dag_id": "train", "run_id": "r1", "task_id": "fit", "step_operator": "sm", "flavor": "sagemaker", "amount": 1.5,
     "currency": "USD", "billed_seconds": 600, "day": "2026-12-01"},
    {"dag_id": "train", "run_id": "r1", "task_id": "fit", "step_operator": "vx", "flavor": "vertex", "amount": 0.25,
     "currency": "USD", "billed_seconds": 60, "day": "2026-12-01"},
    {"dag_id": "train", "run_id": "r2", "task_id": "fit", "step_operator": "k8s", "flavor": "kubernetes",
     "amount": None, "currency": "USD", "billed_seconds": 30, "day": "2026-12-02"},
    {"dag_id": "eval", "run_id": "r1", "task_id": "score", "step_operator": "sm", "flavor": "sagemaker",
     "amount": 2.0, "currency": "EUR", "billed_seconds": 100, "day": "2026-12-02"},
]


def test_the_ledger_sums_per_group_and_currency_and_counts_unpriced_attempts_apart():
    by_run = {(r["dag_id"], r["run_id"], r["currency"]): r for r in ledger.ledger(CHARGES, "run")}
    assert by_run[("train", "r1", "USD")]["amount"] == 1.75 and by_run[("train", "r1", "USD")]["attempts"] == 2
    unpriced = by_run[("train", "r2", "")]
    assert (unpriced["amount"], unpriced["unpriced_attempts"], unpriced["billed_seconds"]) == (0.0, 1, 30)
    by_operator = {(r["step_operator"], r["currency"]): r["amount"] for r in ledger.ledger(CHARGES, "step_operator")}
    assert by_operator == {("k8s", ""): 0.0, ("sm", "EUR"): 2.0, ("sm", "USD"): 1.5, ("vx", "USD"): 0.25}
    assert {(r["day"], r["currency"]): r["amount"] for r in ledger.ledger(CHARGES, "day")} == {
        ("2026-12-01", "USD"): 1.75, ("2026-12-02", ""): 0.0, ("2026-12-02", "EUR"): 2.0}


def test_the_ledger_renders_as_a_table_csv_and_json():
    rows = ledger.ledger(CHARGES, "dag")
    assert json.loads(ledger.render(rows, "json")) == rows
    parsed = list(csv.DictReader(io.StringIO(ledger.render(rows, "csv"))))
    assert [(r["dag_id"], r["currency"], float(r["amount"])) for r in parsed] == [
        ("eval", "EUR", 2.0), ("train", "", 0.0), ("train", "USD", 1.75)]
    table = ledger.render(rows, "table").splitlines()
    assert table[0].split() == ["dag_id", "currency", "amount", "attempts", "billed_seconds", "unpriced_attempts"]
    assert table[-1].split()[:3] == ["train", "USD", "1.750000"]
    assert ledger.render([], "table") == "no step charges recorded"


@pytest.mark.parametrize(("since", "expected"), [
    ("2026-12-01", datetime(2026, 12, 1, tzinfo=timezone.utc)),
    ("2026-12-01T08:30", datetime(2026, 12, 1, 8, 30, tzinfo=timezone.utc)),
    ("7d", datetime(2026, 11, 24, 12, tzinfo=timezone.utc)),
    ("12h", datetime(2026, 12, 1, tzinfo=timezone.utc)),
])
def test_since_takes_dates_and_spans_back_from_now(since, expected):
    assert ledger.parse_since(since, now=datetime(2026, 12, 1, 12, tzinfo=timezone.utc)) == expected


def test_a_malformed_since_is_refused_naming_the_forms_allowed(capsys):
    assert cli.main(["cost", "--since", "last week"]) == 2
    assert "--since: 'last week' is not a date (2026-12-01)" in capsys.readouterr().err


@pytest.mark.usefixtures("airflow_db")
def test_stepops_cost_adds_up_the_charges_the_steps_recorded(capsys):
    from tests.dags.cost_steps import cost_steps

    from .test_operator import _run, _xcom

    run, tis = _run(cost_steps)
    recorded = {task_id: sum(c["amount"] for c in _xcom(tis[task_id], "stepops_job")["charges"])
                for task_id in ("paid", "stopped", "timed_out", "retried")}
    assert all(amount > 0 for amount in recorded.values()), recorded
    capsys.readouterr()  # what the run printed
    assert cli.main(["cost", "--dag", "cost_steps", "--by", "run", "--format", "json"]) == 0
    rows = {row["run_id"]: row for row in json.loads(capsys.readouterr().out)}  # other tests may run the DAG too
    assert rows[run.run_id]["amount"] == pytest.approx(sum(recorded.values()))
    assert rows[run.run_id]["attempts"] == 5  # paid, stopped, timed_out and retried's two tries (refused had no job)
    assert cli.main(["cost", "--dag", "cost_steps", "--since", "2999-01-01", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == []  # nothing ended since
