"""The Modal emulator, driven through the real ``modal`` client only: sync, ``.aio``, and the raw stub the
flavor reads results with; the emulator's inspection helpers check what happened on its side."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import sys
import time
import traceback
import uuid
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from ..emulated import emulator_process, gone, running_pid

pytest.importorskip("modal")

import modal
import modal.exception
from grpclib import Status
from modal._utils.async_utils import synchronizer
from modal_proto import api_pb2

APP = "stepops-abc123"  # the flavor's shape: H100 falling back to A100-80GB, secrets, a volume
H100_APP = "stepops-h100x2"  # two H100s, no fallback, a 2 s timeout
BROKEN_APP = "stepops-broken"  # a function that cannot be loaded in its container
SECRET = "emulator-hf-token"  # not the session's shared hf-token, which other tests fill
GR = api_pb2.GenericResult


def _steps():
    """The functions under test, made in here so cloudpickle ships them by value: the container does not
    import this module. ``source`` picks the behaviour."""

    def run_step(bundle, source, env):
        import os
        import time

        if source == "env":
            return {"bundle": len(bundle), "env": env, "cwd": os.getcwd(),
                    "modal": {k: v for k, v in os.environ.items() if k.startswith("MODAL_") and "TOKEN" not in k},
                    "secrets": {k: os.environ.get(k) for k in ("HF_TOKEN", "A")},
                    "leaked": sorted(k for k in os.environ if k.startswith("STEPOPS_"))}
        if source == "echo":
            return bundle
        if source == "logs":
            print("out 1", flush=True)
            time.sleep(0.05)
            print("err 1", file=sys.stderr, flush=True)
            time.sleep(0.05)
            print("out 2", flush=True)
            return "logged"
        if source == "fail":
            print("loading data", flush=True)
            raise ValueError(f"step failed: {env['why']}")
        if source == "sleep":
            print("sleeping", flush=True)
            time.sleep(float(env.get("seconds", 30)))
            return "slept"
        if source == "attempt":  # note each task that ran the input; sleep; return them all
            with open(env["marker"], "a") as out:
                out.write(os.environ["MODAL_TASK_ID"] + "\n")
            time.sleep(float(env["seconds"]))
            with open(env["marker"]) as seen:
                return seen.read().split()
        raise AssertionError(f"unknown mode {source}")

    return run_step


def _unloadable():
    """A function whose pickle raises when loaded (its closure holds an object that cannot be rebuilt)."""

    def explode(message):
        raise RuntimeError(message)

    class Poison:
        def __reduce__(self):
            return explode, ("this object cannot be loaded in a container",)

    poison = Poison()

    def broken_step(bundle, source, env):
        return poison

    return broken_step


# ----- fixtures and helpers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(md_emulator):
    return modal.Client.from_credentials(md_emulator.token_id, md_emulator.token_secret)


def _deploy(client, name, fn, **options):
    app = modal.App(name)
    app.function(serialized=True, name="run_step", **options)(fn)
    app.deploy(name=name, environment_name="main", client=client)


@pytest.fixture(scope="module")
def deployed(md_emulator, client):
    """The three apps, deployed once; returns handles looked up by name, as the flavor does."""
    md_emulator.add_secret(SECRET, {"HF_TOKEN": "hf_secret"})
    _deploy(client, APP, _steps(), image=modal.Image.debian_slim(python_version="3.11").pip_install("numpy==2.1.0"),
            gpu=["H100", "A100-80GB"], cpu=4.0, memory=16384, timeout=3600, region="us-east", cloud="aws",
            secrets=[modal.Secret.from_name(SECRET, environment_name="main"), modal.Secret.from_dict({"A": "1"})],
            volumes={"/data": modal.Volume.from_name("datasets", create_if_missing=True, environment_name="main")},
            retries=0)
    _deploy(client, H100_APP, _steps(), image=modal.Image.from_registry("python:3.11-slim"), gpu="H100:2", timeout=2,
            region=["us-west", "eu-west"])
    _deploy(client, BROKEN_APP, _unloadable(), image=modal.Image.debian_slim(), timeout=60)
    handles = {}
    for name in (APP, H100_APP, BROKEN_APP):
        handles[name] = modal.Function.from_name(name, "run_step", environment_name="main", client=client)
        handles[name].hydrate()
    return handles


@pytest.fixture(autouse=True)
def _no_leftover_faults(md_emulator):
    yield
    md_emulator.clear_faults()


def raw_outputs(client, call_id: str) -> api_pb2.FunctionGetOutputsResponse:
    """``FunctionGetOutputs`` through the client's raw stub, as the flavor reads results (no unpickling). The
    stub's channel lives on the client's event loop (synchronicity's), so the coroutine runs there."""
    request = api_pb2.FunctionGetOutputsRequest(function_call_id=call_id, timeout=0, last_entry_id="0-0",
                                                clear_on_success=False, requested_at=time.time())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", modal.exception.InternalAPIWarning)
        stub = client.stub
    loop = synchronizer._get_loop(start=True)
    return asyncio.run_coroutine_threadsafe(stub.FunctionGetOutputs(request), loop).result(30)


def count(emu, method: str) -> int:
    return emu.requests.count(method)


# ----- client, auth, deploy -----------------------------------------------------------------------------


def test_hello_from_credentials_and_env_and_wrong_token(md_emulator, client):
    client.hello()
    modal.Client.from_env().hello()
    assert os.environ["MODAL_SERVER_URL"] == md_emulator.server_url
    assert md_emulator.env() == {"MODAL_SERVER_URL": md_emulator.server_url, "MODAL_TOKEN_ID": md_emulator.token_id,
                                 "MODAL_TOKEN_SECRET": md_emulator.token_secret, "MODAL_ENVIRONMENT": "main"}
    conn = json.loads(os.environ["AIRFLOW_CONN_MODAL_DEFAULT"])
    assert conn == {"conn_type": "modal", "login": md_emulator.token_id, "password": md_emulator.token_secret,
                    "extra": {"environment": "main"}}
    with pytest.raises(modal.exception.AuthError, match="invalid"):
        modal.Client.from_credentials(md_emulator.token_id, "as-wrong").hello()
    assert md_emulator.request_log[-1] == {**md_emulator.request_log[-1], "method": "ClientHello",
                                           "status": "UNAUTHENTICATED"}
    # an RPC the emulator does not serve says which
    with pytest.raises(modal.exception.UnimplementedError, match="QueueGetOrCreate"):
        modal.Queue.from_name("scratch", create_if_missing=True, client=client).hydrate()


def test_deploy_records_the_function_definition(md_emulator, deployed):
    fn = md_emulator.function(APP, "run_step")
    assert fn["gpu"] == ["H100", "A100-80GB"]  # a fallback list: one ranked function per type
    assert fn["gpus"] == [{"type": "H100", "count": 1}, {"type": "A100-80GB", "count": 1}]
    assert (fn["cpu"], fn["milli_cpu"], fn["memory_mb"], fn["timeout_secs"]) == (4.0, 4000, 16384, 3600)
    assert (fn["regions"], fn["cloud"], fn["retries"], fn["environment"]) == (["us-east"], "aws", 0, "main")
    assert [(s["name"], s["env"]) for s in fn["secrets"]] == [(SECRET, {"HF_TOKEN": "hf_secret"}), (None, {"A": "1"})]
    assert fn["volumes"] == {"/data": "datasets"}
    assert md_emulator.volume_path("datasets").is_dir()
    image = fn["image"]
    assert image["python_version"] == "3.11" and image["registry"].startswith("python:3.11")
    assert image["commands"][-1] == "RUN python -m pip install numpy==2.1.0" and len(image["layers"]) == 2
    assert fn["serialized"] and fn["app_version"] == 1

    other = md_emulator.function(H100_APP, "run_step")
    assert other["gpu"] == ["H100:2"] and other["regions"] == ["us-west", "eu-west"] and other["cloud"] is None
    assert other["image"]["registry"] == "python:3.11-slim" and other["timeout_secs"] == 2
    assert {a["name"] for a in md_emulator.apps} >= {APP, H100_APP, BROKEN_APP}


def test_deploying_again_publishes_a_new_version_of_the_same_function(md_emulator, client, deployed):
    before = md_emulator.function(H100_APP, "run_step")
    _deploy(client, H100_APP, _steps(), image=modal.Image.from_registry("python:3.11-slim"), gpu="H100:2", timeout=2,
            region=["us-west", "eu-west"])
    after = md_emulator.function(H100_APP, "run_step")
    assert after["id"] == before["id"] and after["app_id"] == before["app_id"]
    assert after["app_version"] == before["app_version"] + 1
    assert "AppGetLayout" in md_emulator.requests  # the second deploy found the app and reused its ids


@pytest.mark.parametrize(("options", "message"), [
    ({"gpu": "Z100"}, "unknown GPU type 'Z100'"),
    ({"gpu": "H100:9"}, "between 1 and 8"),
    ({"gpu": "A10:5"}, "between 1 and 4"),
    ({"gpu": ["H100", "T4:16"]}, "between 1 and 8"),
    ({"timeout": 86401}, "24 hours"),
])
def test_function_create_refuses_what_modal_refuses(md_emulator, client, options, message):
    with pytest.raises(modal.exception.InvalidError, match=message):
        _deploy(client, "stepops-invalid", _steps(), **options)
    assert [r["status"] for r in md_emulator.request_log if r["method"] == "FunctionCreate"][-1] == "INVALID_ARGUMENT"


def test_unknown_named_secret_is_not_found(client):
    with pytest.raises(modal.exception.NotFoundError, match="no-such-secret"):
        _deploy(client, "stepops-nosecret", _steps(), secrets=[modal.Secret.from_name("no-such-secret")])


def test_lookup_of_unknown_app_or_function_is_not_found(client, deployed):
    with pytest.raises(modal.exception.NotFoundError):
        modal.Function.from_name("stepops-nope", "run_step", environment_name="main", client=client).hydrate()
    with pytest.raises(modal.exception.NotFoundError):
        modal.Function.from_name(APP, "nope", environment_name="main", client=client).hydrate()


# ----- calls ----------------------------------------------------------------------------------------------


def test_spawn_runs_the_function_with_its_environment(md_emulator, client, deployed, monkeypatch):
    monkeypatch.setenv("STEPOPS_HOST_ONLY", "1")  # the host's step-operator settings must not leak
    md_emulator.inject("slow_start", duration=0.5)  # keeps it queued long enough to look at
    call = deployed[APP].spawn(b"bundle bytes", "env", {"K": "V"})
    assert call.object_id.startswith("fc-")
    with pytest.raises(TimeoutError):  # queued for queue_seconds: not done
        modal.FunctionCall.from_id(call.object_id, client=client).get(timeout=0)
    pending = md_emulator.call(call.object_id)
    assert pending["task_ids"] == [] and pending["started_at"] is None

    result = modal.FunctionCall.from_id(call.object_id, client=client).get(timeout=30)
    record = md_emulator.call(call.object_id)
    assert record["state"] == "success" and record["status"] == "GENERIC_STATUS_SUCCESS"
    assert record["task_id"].startswith("ta-") and record["attempts"] == 1 and record["exit_code"] == 0
    assert record["created_at"] <= record["started_at"] <= record["finished_at"]
    assert record["gpu"] == "H100" and record["history"] == ["pending", "running", "success"]
    assert (result["bundle"], result["env"], result["leaked"]) == (12, {"K": "V"}, [])
    assert result["secrets"] == {"HF_TOKEN": "hf_secret", "A": "1"}
    assert result["modal"] == {**result["modal"], "MODAL_TASK_ID": record["task_id"], "MODAL_ENVIRONMENT": "main",
                               "MODAL_REGION": "us-east", "MODAL_CLOUD_PROVIDER": "CLOUD_PROVIDER_AWS",
                               "MODAL_GPU": "H100"}
    assert Path(result["cwd"]).parent.name == record["task_id"]
    assert call.get(timeout=0) == result  # the output stays readable


def test_remote_waits_for_the_result(md_emulator, deployed):
    maps = count(md_emulator, "FunctionMap")
    assert deployed[APP].remote(b"ab", "env", {})["bundle"] == 2
    assert count(md_emulator, "FunctionMap") == maps + 1
    assert md_emulator.calls[-1]["invocation_type"] == "FUNCTION_CALL_INVOCATION_TYPE_SYNC"


def test_large_arguments_and_results_go_through_blobs(md_emulator, deployed):
    payload = os.urandom(5 * 1024 * 1024)  # above the 4 MiB multipart threshold: uploaded in parts
    creates, gets = count(md_emulator, "BlobCreate"), count(md_emulator, "BlobGet")
    call = deployed[APP].spawn(payload, "echo", {})
    assert call.get(timeout=30) == payload
    assert count(md_emulator, "BlobCreate") == creates + 1 and count(md_emulator, "BlobGet") == gets + 1
    upload = md_emulator.blob_uploads[-1]
    assert upload["parts"] == 3 and upload["size"] > len(payload)  # 2 MiB parts of the pickled arguments
    small = deployed[APP].spawn(os.urandom(64 * 1024), "echo", {})  # above the 8 KiB async inline limit
    assert len(small.get(timeout=30)) == 64 * 1024
    assert count(md_emulator, "BlobCreate") == creates + 2 and md_emulator.blob_uploads[-1]["parts"] == 1


def test_raw_function_get_outputs_returns_the_generic_result(md_emulator, client, deployed):
    call = deployed[APP].spawn(b"x", "sleep", {"seconds": "0.5"})
    pending = raw_outputs(client, call.object_id)
    assert list(pending.outputs) == [] and pending.num_unfinished_inputs == 1
    md_emulator.wait_for_call(call.object_id, "success")
    for _ in range(2):  # clear_on_success=False: readable again
        response = raw_outputs(client, call.object_id)
        item = response.outputs[0]
        assert response.num_unfinished_inputs == 0 and item.result.status == GR.GENERIC_STATUS_SUCCESS
        assert item.data_format == api_pb2.DATA_FORMAT_PICKLE and pickle.loads(item.result.data) == "slept"
    big = deployed[APP].spawn(b"y" * 100_000, "echo", {})
    md_emulator.wait_for_call(big.object_id, "success")
    result = raw_outputs(client, big.object_id).outputs[0].result
    assert result.WhichOneof("data_oneof") == "data_blob_id" and result.data_blob_id.startswith("bl-")


def test_a_remote_exception_is_raised_with_its_traceback(md_emulator, client, deployed):
    call = deployed[APP].spawn(b"", "fail", {"why": "bad input"})
    with pytest.raises(ValueError, match="step failed: bad input") as caught:
        call.get(timeout=30)
    frames = traceback.extract_tb(caught.value.__traceback__)
    assert any(f.name == "run_step" and f.filename.startswith("<ta-") for f in frames)
    result = raw_outputs(client, call.object_id).outputs[0].result
    assert result.status == GR.GENERIC_STATUS_FAILURE and result.exception == "ValueError('step failed: bad input')"
    assert "in run_step" in result.traceback and "_container" not in result.traceback
    assert md_emulator.call(call.object_id)["state"] == "failure"
    assert call.get_call_graph()[0].status == modal.call_graph.InputStatus.FAILURE
    lines = md_emulator.logs(call.object_id)
    errors = [line for line in lines if line != "loading data"]  # stdout and stderr are read apart: no order
    assert "loading data" in lines and "Traceback (most recent call last):" in errors
    assert errors[-1] == "ValueError: step failed: bad input"


def test_a_function_that_cannot_load_is_an_init_failure(md_emulator, deployed):
    call = deployed[BROKEN_APP].spawn(b"", "env", {})
    with pytest.raises(RuntimeError, match="cannot be loaded in a container"):
        call.get(timeout=30)
    assert md_emulator.call(call.object_id)["status"] == "GENERIC_STATUS_INIT_FAILURE"
    assert call.get_call_graph()[0].status == modal.call_graph.InputStatus.INIT_FAILURE


def test_past_its_timeout_the_call_is_killed_and_times_out(md_emulator, deployed):
    call = deployed[H100_APP].spawn(b"", "sleep", {"seconds": "30"})
    pid = running_pid(md_emulator, call.object_id)
    wording = r"^Task's current input in-\S+ hit its timeout of 2s$"  # as Modal says it
    with pytest.raises(modal.exception.FunctionTimeoutError, match=wording):
        call.get(timeout=30)
    record = md_emulator.call(call.object_id)
    assert record["state"] == "timeout" and gone(pid) and md_emulator.pid(call.object_id) is None
    assert record["gpu"] == "H100" and record["gpu_count"] == 2
    system = md_emulator.logs(call.object_id, system=True)
    assert any("cancelled because: Task's current input" in line for line in system)
    assert call.get_call_graph()[0].status == modal.call_graph.InputStatus.TIMEOUT


def test_cancel_kills_the_process_and_the_call_ends_terminated(md_emulator, deployed):
    call = deployed[APP].spawn(b"", "sleep", {"seconds": "30"})
    pid = running_pid(md_emulator, call.object_id)
    assert md_emulator.pids(call.object_id) == [pid] and not gone(pid)
    graph = call.get_call_graph()[0]
    assert graph.status == modal.call_graph.InputStatus.PENDING and graph.task_id.startswith("ta-")
    call.cancel(terminate_containers=True)
    md_emulator.wait_for_call(call.object_id, "terminated", timeout=10)
    assert gone(pid) and md_emulator.pids(call.object_id) == []
    with pytest.raises(modal.exception.RemoteError, match="was cancelled"):
        call.get(timeout=5)
    assert call.get_call_graph()[0].status == modal.call_graph.InputStatus.TERMINATED
    finished = md_emulator.call(call.object_id)["finished_at"]
    call.cancel(terminate_containers=True)  # a call that is over: a no-op
    assert md_emulator.call(call.object_id)["finished_at"] == finished


def test_call_graph_follows_the_input(md_emulator, deployed):
    md_emulator.inject("slow_start", duration=0.5)
    call = deployed[APP].spawn(b"", "sleep", {"seconds": "1"})
    first = call.get_call_graph()
    assert [(i.function_call_id, i.status, i.task_id, i.function_name) for i in first] == [
        (call.object_id, modal.call_graph.InputStatus.PENDING, "", "run_step")]
    md_emulator.wait_for_call(call.object_id, "running")
    assert call.get_call_graph()[0].task_id == md_emulator.call(call.object_id)["task_id"]
    assert call.get(timeout=30) == "slept"
    assert call.get_call_graph()[0].status == modal.call_graph.InputStatus.SUCCESS


def test_logs_fetch_tail_and_stream(md_emulator, deployed):
    call = deployed[APP].spawn(b"", "logs", {})
    assert call.get(timeout=30) == "logged"
    since = datetime.now(timezone.utc) - timedelta(minutes=5)
    entries = list(call.logs.fetch(since=since))
    assert [(e.source, e.message) for e in entries if e.source != "system"] == [
        ("stdout", "out 1\n"), ("stderr", "err 1\n"), ("stdout", "out 2\n")]
    assert entries[0].source == "system" and entries[0].message.startswith("Starting container ta-")
    assert [e.timestamp for e in entries] == sorted(e.timestamp for e in entries)
    task_id = md_emulator.call(call.object_id)["task_id"]
    assert all(e.object_id == call.object_id and task_id in e.context_ids for e in entries)
    assert [e.message for e in call.logs.fetch(since=since, source="stderr")] == ["err 1\n"]
    assert [e.message for e in call.logs.tail(2)] == ["err 1\n", "out 2\n"]
    assert list(call.logs.fetch(since=datetime.now(timezone.utc) + timedelta(seconds=1))) == []
    started = time.monotonic()
    streamed = [e.message for e in call.logs.stream(timeout=10)]
    assert streamed == [e.message for e in entries] and time.monotonic() - started < 8  # the call is over
    assert md_emulator.logs(call.object_id) == ["out 1", "err 1", "out 2"]
    entry = md_emulator.log_entries(call.object_id)[1]
    assert entry["source"] == "stdout" and entry["timestamp_ns"] > 10**18 and entry["task_id"] == task_id


# ----- faults ---------------------------------------------------------------------------------------------


def test_preemption_restarts_the_input_on_a_new_task(md_emulator, deployed, tmp_path):
    marker = tmp_path / "tasks"
    call = deployed[APP].spawn(b"", "attempt", {"marker": str(marker), "seconds": "1"})
    md_emulator.wait_for_call(call.object_id, "running")
    deadline = time.monotonic() + 20
    while not marker.exists():  # the function has started working
        assert time.monotonic() < deadline
        time.sleep(0.02)
    md_emulator.inject("preemption", job=call.object_id, restart=True)
    tasks = call.get(timeout=30)
    record = md_emulator.call(call.object_id)
    assert tasks == record["task_ids"] and len(set(tasks)) == 2 and record["attempts"] == 2
    assert record["history"] == ["pending", "running", "pending", "running", "success"]
    system = [line for line in md_emulator.logs(call.object_id, system=True) if "preemption" in line]
    assert system == ["Runner interrupted due to worker preemption. Your Function will be restarted with the "
                      "same input."]


def test_preemption_without_restart_ends_the_input_as_an_internal_failure(md_emulator, deployed):
    rule = md_emulator.inject("preemption", after=0.3, restart=False)  # strikes the next call made
    call = deployed[APP].spawn(b"", "sleep", {"seconds": "30"})
    pid = running_pid(md_emulator, call.object_id)
    with pytest.raises(modal.exception.InternalFailure, match="preempted"):
        call.get(timeout=30)
    assert rule.applied == [call.object_id] and gone(pid)
    assert md_emulator.call(call.object_id)["status"] == "GENERIC_STATUS_INTERNAL_FAILURE"


def test_failure_fault_fails_the_input_with_its_message(md_emulator, deployed):
    md_emulator.inject("failure", after=0.2, message="worker lost its disk")
    call = deployed[APP].spawn(b"", "sleep", {"seconds": "30"})
    with pytest.raises(modal.exception.RemoteError, match="worker lost its disk"):
        call.get(timeout=30)
    assert md_emulator.call(call.object_id)["state"] == "failure"


def test_slow_start_keeps_the_input_queued(md_emulator, deployed):
    md_emulator.inject("slow_start", duration=1.0)
    call = deployed[APP].spawn(b"", "env", {})
    time.sleep(0.6)
    assert md_emulator.call(call.object_id)["state"] == "pending"
    call.get(timeout=30)
    record = md_emulator.call(call.object_id)
    assert record["started_at"] - record["created_at"] >= 1.0


def test_no_capacity_falls_back_to_the_next_gpu_or_waits(md_emulator, deployed):
    md_emulator.inject("no_capacity", gpu="H100")
    fallback = deployed[APP].spawn(b"", "env", {})
    assert fallback.get(timeout=30)["modal"]["MODAL_GPU"] == "A100-80GB"
    assert md_emulator.call(fallback.object_id)["gpu"] == "A100-80GB"

    stuck = deployed[H100_APP].spawn(b"", "env", {})  # H100 only: queued until there is capacity
    time.sleep(0.8)
    assert md_emulator.call(stuck.object_id)["state"] == "pending"
    assert any(line.startswith("No capacity for H100") for line in md_emulator.logs(stuck.object_id, system=True))
    md_emulator.clear_faults()
    assert stuck.get(timeout=30)["modal"]["MODAL_GPU"] == "H100"
    assert md_emulator.call(stuck.object_id)["gpu_count"] == 2


def test_failed_requests_are_retried_by_the_client(md_emulator, deployed):
    maps = count(md_emulator, "FunctionMap")
    md_emulator.fail_requests(Status.UNAVAILABLE, times=2, method="FunctionMap")
    call = deployed[APP].spawn(b"", "env", {})
    assert count(md_emulator, "FunctionMap") == maps + 3
    statuses = [r["status"] for r in md_emulator.request_log if r["method"] == "FunctionMap"][-3:]
    assert statuses == ["UNAVAILABLE", "UNAVAILABLE", "OK"]
    assert call.get(timeout=30)["bundle"] == 0
    md_emulator.fail_requests(Status.PERMISSION_DENIED, times=1, method="FunctionMap", message="not allowed")
    with pytest.raises(modal.exception.PermissionDeniedError, match="not allowed"):  # not retried
        deployed[APP].spawn(b"", "env", {})
    assert count(md_emulator, "FunctionMap") == maps + 4


def test_async_client_paths(md_emulator, deployed):
    async def main() -> None:
        aclient = await modal.Client.from_credentials.aio(md_emulator.token_id, md_emulator.token_secret)
        fn = modal.Function.from_name(APP, "run_step", environment_name="main", client=aclient)
        await fn.hydrate.aio()
        call = await fn.spawn.aio(b"abc", "sleep", {"seconds": "30"})
        fc = modal.FunctionCall.from_id(call.object_id, client=aclient)  # no I/O: not an .aio method
        with pytest.raises(TimeoutError):
            await fc.get.aio(timeout=0)
        while md_emulator.call(call.object_id)["state"] != "running":
            await asyncio.sleep(0.05)
        loop = synchronizer._get_loop(start=True)  # the raw stub runs on the client's loop
        request = api_pb2.FunctionGetOutputsRequest(function_call_id=call.object_id, timeout=0, last_entry_id="0-0",
                                                    clear_on_success=False, requested_at=time.time())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", modal.exception.InternalAPIWarning)
            stub = aclient.stub
        pending = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(stub.FunctionGetOutputs(request), loop))
        assert pending.num_unfinished_inputs == 1 and not pending.outputs
        await fc.cancel.aio(terminate_containers=True)
        with pytest.raises(modal.exception.RemoteError, match="was cancelled"):
            await fc.get.aio(timeout=10)
        graph = await fc.get_call_graph.aio()
        assert graph[0].status == modal.call_graph.InputStatus.TERMINATED
        done = await fn.spawn.aio(b"abcd", "env", {})
        assert (await done.get.aio(timeout=30))["bundle"] == 4

        # a client made on this loop (the unwrapped class) can use its stub here directly
        from modal.client import _Client

        own = await _Client.from_credentials(md_emulator.token_id, md_emulator.token_secret)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", modal.exception.InternalAPIWarning)
                own_stub = own.stub
            request.function_call_id = done.object_id
            response = await own_stub.FunctionGetOutputs(request)
            assert response.outputs[0].result.status == GR.GENERIC_STATUS_SUCCESS
        finally:
            await own.close()

    asyncio.run(main())


# ----- running it as a process ------------------------------------------------------------------------


def test_module_serves_until_terminated_and_writes_the_env_file(tmp_path, monkeypatch):
    with emulator_process("modal", tmp_path / "modal.env", "--secret", "hf-token=HF_TOKEN=hf_cli",
                          "--stop-grace-period", "1") as values:
        assert set(values) == {"MODAL_SERVER_URL", "MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET", "MODAL_ENVIRONMENT",
                               "AIRFLOW_CONN_MODAL_DEFAULT"}
        conn = json.loads(values["AIRFLOW_CONN_MODAL_DEFAULT"])
        assert (conn["conn_type"], conn["login"], conn["password"]) == (
            "modal", values["MODAL_TOKEN_ID"], values["MODAL_TOKEN_SECRET"])
        monkeypatch.setenv("MODAL_SERVER_URL", values["MODAL_SERVER_URL"])
        other = modal.Client.from_credentials(values["MODAL_TOKEN_ID"], values["MODAL_TOKEN_SECRET"])
        other.hello()
        secret = modal.Secret.from_name("hf-token", environment_name="main", client=other)
        secret.hydrate()
        assert secret.object_id.startswith("st-")
        with pytest.raises(modal.exception.AuthError):
            modal.Client.from_credentials(values["MODAL_TOKEN_ID"], "as-wrong").hello()


def test_named_dicts_put_and_get(md_emulator):
    """``Dict.from_name`` / ``put`` (with ``skip_if_exists``) / ``get``, as the modal flavor records calls."""
    name = f"emulator-dict-{uuid.uuid4().hex[:8]}"
    with pytest.raises(modal.exception.NotFoundError):
        modal.Dict.from_name(name, environment_name="main").hydrate()
    record = modal.Dict.from_name(name, environment_name="main", create_if_missing=True)
    assert record.put("a", "1") is True
    assert record.put("a", "2", skip_if_exists=True) is False
    assert record.get("a") == "1" and record.get("b", "missing") == "missing"
    record.put("a", "3")
    assert modal.Dict.from_name(name, environment_name="main").get("a") == "3"
