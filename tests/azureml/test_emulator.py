"""The Azure ML emulator, driven through the real azure-ai-ml SDK and azure-storage-blob, as a flavor would."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from azure.ai.ml import Input, MLClient, Output, command
from azure.ai.ml.constants import ListViewType
from azure.ai.ml.entities import Environment, QueueSettings, ResourceConfiguration
from azure.ai.ml.exceptions import JobException
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

from airflow_stepops.testing.azureml import (
    NODE_LOST_ERROR,
    PREEMPTION_ERROR,
    AzureMLEmulator,
    AzuriteNotFoundError,
    StaticTokenCredential,
)
from airflow_stepops.testing.azureml._azurite import find_azurite

from ..emulated import emulator_process, eventually

IMAGE = Environment(image="mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:latest")
EMULATOR_KEYS = {"AZUREML_DEV_URL_MFE", "REQUESTS_CA_BUNDLE", "AZURE_STORAGE_CONNECTION_STRING", "IDENTITY_ENDPOINT"}

#: reads the input folder and the uri_file input, writes both outputs, shows what the process sees
IO_SCRIPT = r"""
import os, sys
data, table, out, summary = sys.argv[1:5]
text = open(os.path.join(data, "x.txt")).read()
open(os.path.join(out, "y.txt"), "w").write(text.upper())
open(summary, "w").write("rows=" + str(len(open(table).read().splitlines())))
print("read:", text.strip())
print("n:", sys.argv[5])
print("interpreter prefix:", sys.prefix)
for key in ("AZUREML_RUN_ID", "AZUREML_ARM_SUBSCRIPTION", "AZUREML_ARM_WORKSPACE_NAME", "GREETING",
            "PYTHONUNBUFFERED", "STEPOPS_HOST_ONLY"):
    print(key + "=" + os.environ.get(key, "<unset>"))
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


@pytest.fixture(scope="module")
def aml() -> Any:
    with AzureMLEmulator(stop_grace_period=1, queue_seconds=0.2, prepare_seconds=0.2, page_size=3) as emulator:
        yield emulator


@pytest.fixture(scope="module")
def ml_client(aml: AzureMLEmulator) -> MLClient:
    return aml.ml_client()


@pytest.fixture(scope="module")
def blobs(aml: AzureMLEmulator) -> Any:
    return aml.blob_service_client()


def job_url(aml: AzureMLEmulator, name: str) -> str:
    cfg = aml.config
    return (f"{aml.base_url}/subscriptions/{cfg.subscription_id}/resourceGroups/{cfg.resource_group}/providers/"
            f"Microsoft.MachineLearningServices/workspaces/{cfg.workspace_name}/jobs/{name}"
            "?api-version=2025-01-01-preview")


def test_command_job_reads_inputs_writes_outputs_and_walks_the_statuses(aml, ml_client, blobs, monkeypatch,
                                                                        tmp_path):
    monkeypatch.setenv("STEPOPS_HOST_ONLY", "leaked")
    store = aml.datastores["workspaceblobstore"]
    blobs.get_blob_client(store, "in/x.txt").upload_blob(b"hello from azurite\n", overwrite=True)
    aml.create_container("tables")
    blobs.get_blob_client("tables", "t/rows.csv").upload_blob(b"a,b\n1,2\n3,4\n", overwrite=True)
    script = tmp_path / "io.py"
    script.write_text(IO_SCRIPT)
    job = command(
        command=f"python3 {script} ${{{{inputs.data}}}} ${{{{inputs.table}}}} ${{{{outputs.out}}}} "
                "${{outputs.summary}} ${{inputs.n}}",
        environment=IMAGE, compute="cpu-cluster", name="emu-io", experiment_name="emulator-tests",
        inputs={"data": Input(type="uri_folder", path="azureml://datastores/workspaceblobstore/paths/in/"),
                "table": Input(type="uri_file", path="https://devstoreaccount1.blob.core.windows.net/tables/t/rows.csv",
                               mode="download"),
                "n": 7},
        outputs={"out": Output(type="uri_folder", mode="rw_mount"),
                 "summary": Output(type="uri_file", path="azureml://datastores/workspaceblobstore/paths/sums/s.txt",
                                   mode="upload")},
        environment_variables={"GREETING": "hi"}, shm_size="4g", instance_count=1)
    first = len(aml.requests)
    created = ml_client.jobs.create_or_update(job)
    assert created.status == "NotStarted"
    create_calls = [(r["method"], r["path"].rsplit("/workspaces/stepops-ws", 1)[-1].split("/")[1])
                    for r in aml.requests[first:]]
    assert create_calls == [("PUT", "environments"), ("PUT", "jobs")]  # what jobs.create_or_update sends

    done = aml.wait_for_status("emu-io", "Completed")
    assert [h["status"] for h in done["history"]] == ["NotStarted", "Queued", "Preparing", "Running", "Finalizing",
                                                      "Completed"]
    assert done["properties"]["resources"]["shmSize"] == "4g"
    assert done["properties"]["outputs"]["out"]["uri"] == "azureml://datastores/workspaceblobstore/paths/azureml/emu-io/out/"
    assert blobs.get_blob_client(store, "azureml/emu-io/out/y.txt").download_blob().readall() == b"HELLO FROM AZURITE\n"
    assert blobs.get_blob_client(store, "sums/s.txt").download_blob().readall() == b"rows=3"
    lines = aml.logs("emu-io")
    assert "read: hello from azurite" in lines and "n: 7" in lines
    assert f"interpreter prefix: {sys.prefix}" in lines
    assert {"AZUREML_RUN_ID=emu-io", f"AZUREML_ARM_SUBSCRIPTION={aml.config.subscription_id}",
            "AZUREML_ARM_WORKSPACE_NAME=stepops-ws", "GREETING=hi", "PYTHONUNBUFFERED=1",
            "STEPOPS_HOST_ONLY=<unset>"} <= set(lines)
    assert (aml.job_dir("emu-io") / "inputs" / "data" / "x.txt").read_text() == "hello from azurite\n"

    fetched = ml_client.jobs.get("emu-io")
    assert fetched.status == "Completed" and fetched.compute == "cpu-cluster"
    assert fetched.environment_variables == {"GREETING": "hi"}
    assert fetched.outputs["out"].path == "azureml://datastores/workspaceblobstore/paths/azureml/emu-io/out/"
    assert fetched.creation_context.created_at is not None
    assert fetched.studio_url.startswith("https://ml.azure.com/runs/emu-io?wsid=/subscriptions/")
    assert ml_client.datastores.get_default().container_name == store
    assert ml_client.compute.get("lowpri-cluster").tier == "low_priority"


def test_stream_prints_the_job_lines_while_it_runs(aml, ml_client, monkeypatch):
    class TimedOut(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.writes: list[tuple[float, str]] = []

        def write(self, text: str) -> int:
            self.writes.append((time.time(), text))
            return super().write(text)

    ml_client.jobs.create_or_update(command(command="echo first line; sleep 4; echo second line",
                                            environment=IMAGE, compute="cpu-cluster", name="emu-stream"))
    out = TimedOut()
    monkeypatch.setattr(sys, "stdout", out)
    ml_client.jobs.stream("emu-stream")
    monkeypatch.undo()
    printed = out.getvalue()
    assert "Streaming user_logs/std_log.txt" in printed
    assert printed.index("first line") < printed.index("second line") < printed.index("Execution Summary")
    first_at = next(t for t, text in out.writes if text.startswith("first line"))
    assert first_at < epoch(aml.job("emu-stream")["ended_at"])  # printed live, before the job ended
    plain = requests.get(f"{aml.base_url}/emulator/jobs/emu-stream/logs", verify=aml.ca_bundle, timeout=10)
    assert plain.text == "first line\nsecond line\n"
    # run history, as jobs.stream reads it: logFiles holds a SAS URL into Azurite's artifact container
    history = f"{aml.base_url}/history/v1.0{aml.config.workspace_path}"
    auth = {"Authorization": "Bearer x"}
    details = requests.get(f"{history}/runs/emu-stream/details", headers=auth, verify=aml.ca_bundle, timeout=10).json()
    assert details["status"] == "Completed" and details["target"] == "cpu-cluster"
    log_url = details["logFiles"]["user_logs/std_log.txt"]
    assert log_url.startswith(f"{aml.blob_endpoint}/azureml/ExperimentRun/dcid.emu-stream/user_logs/std_log.txt?")
    assert requests.get(log_url, timeout=10).text == plain.text
    content = requests.get(f"{history}/experiments/Default/runs/emu-stream/artifacts/contentinfo",
                           params={"path": "user_logs/std_log.txt"}, headers=auth, verify=aml.ca_bundle, timeout=10)
    assert requests.get(content.json()["contentUri"], timeout=10).text == plain.text


def test_non_zero_exit_fails_the_job_like_azure(aml, ml_client):
    ml_client.jobs.create_or_update(command(command="echo reading; echo 'bad input' >&2; exit 3",
                                            environment=IMAGE, compute="cpu-cluster", name="emu-fail"))
    done = aml.wait_for_status("emu-fail", "Failed")
    assert done["error"]["code"] == "UserError"
    assert done["error"]["message"] == (
        "Execution failed. User process 'echo' exited with status code 3. Please check log file "
        "'user_logs/std_log.txt' for error details. Error: reading\nbad input")
    assert "Finalizing" in [h["status"] for h in done["history"]]
    with pytest.raises(JobException, match="exited with status code 3"):
        ml_client.jobs.stream("emu-fail")
    assert ml_client.jobs.get("emu-fail").status == "Failed"


def test_limits_timeout_kills_the_process_and_cancels_the_job(aml, ml_client):
    """CommandJobLimits.timeout: "the max run duration ..., after which the job will be cancelled"."""
    began = time.monotonic()
    ml_client.jobs.create_or_update(command(command="sleep 60", environment=IMAGE, compute="cpu-cluster",
                                            name="emu-timeout", timeout=1))
    done = aml.wait_for_status("emu-timeout", "Canceled")
    assert time.monotonic() - began < 10
    assert done["properties"]["limits"]["timeout"] == "PT1S" and done["error"] is None
    assert [h["status"] for h in done["history"]][-2:] == ["CancelRequested", "Canceled"]
    assert epoch(done["ended_at"]) - epoch(done["started_at"]) >= 1
    assert aml.pids("emu-timeout") == [] and ml_client.jobs.get("emu-timeout").limits.timeout == 1


def test_a_lost_create_reply_leaves_the_job_created(aml, ml_client):
    fault = aml.lose_replies("drop", method="PUT", path_contains="/jobs/emu-lost")
    job = ml_client.jobs.create_or_update(command(command="true", environment=IMAGE, compute="cpu-cluster",
                                                  name="emu-lost"))
    assert job.name == "emu-lost" and fault.hits == 1  # azure-core retried the PUT: the job answered, 200
    puts = [r["status"] for r in aml.requests if r["method"] == "PUT" and r["path"].endswith("/jobs/emu-lost")]
    assert puts == [None, 200] and [j["name"] for j in aml.jobs].count("emu-lost") == 1


def test_begin_cancel_terminates_the_process(aml, ml_client):
    ml_client.jobs.create_or_update(command(command="trap 'echo got SIGTERM; exit 0' TERM; echo up; sleep 60 & wait",
                                            environment=IMAGE, compute="cpu-cluster", name="emu-cancel"))
    aml.wait_for_status("emu-cancel", "Running")
    eventually(lambda: "up" in aml.logs("emu-cancel"), 10, "the process to start")
    [pid] = aml.pids("emu-cancel")
    poller = ml_client.jobs.begin_cancel("emu-cancel")
    poller.result(timeout=20)
    assert poller.status() == "Succeeded"
    done = aml.job("emu-cancel")
    assert done["status"] == "Canceled"
    assert "CancelRequested" in [h["status"] for h in done["history"]]
    assert not alive(pid) and aml.pids("emu-cancel") == []
    assert "got SIGTERM" in aml.logs("emu-cancel")
    assert ml_client.jobs.get("emu-cancel").status == "Canceled"
    methods = [(r["method"], r["status"]) for r in aml.requests if "emu-cancel" in r["path"] + str(r["query"])]
    assert ("POST", 202) in methods and ("GET", 200) in methods  # the cancel and its operation-result poll


def test_list_pages_with_skip_tokens_and_filters_by_tag_and_archive(aml, ml_client):
    names = [f"emu-list-{i}" for i in range(4)]
    for name in names:
        ml_client.jobs.create_or_update(command(command="true", environment=IMAGE, compute="cpu-cluster",
                                                name=name, tags={"suite": "paging"}))
    first = len(aml.requests)
    listed = [j.name for j in ml_client.jobs.list(tag="suite")]
    assert listed == names[::-1]  # newest first, across two pages of three
    assert sum(1 for r in aml.requests[first:] if "$skipToken" in r["query"]) == 1
    assert {j.name for j in ml_client.jobs.list()} >= set(names)  # with the jobs of other tests of this emulator
    aml.wait_for_status("emu-list-0", "Completed")
    ml_client.jobs.archive("emu-list-0")
    assert "emu-list-0" not in [j.name for j in ml_client.jobs.list(tag="suite")]
    assert [j.name for j in ml_client.jobs.list(list_view_type=ListViewType.ARCHIVED_ONLY)] == ["emu-list-0"]


def test_invalid_requests_answer_arm_errors(aml, ml_client):
    headers = {"Authorization": "Bearer anything"}
    valid = {"properties": {"jobType": "Command", "command": "echo ${{inputs.a}}", "environmentId": "azureml:AzureML-x:1",
                            "computeId": f"{aml.config.workspace_path}/computes/cpu-cluster",
                            "inputs": {"a": {"jobInputType": "literal", "value": "1"}}}}

    def put(name: str, props: dict[str, Any] | None = None, **kw: Any) -> requests.Response:
        body = {"properties": {**valid["properties"], **(props or {})}}
        return requests.put(job_url(aml, name), json=body, headers=kw.get("headers", headers), verify=aml.ca_bundle,
                            timeout=10)

    cases = [({"command": None}, "ValidationError", "command is required"),
             ({"jobType": "Pipeline"}, "ValidationError", "Command jobs only"),
             ({"computeId": f"{aml.config.workspace_path}/computes/nope"}, "UserError", "Compute nope was not found"),
             ({"computeId": None}, "ValidationError", "resources.instanceType"),
             ({"inputs": {"a": {"jobInputType": "uri_folder", "uri": "azureml://datastores/workspaceblobstore/paths/x",
                                "mode": "Upload"}}}, "ValidationError", "is not an input mode"),
             ({"inputs": {"a": {"jobInputType": "uri_folder", "uri": "s3://bucket/key"}}}, "UserError", "s3://"),
             ({"command": "echo ${{outputs.missing}}"}, "ValidationError", "outputs.missing"),
             ({"limits": {"jobLimitsType": "Command", "timeout": "soon"}}, "ValidationError", "limits.timeout"),
             ({"queueSettings": {"jobTier": "Cheap"}}, "ValidationError", "jobTier"),
             ({"experimentName": "my experiment"}, "ValidationError", "Experiment name must be between 1 and 255"),
             ({"experimentName": "_x"}, "ValidationError", "first character has to be alphanumeric"),
             ({"experimentName": "x" * 256}, "ValidationError", "Experiment name"),
             ({"tags": {"k" * 101: "v"}}, "ValidationError", "keys must have 1 to 100 characters"),
             ({"tags": {"k": "v" * 1001}}, "ValidationError", "values at most 1000"),
             ({"tags": {f"t{i}": "v" for i in range(51)}}, "ValidationError", "51 tags; at most 50"),
             ({"properties": {"p" * 101: "v"}}, "ValidationError", "keys must have 1 to 100"),
             ({"displayName": "d" * 257}, "ValidationError", "displayName must have at most 256"),
             ({"description": "d" * 5001}, "ValidationError", "description must have at most 5000")]
    for name in ("emu.dotted", "-emu", "e" * 256):
        answer = put(name)
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "ValidationError", (name, answer.text)
    assert put("7" + "e" * 254).status_code == 201  # the REST API's pattern: 255 characters, a digit may lead
    for props, code, text in cases:
        answer = put("emu-invalid", props)
        assert answer.status_code == 400, (props, answer.text)
        error = answer.json()["error"]
        assert error["code"] == code and text in error["message"], (props, error)
    assert "emu-invalid" not in [j["name"] for j in aml.jobs]
    created = put("emu-raw", {"command": "echo a=${{inputs.a}} $[[b=${{inputs.b}}]]"})  # b is optional, not given
    assert created.status_code == 201 and created.json()["properties"]["status"] == "NotStarted"
    assert aml.wait_for_status("emu-raw", "Completed") and aml.logs("emu-raw") == ["a=1"]
    assert put("emu-invalid", headers={}).json()["error"]["code"] == "AuthenticationFailed"
    no_version = requests.get(job_url(aml, "emu-io").split("?")[0], headers=headers, verify=aml.ca_bundle, timeout=10)
    assert no_version.status_code == 400 and no_version.json()["error"]["code"] == "MissingApiVersionParameter"
    with pytest.raises(ResourceNotFoundError):
        ml_client.jobs.get("emu-no-such-job")
    with pytest.raises(HttpResponseError, match="Compute nope was not found") as raised:
        ml_client.jobs.create_or_update(command(command="true", environment=IMAGE, compute="nope", name="emu-bad"),
                                        skip_validation=True)
    assert raised.value.status_code == 400


def test_a_second_put_returns_the_job_or_refuses_a_change(aml, ml_client):
    job = command(command="echo once", environment=IMAGE, compute="cpu-cluster", name="emu-twice", tags={"a": "1"})
    first = ml_client.jobs.create_or_update(job)
    again = ml_client.jobs.create_or_update(
        command(command="echo once", environment=IMAGE, compute="cpu-cluster", name="emu-twice", tags={"b": "2"}))
    assert again.creation_context.created_at == first.creation_context.created_at
    assert again.tags == {"a": "1", "b": "2"}  # tags may change (they merge); the job is not re-run
    assert len([j for j in aml.jobs if j["name"] == "emu-twice"]) == 1
    with pytest.raises(HttpResponseError, match="A job with this name already exists") as raised:
        ml_client.jobs.create_or_update(command(command="echo twice", environment=IMAGE, compute="cpu-cluster",
                                                name="emu-twice"))
    assert raised.value.status_code == 400 and raised.value.error.code == "UserError"


def test_preemption_fails_spot_jobs_with_the_preemption_error_and_others_with_a_node_failure(aml, ml_client):
    aml.inject("preemption", job="emu-spot", after=0.3)
    aml.inject("preemption", job="emu-dedicated", after=0.3)
    aml.inject("preemption", job="emu-lowpri", after=0.3)
    spot = command(command="sleep 60", environment=IMAGE, name="emu-spot", queue_settings=QueueSettings(job_tier="Spot"))
    spot.resources = ResourceConfiguration(instance_type="Standard_NC6s_v3", instance_count=2)
    ml_client.jobs.create_or_update(spot)
    ml_client.jobs.create_or_update(command(command="sleep 60", environment=IMAGE, compute="cpu-cluster",
                                            name="emu-dedicated"))
    ml_client.jobs.create_or_update(command(command="sleep 60", environment=IMAGE, compute="lowpri-cluster",
                                            name="emu-lowpri"))
    done = aml.wait_for_status("emu-spot", "Failed")
    assert done["error"] == PREEMPTION_ERROR and done["spot"]
    assert done["properties"]["queueSettings"] == {"jobTier": "Spot"}
    assert done["properties"]["resources"]["instanceType"] == "Standard_NC6s_v3"
    assert done["properties"]["resources"]["instanceCount"] == 2
    assert aml.wait_for_status("emu-dedicated", "Failed")["error"] == NODE_LOST_ERROR
    assert aml.wait_for_status("emu-lowpri", "Failed")["error"] == PREEMPTION_ERROR


def test_preemption_strikes_a_job_already_running(aml, ml_client):
    job = command(command="sleep 60", environment=IMAGE, name="emu-spot-running",
                  queue_settings=QueueSettings(job_tier="Spot"))
    job.resources = ResourceConfiguration(instance_type="Standard_D4s_v3", instance_count=1)
    ml_client.jobs.create_or_update(job)
    aml.wait_for_status("emu-spot-running", "Running")
    aml.inject("preemption", job="emu-spot-running")
    assert aml.wait_for_status("emu-spot-running", "Failed")["error"] == PREEMPTION_ERROR


def test_quota_exceeded_refuses_the_create(aml, ml_client):
    aml.inject("quota_exceeded", job="emu-quota")
    job = command(command="true", environment=IMAGE, name="emu-quota")
    job.resources = ResourceConfiguration(instance_type="Standard_NC6s_v3", instance_count=2)
    with pytest.raises(HttpResponseError, match="JobNodeCountExceedsCoreQuota") as raised:
        ml_client.jobs.create_or_update(job)
    assert raised.value.status_code == 400
    assert "Standard NCSv3 family vCPU quota of 0" in raised.value.message
    assert "emu-quota" not in [j["name"] for j in aml.jobs]
    ml_client.jobs.create_or_update(job)  # the fault was used up
    aml.wait_for_status("emu-quota", "Completed")


def test_failure_and_slow_start_faults(aml, ml_client):
    aml.inject("failure", job="emu-broken", after=0.2, message="disk on fire")
    aml.inject("slow_start", job="emu-slow", duration=1.0)
    ml_client.jobs.create_or_update(command(command="sleep 60", environment=IMAGE, compute="cpu-cluster",
                                            name="emu-broken"))
    ml_client.jobs.create_or_update(command(command="true", environment=IMAGE, compute="cpu-cluster",
                                            name="emu-slow"))
    assert aml.wait_for_status("emu-broken", "Failed")["error"] == {"code": "SystemError", "message": "disk on fire"}
    slow = aml.wait_for_status("emu-slow", "Completed")
    times = {h["status"]: epoch(h["time"]) for h in slow["history"]}
    assert times["Preparing"] - times["Queued"] >= 1.0 + 0.2


def test_fail_requests_answers_api_errors(aml, ml_client):
    ml_client.jobs.create_or_update(command(command="true", environment=IMAGE, compute="cpu-cluster", name="emu-retry"))
    aml.wait_for_status("emu-retry", "Completed")
    fault = aml.fail_requests(503, "ServiceUnavailable", path_contains="/jobs/emu-retry")
    assert ml_client.jobs.get("emu-retry").status == "Completed"  # azure-core retried after Retry-After
    assert fault.hits == 1
    statuses = [r["status"] for r in aml.requests if r["path"].endswith("/jobs/emu-retry")][-2:]
    assert statuses == [503, 200]
    aml.fail_requests(409, "Conflict", times=1, path_contains="/jobs/emu-retry", method="GET",
                      message="try again later")
    with pytest.raises(HttpResponseError, match="try again later") as raised:
        ml_client.jobs.get("emu-retry")
    assert raised.value.status_code == 409 and raised.value.error.code == "Conflict"


def test_static_credential_behaves_like_an_azure_identity_credential(aml):
    with StaticTokenCredential() as credential:
        token = credential.get_token("https://management.azure.com/.default", tenant_id="t")
        info = credential.get_token_info("https://ml.azure.com/.default")
    claims = jwt.decode(token.token, options={"verify_signature": False})
    assert claims["aud"] == "https://management.azure.com" and claims["tid"]
    assert token.expires_on > time.time() + 3600 and info.token_type == "Bearer"
    assert jwt.decode(info.token, options={"verify_signature": False})["aud"] == "https://ml.azure.com"


SDK_CALL = """
import os
from azure.ai.ml import MLClient
from azure.identity import DefaultAzureCredential
client = MLClient(DefaultAzureCredential(), os.environ["AZURE_SUBSCRIPTION_ID"], os.environ["AZURE_RESOURCE_GROUP"],
                  os.environ["AZUREML_WORKSPACE_NAME"])
print("workspace:", client.workspaces.get(os.environ["AZUREML_WORKSPACE_NAME"]).name)
"""


def test_runs_as_a_process(tmp_path: Path):
    with emulator_process("azureml", tmp_path / "azureml.env", "--container", "data",
                          "--workdir", str(tmp_path / "work")) as values:  # shell-quoted: KEY='value;with=specials'
        assert EMULATOR_KEYS <= set(values)
        child_env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE", "IDENTITY", "MSI"))}
        result = subprocess.run([sys.executable, "-c", SDK_CALL], env={**child_env, **values}, capture_output=True,
                                text=True, timeout=120)
        assert "workspace: stepops-ws" in result.stdout, result.stderr[-3000:]
        from azure.storage.blob import BlobServiceClient

        containers = BlobServiceClient.from_connection_string(values["AZURE_STORAGE_CONNECTION_STRING"])
        assert "data" in [c.name for c in containers.list_containers()]


def test_stop_kills_jobs_stops_azurite_and_removes_its_workdir():
    with AzureMLEmulator(queue_seconds=0, prepare_seconds=0) as emulator:
        emulator.ml_client().jobs.create_or_update(command(command="sleep 60", environment=IMAGE,
                                                           compute="cpu-cluster", name="emu-orphan"))
        emulator.wait_for_status("emu-orphan", "Running")
        eventually(lambda: emulator.pids("emu-orphan"), 10, "the job process")
        [pid] = emulator.pids("emu-orphan")
        workdir, blob_port = emulator.workdir, int(emulator.blob_endpoint.split(":")[2].split("/")[0])
    assert not alive(pid)
    assert workdir is not None and not workdir.exists()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", blob_port), timeout=1):
        pass


def test_a_missing_azurite_says_to_run_npm_ci(tmp_path, monkeypatch):
    monkeypatch.delenv("AZURITE_BIN", raising=False)
    with pytest.raises(AzuriteNotFoundError, match="npm ci"):
        find_azurite([tmp_path], use_path=False)
    monkeypatch.setenv("AZURITE_BIN", str(tmp_path / "azurite-blob"))
    with pytest.raises(AzuriteNotFoundError, match="npm ci"):
        find_azurite()
