"""The vertex flavor against the emulator: google-cloud-aiplatform over REST (sync and async), real job
processes reading and writing the artifact store through the emulated /gcs/ mount."""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("google.cloud.aiplatform_v1")

from airflow_stepops.artifacts import store_path
from airflow_stepops.bundle import read_outcome, replace_refs
from airflow_stepops.exceptions import StepOperatorConfigError
from airflow_stepops.resources import ResourceSettings
from airflow_stepops.runtime.protocol import ENTRY_FILE, Env
from airflow_stepops.settings.vertex import VertexStepOperatorSettings

from ..flavorjobs import hook_maker, make_spec, poll_together, run_trigger, stored_ref
from ..steps import greet, print_lines, sleep_then_return

make_hook = hook_maker("vertex")

pytestmark = pytest.mark.usefixtures("vx_emulator")


def test_step_runs_as_a_custom_job_with_logs_and_result(vx_emulator):
    hook = make_hook()
    handle = hook.submit(make_spec(hook, greet, "ada", task_id="greet",
                                   resources=ResourceSettings(gpu_type="L4", memory="16GB")))
    event = run_trigger(hook, handle)
    assert event["status"] == "succeeded", event
    assert "hello ada from vertex" in event["log_tail"]
    result = read_outcome(store_path(handle["output_uri"])).value
    assert result["greeting"] == "hi ada" and "/gcs/stepops-tests/artifacts/vx_tests/" in result["bundle"]
    job = vx_emulator.job(handle["job_id"])
    machine = job["jobSpec"]["workerPoolSpecs"][0]["machineSpec"]
    assert machine == {"machineType": "g2-standard-4", "acceleratorType": "NVIDIA_L4", "acceleratorCount": 1}
    assert job["labels"]["stepops-task"] == "greet" and job["labels"]["team"] == "ml"
    assert job["labels"]["stepops-run"] == "run-1"  # the conformance harness finds a run's jobs by it
    assert hook.console_url(handle) == (f"https://console.cloud.google.com/vertex-ai/locations/us-central1/training/"
                                        f"{handle['job_id']}/cpu?project={vx_emulator.project}")


def test_every_rendered_body_parses_into_the_proto():
    from google.cloud.aiplatform_v1.types import CustomJob

    hook = make_hook()
    spec = make_spec(hook, greet, "x", task_id="render", timeout_seconds=600,
                     settings=VertexStepOperatorSettings(machine_type="n1-standard-8", accelerator_type="T4",
                                                         accelerator_count=2, use_spot=True, disk_size_gb=200,
                                                         boot_disk_type="pd-standard", labels={"cost": "r_d"}))
    body = hook.render(spec)
    job = CustomJob.from_json(__import__("json").dumps(body))
    pool = job.job_spec.worker_pool_specs[0]
    assert pool.machine_spec.accelerator_type.name == "NVIDIA_TESLA_T4" and pool.machine_spec.accelerator_count == 2
    assert job.job_spec.scheduling.strategy.name == "SPOT"
    assert job.job_spec.scheduling.timeout.total_seconds() == 660  # execution_timeout + 60 s backstop
    assert job.job_spec.scheduling.disable_retries  # Airflow owns retries, not Vertex
    assert pool.disk_spec.boot_disk_size_gb == 200 and pool.disk_spec.boot_disk_type == "pd-standard"
    env = {e.name: e.value for e in pool.container_spec.env}
    assert env[Env.OUTPUT_PATH].startswith("/gcs/stepops-tests/") and "@" not in env[Env.OUTPUT_PATH]
    assert pool.container_spec.command[1] == env[Env.BUNDLE_PATH] + "/" + ENTRY_FILE


@pytest.mark.parametrize(("lines", "late"), [(15, (3, 1.0)), (3, (1, 4.0))], ids=["out_of_order", "after_the_end"])
def test_log_lines_ingested_late_are_shown_once(vx_emulator, lines, late):
    """Every third line reaching Cloud Logging a second late (while the job still runs); or every line 4 s late,
    after the job has ended and within the connection's log_settle_seconds (2 s) of its end."""
    hook = make_hook()
    handle = hook.submit(make_spec(hook, print_lines, lines, 0.1, 2.5, task_id=f"late_logs_{lines}"))
    vx_emulator.late_logs = late
    try:
        event = run_trigger(hook, handle)
    finally:
        vx_emulator.late_logs = None
    assert event["status"] == "succeeded", event
    shown = [line for line in event["log_tail"] if line.startswith("line ")]
    in_order = shown if late[0] == 1 else sorted(shown, key=lambda line: int(line.split()[1]))
    assert in_order == [f"line {i}" for i in range(lines)], shown


def _count_runs(path: str) -> int:
    with open(path, "a") as fh:  # a side effect on the host: how often the step ran
        fh.write("ran\n")
    return 42


def _fail_once_counted(path: str) -> None:
    _count_runs(path)
    raise RuntimeError("boom")


def test_a_failing_step_runs_once_vertex_does_not_retry_it(vx_emulator, tmp_path):
    hook = make_hook()
    runs = tmp_path / "runs"
    handle = hook.submit(make_spec(hook, _fail_once_counted, str(runs), task_id="no_vertex_retries"))
    event = run_trigger(hook, handle)
    assert event["status"] == "failed", event
    assert runs.read_text().count("ran") == 1  # Airflow owns retries


def test_a_worker_restart_after_the_step_finished_does_not_run_it_again(vx_emulator, tmp_path):
    hook = make_hook()
    runs = tmp_path / "runs"
    spec = make_spec(hook, _count_runs, str(runs), task_id="restarted_after_result")
    vx_emulator.inject("restart", on_exit=True)  # VM maintenance right as the step ends: the replica reruns
    handle = hook.submit(spec)
    event = run_trigger(hook, handle)
    assert event["status"] == "succeeded", event
    assert runs.read_text().count("ran") == 1
    assert read_outcome(store_path(handle["output_uri"])).value == 42
    assert any("not running it again" in line for line in vx_emulator.logs(handle["job_id"]))


def test_spot_preemption_is_preemption(vx_emulator):
    hook = make_hook()
    handle = hook.submit(make_spec(hook, sleep_then_return, 60, task_id="spot",
                                   settings=VertexStepOperatorSettings(use_spot=True)))
    vx_emulator.wait_for_state(handle["job_id"], ["JOB_STATE_RUNNING"])
    vx_emulator.inject("preemption", job=handle["job_id"], after=0.5)
    event = run_trigger(hook, handle)
    assert event["status"] == "preempted" and event["details"]["reason"] == "preempted", event


def test_outcomes_come_from_error_codes_not_from_message_words(vx_emulator):
    hook = make_hook()
    handle = hook.submit(make_spec(hook, sleep_then_return, 60, task_id="wordy_failure"))
    vx_emulator.wait_for_state(handle["job_id"], ["JOB_STATE_RUNNING"])
    vx_emulator.inject("failure", job=handle["job_id"], code=13, after=0.2,
                       message="step output: preempted? timed out! Resources are insufficient in region")
    event = run_trigger(hook, handle)
    assert event["status"] == "failed" and "reason" not in event["details"], event


def test_stockout_is_a_capacity_failure(vx_emulator):
    hook = make_hook()
    spec = make_spec(hook, greet, "x", task_id="stockout")
    vx_emulator.inject("stockout")
    event = run_trigger(hook, hook.submit(spec))
    assert event["status"] == "failed" and event["details"]["reason"] == "stockout", event
    assert event["details"]["error_code"] == 8, event


@pytest.mark.parametrize("held", [0.0, 20.0], ids=["connection_dropped", "reply_never_sent"])
def test_a_lost_create_reply_finds_the_job_instead_of_hanging_or_creating_another(vx_emulator, monkeypatch, held):
    hook = make_hook("vx_fast_timeout", monkeypatch=monkeypatch, api_timeout_seconds=1)
    spec = make_spec(hook, greet, "lost", task_id=f"lost_reply_{int(held)}")
    vx_emulator.inject("lost_create_reply", duration=held)
    vx_emulator.list_lag = 1.5  # and the new job shows up in lists only a while later
    try:
        handle = hook.submit(spec)
        # a 1 s call timeout, then a look-up: the submit did not wait for a reply that was still held back
        waited_for_reply = held and not vx_emulator.reply_held(handle["name"])
    finally:
        vx_emulator.list_lag = 0.0
    labelled = [j for j in vx_emulator.jobs if j["labels"].get("stepops-step") == spec.identity.digest[:40]]
    assert [j["name"] for j in labelled] == [handle["name"]]
    assert not waited_for_reply
    assert run_trigger(hook, handle)["status"] == "succeeded"


def test_gcs_artifact_refs_are_read_in_place(vx_emulator):
    hook = make_hook()
    refs: list = []
    spec = make_spec(hook, sum, *replace_refs([stored_ref(hook, [1, 2, 3])], refs), task_id="ref_consumer", refs=refs)
    env = {e["name"]: e["value"] for e in hook.render(spec)["jobSpec"]["workerPoolSpecs"][0]["containerSpec"]["env"]}
    assert '"/gcs/stepops-tests/' in env[Env.REFS]
    handle = hook.submit(spec)
    assert run_trigger(hook, handle)["status"] == "succeeded"
    assert read_outcome(store_path(handle["output_uri"])).value == 6


def test_missing_project_is_a_clear_error(monkeypatch, vx_emulator):
    import json

    monkeypatch.setenv("AIRFLOW_CONN_NO_PROJECT_GCP", json.dumps({"conn_type": "google_cloud_platform", "extra": {
        "keyfile_dict": json.dumps({**vx_emulator.service_account_info(), "project_id": ""})}}))
    monkeypatch.setenv("AIRFLOW_CONN_VX_NO_PROJECT", json.dumps({"conn_type": "stepops_vertex", "extra": {
        "gcp_conn_id": "no_project_gcp", "location": "us-central1", "image": "i",
        "artifact_store": "gs://stepops-tests/artifacts", "api_endpoint": vx_emulator.api_endpoint}}))
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    hook = make_hook("vx_no_project")
    with pytest.raises(StepOperatorConfigError, match="project: step operator 'vx_no_project' has no GCP project"):
        hook.submit(make_spec(hook, greet, "x", task_id="no_project"))


def test_shared_polling_lists_instead_of_reading_every_job(vx_emulator):
    from airflow_stepops.hooks.base import JobState

    hook = make_hook()
    handles = [hook.submit(make_spec(hook, sleep_then_return, 3, task_id=f"shared_{i}")) for i in range(4)]
    poller = make_hook()  # one hook instance, as a triggerer's shared poller keeps

    before = len(vx_emulator.requests)
    started = time.time()
    seen = asyncio.run(poll_together(poller, handles))
    calls = vx_emulator.requests[before:]
    gets = [r for r in calls if r["method"] == "GET" and "/customJobs/" in r["path"]]
    assert all(s.state is JobState.SUCCEEDED for s in seen[-1]), seen[-1]
    assert len(gets) == len(handles), gets  # each job read once; every later round is one list call
    assert len(calls) <= len(handles) + len(seen), (len(calls), len(seen), time.time() - started)



def test_an_escalated_attempt_runs_on_standard_capacity_and_no_spot_preemption_strikes_it(vx_emulator):
    hook = make_hook()
    spec = make_spec(hook, sleep_then_return, 2, task_id="escalated", settings=VertexStepOperatorSettings(use_spot=True))
    spec.on_demand = True
    rule = vx_emulator.inject("preemption", after=0.5, count=None)  # every new SPOT job
    try:
        handle = hook.submit(spec)
        event = run_trigger(hook, handle)
    finally:
        vx_emulator.clear_faults()
    assert (handle["spot"], handle["on_demand"]) == (False, True), handle
    assert event["status"] == "succeeded" and rule.applied == [], event
    assert vx_emulator.job(handle["job_id"])["jobSpec"]["scheduling"]["strategy"] == "STANDARD"
