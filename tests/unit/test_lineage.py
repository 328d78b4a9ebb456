"""OpenLineage: the events the OpenLineage provider sends for step tasks (captured with its file transport), from
``airflow dags test`` runs of tests/dags/step_features.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("airflow.providers.openlineage")
pytestmark = pytest.mark.usefixtures("airflow_db")


def _events(tmp_path, dag_id: str, **conf) -> dict[tuple[str, str], dict]:
    """``{(task_id, eventType): event}`` of one ``airflow dags test`` run with OpenLineage sending to a file."""
    path = tmp_path / "events.jsonl"
    env = {**os.environ, "AIRFLOW__OPENLINEAGE__NAMESPACE": "stepops-tests",
           "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps({"type": "file", "log_file_path": str(path), "append": True})}
    out = subprocess.run([sys.executable, "-m", "airflow", "dags", "test", dag_id, *(
        ["--conf", json.dumps(conf)] if conf else [])], env=env, capture_output=True, text=True, timeout=300)
    assert path.exists(), out.stdout[-3000:] + out.stderr[-3000:]
    found = {}
    for line in path.read_text().splitlines():
        event = json.loads(line)
        task = event["job"]["name"].removeprefix(f"{dag_id}.")
        found[(task, event["eventType"])] = event
    return found


def test_a_step_reports_the_artifacts_it_read_and_wrote_and_its_remote_job(tmp_path):
    events = _events(tmp_path, "step_artifacts")
    made, consumed = events[("make", "COMPLETE")], events[("consume", "COMPLETE")]
    (output,) = made["outputs"]  # the set stays in the artifact store: its file is the output
    assert output["namespace"] == "file" and output["name"].endswith(".pkl") and "/make/" in output["name"], output
    assert [(d["namespace"], d["name"]) for d in consumed["inputs"]] == [(output["namespace"], output["name"])]
    for event in (made, consumed):
        facets = event["run"]["facets"]
        job = facets["externalQuery"]
        assert job["source"] == "stepops_local" and job["externalQueryId"].startswith("step_artifacts-"), job
        assert facets["stepops_processing_engine"]["name"] == "airflow-stepops/local", facets
        assert facets["processing_engine"]["name"] == "Airflow", facets  # the provider's own stays
    assert ("consume", "START") in events


def test_a_failed_step_reports_its_remote_job(tmp_path):
    events = _events(tmp_path, "step_errors", marker=str(tmp_path / "marker"))
    failed = events[("broken", "FAIL")]
    assert failed["run"]["facets"]["externalQuery"]["source"] == "stepops_local", failed
    assert failed["outputs"] == [], failed
