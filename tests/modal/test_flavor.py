"""The modal flavor against the emulator: the real ``modal`` client over gRPC (sync and ``.aio``), calls
running as real processes, the bundle and result travelling as the call's argument and return value."""

from __future__ import annotations

import asyncio
import itertools
import json
import pickle
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("modal")

from airflow_stepops.artifacts import store_path
from airflow_stepops.bundle import read_outcome, replace_refs
from airflow_stepops.exceptions import StepOperatorConfigError
from airflow_stepops.hooks import modal_call
from airflow_stepops.hooks.base import JobState
from airflow_stepops.resources import ResourceSettings
from airflow_stepops.settings.modal import ModalStepOperatorSettings

from ..emulated import eventually
from ..flavorjobs import hook_maker, make_spec, run_trigger, stored_ref
from ..steps import print_lines, sleep_then_return

make_hook = hook_maker("modal")

pytestmark = pytest.mark.usefixtures("md_emulator", "modal_step_operator")


def _greet(name: str) -> dict:
    import os

    print("hello", name, "from", os.environ["STEPOPS_FLAVOR"], "on", os.environ.get("MODAL_GPU", "cpu"), flush=True)
    return {"greeting": f"hi {name}", "team": os.environ.get("TEAM"), "task": os.environ.get("MODAL_TASK_ID")}


def test_step_runs_as_a_modal_call_with_logs_and_result(md_emulator):
    hook = make_hook()
    handle = hook.submit(make_spec(hook, _greet, "ada", task_id="greet",
                                   resources=ResourceSettings(gpu_type="H100", gpu_count=2, cpu_count=4,
                                                              memory="16GiB")))
    assert handle["job_id"].startswith("fc-") and handle["app_name"].startswith("stepops-tests-")
    event = run_trigger(hook, handle)
    assert event["status"] == "succeeded", event
    assert any("hello ada from modal on H100" in line for line in event["log_tail"]), event["log_tail"]
    result = read_outcome(store_path(handle["output_uri"])).value
    assert result["greeting"] == "hi ada" and result["team"] == "ml" and result["task"].startswith("ta-")
    function = md_emulator.function(handle["app_name"], "run_step")
    assert function["gpu"] == ["H100:2"], function
    assert function["milli_cpu"] == 4000 and function["memory_mb"] == 16384, function
    assert function["timeout_secs"] == 86400 and function["environment"] == "main"
    assert hook.console_url(handle) == f"https://modal.com/id/{handle['job_id']}"
    assert event["details"]["finished_at"] >= event["details"].get("started_at", 0)


def test_zenml_settings_and_gpu_fallback(md_emulator):
    """ZenML's example settings, and an ordered GPU list: Modal takes the next type when the first has no
    capacity."""
    hook = make_hook()
    md_emulator.inject("no_capacity", gpu="H100")
    try:
        handle = hook.submit(make_spec(hook, _greet, "bob", task_id="fallback", settings=ModalStepOperatorSettings(
            gpu=["H100", "A100-80GB"], cpu=4.0, memory=16384)))
        event = run_trigger(hook, handle)
    finally:
        md_emulator.clear_faults()
    assert event["status"] == "succeeded", event
    assert any("from modal on A100-80GB" in line for line in event["log_tail"]), event["log_tail"]
    function = md_emulator.function(handle["app_name"], "run_step")
    assert function["gpu"] == ["H100", "A100-80GB"] and function["memory_mb"] == 16384


def test_preemption_is_restarted_by_modal_or_reported(md_emulator):
    hook = make_hook()
    restarted = hook.submit(make_spec(hook, sleep_then_return, 2, task_id="preempted_restart"))
    _wait_running(md_emulator, hook, restarted)
    md_emulator.inject("preemption", job=restarted["job_id"], after=0.3, restart=True)
    event = run_trigger(hook, restarted)
    assert event["status"] == "succeeded", event
    assert any(line.startswith("[system]") and "preempt" in line.lower() for line in event["log_tail"]), event
    given_up = hook.submit(make_spec(hook, sleep_then_return, 60, task_id="preempted_final"))
    _wait_running(md_emulator, hook, given_up)
    md_emulator.inject("preemption", job=given_up["job_id"], after=0.3, restart=False)
    event = run_trigger(hook, given_up)
    assert event["status"] == "preempted" and event["details"]["reason"] == "preempted", event


def test_one_deployment_per_set_of_options(md_emulator):
    hook = make_hook()
    settings = ModalStepOperatorSettings(gpu="T4", memory=2048, timeout=600)
    first = hook.submit(make_spec(hook, _greet, "a", task_id="deploy_a", settings=settings))
    creates = md_emulator.requests.count("FunctionCreate")
    second = make_hook().submit(make_spec(hook, _greet, "b", task_id="deploy_b", settings=settings))
    assert second["app_name"] == first["app_name"] and md_emulator.requests.count("FunctionCreate") == creates
    other = hook.submit(make_spec(hook, _greet, "c", task_id="deploy_c",
                                  settings=ModalStepOperatorSettings(gpu="T4", memory=4096, timeout=600)))
    assert other["app_name"] != first["app_name"] and md_emulator.requests.count("FunctionCreate") == creates + 1
    for handle in (first, second, other):
        assert run_trigger(hook, handle)["status"] == "succeeded"


_DEPLOY = """
import json, os, sys, time
from airflow_stepops.hooks.modal import ModalStepOperatorHook
from airflow_stepops.hooks.modal_function import deployed_function

hook = ModalStepOperatorHook("modal_step_operator")
client = hook.client
open(sys.argv[3] + "." + str(os.getpid()), "w").close()  # ready
while not os.path.exists(sys.argv[3]):  # every worker ready: they deploy at the same moment
    time.sleep(0.005)
print(deployed_function(client, hook.environment, sys.argv[1], json.loads(sys.argv[2]), hook.log).object_id)
"""


def test_workers_deploying_the_same_new_options_at_once_all_get_its_function(md_emulator, tmp_path):
    """Mapped steps start in separate worker processes at once: each finds no app and deploys it; the ones
    whose deploy loses the race use the function the winner deployed."""
    import subprocess
    import sys

    from airflow_stepops.hooks.modal_function import app_name

    hook = make_hook()
    options = hook.options(make_spec(hook, _greet, "x", task_id="deploy_race",
                                     settings=ModalStepOperatorSettings(memory=3333, timeout=600)))
    name, go = app_name(hook.config, options), tmp_path / "go"
    published = md_emulator.requests.count("AppPublish")
    md_emulator.publish_seconds = 3  # as a real deploy, which builds images first: they all find no app
    try:
        workers = [subprocess.Popen([sys.executable, "-c", _DEPLOY, name, json.dumps(options), str(go)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("go.*"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        go.touch()
        outputs = [worker.communicate(timeout=120) for worker in workers]
    finally:
        md_emulator.publish_seconds = 0
    assert [worker.returncode for worker in workers] == [0, 0, 0], [err[-2000:] for _, err in outputs]
    (function_id,) = {out.split()[-1] for out, _ in outputs}
    assert md_emulator.requests.count("AppPublish") - published == 3  # they did race
    (app,) = [a for a in md_emulator.apps if a["name"] == name and a["state"] == "APP_STATE_DEPLOYED"]
    assert list(app["functions"].values()) == [function_id]


def _big(size: int) -> bytes:
    return bytes(range(256)) * (size // 256)


def test_large_bundle_and_result_travel_through_modal_blobs(md_emulator):
    hook = make_hook()
    payload = b"x" * (5 << 20)
    handle = hook.submit(make_spec(hook, lambda data: _big(len(data) + (1 << 20)), payload, task_id="large"))
    assert run_trigger(hook, handle)["status"] == "succeeded"
    value = read_outcome(store_path(handle["output_uri"])).value
    assert len(_load(value)) == (6 << 20)
    assert "BlobCreate" in md_emulator.requests and "BlobGet" in md_emulator.requests


def _load(value):
    from airflow_stepops.artifacts import ArtifactRef

    return value.load() if isinstance(value, ArtifactRef) else value


def test_artifact_refs_travel_in_the_bundle(md_emulator):
    hook = make_hook()
    refs: list = []
    args = replace_refs([stored_ref(hook, [1, 2, 3])], refs)
    handle = hook.submit(make_spec(hook, sum, *args, task_id="ref_consumer", refs=refs))
    assert run_trigger(hook, handle)["status"] == "succeeded"
    assert read_outcome(store_path(handle["output_uri"])).value == 6


def test_unknown_secret_is_a_clear_error_before_any_call(monkeypatch, md_emulator):
    monkeypatch.setenv("AIRFLOW_CONN_MODAL_NO_SECRET", json.dumps({"conn_type": "stepops_modal", "extra": {
        "app_name": "stepops-tests", "secrets": ["does-not-exist"], "environment": "main"}}))
    hook = make_hook("modal_no_secret")
    calls = md_emulator.requests.count("FunctionMap")
    with pytest.raises(StepOperatorConfigError, match=r"Modal refused to deploy the app stepops-tests-.*"
                                                      r"does-not-exist"):
        hook.submit(make_spec(hook, _greet, "x", task_id="no_secret"))
    assert md_emulator.requests.count("FunctionMap") == calls


def test_bad_token_is_a_clear_error(monkeypatch, md_emulator):
    monkeypatch.setenv("AIRFLOW_CONN_MODAL_BAD_TOKEN", json.dumps({"conn_type": "modal", "login": "ak-wrong",
                                                                  "password": "as-wrong"}))
    monkeypatch.setenv("AIRFLOW_CONN_MODAL_BAD_STEPS", json.dumps({"conn_type": "stepops_modal", "extra": {
        "modal_conn_id": "modal_bad_token", "app_name": "stepops-tests"}}))
    hook = make_hook("modal_bad_steps")
    with pytest.raises(StepOperatorConfigError, match=r"Modal refused to deploy .*AuthError|cannot build a Modal "
                                                      r"client"):
        hook.submit(make_spec(hook, _greet, "x", task_id="bad_token"))


def test_without_a_modal_connection_modals_own_token_is_used(monkeypatch, md_emulator):
    """No ``modal_default`` connection: the provider falls back to MODAL_TOKEN_ID/MODAL_TOKEN_SECRET."""
    monkeypatch.delenv("AIRFLOW_CONN_MODAL_DEFAULT", raising=False)
    hook = make_hook()
    handle = hook.submit(make_spec(hook, _greet, "env", task_id="ambient_token"))
    assert run_trigger(hook, handle)["status"] == "succeeded"


def test_results_never_unpickle_classes():
    assert modal_call.output_bytes(pickle.dumps(b"abc", protocol=5)) == b"abc"
    with pytest.raises(pickle.UnpicklingError, match=r"returned a builtins.eval|not bytes"):
        modal_call.output_bytes(pickle.dumps(SimpleNamespace(a=1)))
    with pytest.raises(pickle.UnpicklingError, match=r"returned list, not bytes"):
        modal_call.output_bytes(pickle.dumps([1, 2]))


def test_log_lines_join_chunks_and_resume_after_the_last_entry():
    from modal_proto import api_pb2

    def batch(entry_id: str, *items: tuple[str, int]) -> api_pb2.TaskLogsBatch:
        return api_pb2.TaskLogsBatch(entry_id=entry_id, items=[api_pb2.TaskLogs(data=data, file_descriptor=fd)
                                                               for data, fd in items])

    out, info = api_pb2.FILE_DESCRIPTOR_STDOUT, api_pb2.FILE_DESCRIPTOR_INFO
    lines, cursor = modal_call.log_lines([batch("1", ("a\nb", out), ("c\n", out)),
                                          batch("2", ("Starting container\n", info))], None)
    assert lines == ["a", "bc", "[system] Starting container"] and cursor["entry_id"] == "2"
    more, cursor = modal_call.log_lines([batch("3", ("d\n", out), ("e", out))], cursor)
    assert more == ["d"] and cursor == {"entry_id": "3", "partial": {"stdout": "e"}}
    last, _ = modal_call.log_lines([batch("4", ("f\n", out))], cursor)
    assert last == ["ef"]


def _wait_running(emulator, hook, handle) -> None:
    eventually(lambda: emulator.pid(handle["job_id"]) is not None and hook.get_status(handle).state is JobState.RUNNING,
               what=f"{handle['job_id']} to start")


def test_each_call_is_recorded_so_a_later_try_finds_it(md_emulator):
    """Without a task state store (Airflow 3.1/3.2), the record of calls is how a retry finds the call."""
    hook = make_hook()
    spec = make_spec(hook, sleep_then_return, 1, task_id="recorded")
    assert hook.find_job(spec.identity) is None
    handle = hook.submit(spec)
    found = make_hook().find_job(spec.identity)
    assert found is not None and found["job_id"] == handle["job_id"] and found["output_uri"] == handle["output_uri"]
    assert make_hook().find_job(spec.identity.for_try(2)) is None
    assert run_trigger(hook, found)["status"] == "succeeded"
    record_id = hook._calls.object_id
    assert modal_call.dict_text(hook.client, record_id, spec.identity.digest) is None  # dropped once collected
    # the record is read as data: a value that is not a handle of ours is not followed
    import modal

    record = modal.Dict.from_name("stepops-tests-calls", environment_name="main")
    record.put(spec.identity.for_try(3).digest, json.dumps({"job_id": "not-a-call"}))
    assert make_hook().find_job(spec.identity.for_try(3)) is None


def test_the_runner_loads_in_an_image_without_airflow_stepops(tmp_path):
    """What Modal stores for ``run_step`` is the function itself, not a reference to this package."""
    import subprocess
    import sys

    from modal._serialization import serialize

    from airflow_stepops.hooks.modal_function import runner_by_value

    with runner_by_value() as run_step:
        (tmp_path / "fn.pkl").write_bytes(serialize(run_step))
    probe = (
        "import sys, pickle; sys.modules['airflow_stepops'] = None\n"
        "from modal._vendor import cloudpickle\n"
        f"fn = cloudpickle.loads(open({str(tmp_path / 'fn.pkl')!r}, 'rb').read())\n"
        "print(fn.__name__, fn.__module__)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "run_step"


def test_payload_span_finds_the_bytes_of_a_pickled_bytes_object():
    for protocol in (2, 3, 4, 5):
        for size in (0, 10, 300, 70_000):
            data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
            raw = pickle.dumps(data, protocol=protocol)
            span = modal_call.payload_span(raw[:64])
            if protocol < 3:  # older protocols pickle bytes through a class: loaded with the no-classes loader
                assert span is None
                continue
            assert span is not None and raw[span[0]:span[0] + span[1]] == data, (protocol, size)


def test_expired_output_and_lost_containers_are_reported():
    from modal_proto import api_pb2

    handle = {"job_id": "fc-1", "timeout": 60}
    expired = modal_call.finished_status(None, handle, {})
    assert expired.state is JobState.FAILED and expired.details["reason"] == "output_expired"
    lost = api_pb2.FunctionGetOutputsItem(result=api_pb2.GenericResult(
        status=api_pb2.GenericResult.GENERIC_STATUS_INTERNAL_FAILURE, exception="worker lost"),
        input_started_at=10.0, output_created_at=20.0, retry_count=1)
    status = modal_call.finished_status(lost, handle, {})
    assert status.state is JobState.PREEMPTED and status.details["reason"] == "preempted"
    assert (status.details["started_at"], status.details["finished_at"], status.details["restarts"]) == (10.0, 20.0, 1)
    oom = api_pb2.FunctionGetOutputsItem(result=api_pb2.GenericResult(
        status=api_pb2.GenericResult.GENERIC_STATUS_KERNEL_OOM_KILL, exception="killed"))
    assert modal_call.finished_status(oom, handle, {}).details["reason"] == "out_of_memory"


def test_cbor_payloads_are_read_too(monkeypatch, md_emulator):
    """A worker whose Modal config asks for CBOR payloads gets its result as CBOR: read as data too."""
    monkeypatch.setenv("MODAL_PAYLOAD_FORMAT", "cbor")
    hook = make_hook()
    handle = hook.submit(make_spec(hook, _greet, "cbor", task_id="cbor"))
    assert run_trigger(hook, handle)["status"] == "succeeded"
    assert read_outcome(store_path(handle["output_uri"])).value["greeting"] == "hi cbor"
    assert md_emulator.call(handle["job_id"])["output_format"] == "DATA_FORMAT_CBOR"


def _no_newline() -> int:
    import sys

    sys.stderr.write("progress 100%")  # a progress bar's last line, without its newline
    sys.stderr.flush()
    return 1


def test_a_last_line_without_newline_is_not_lost(md_emulator):
    hook = make_hook()
    handle = hook.submit(make_spec(hook, _no_newline, task_id="no_newline"))
    event = run_trigger(hook, handle)
    assert event["status"] == "succeeded", event
    assert any(line.endswith("progress 100%") for line in event["log_tail"]), event["log_tail"]


def test_a_queued_call_without_a_counted_input_is_not_failed(md_emulator):
    """A call just spawned or queued may show no output and no unfinished input, which is what Modal's own
    client takes for an expired output: it is queued, not failed."""
    hook = make_hook()
    md_emulator.uncounted_queue_seconds = 30
    md_emulator.inject("slow_start", duration=3)
    try:
        handle = hook.submit(make_spec(hook, _greet, "late", task_id="uncounted"))
        assert modal_call.fetch_result(hook.client, handle["job_id"]) == (None, 0)
        assert hook.get_status(handle).state is JobState.QUEUED
        assert asyncio.run(make_hook().aget_statuses([handle]))[0].state is JobState.QUEUED
    finally:
        md_emulator.uncounted_queue_seconds = 0
        md_emulator.clear_faults()
    assert run_trigger(hook, handle)["status"] == "succeeded"


def test_an_expired_output_is_reported_as_modal_reports_it(md_emulator):
    import modal

    hook = make_hook()
    handle = hook.submit(make_spec(hook, _greet, "old", task_id="expired"))
    md_emulator.wait_for_call(handle["job_id"], "success")
    md_emulator.age(handle["job_id"], 8 * 24 * 3600)  # ended eight days ago: Modal keeps results seven
    with pytest.raises(modal.exception.OutputExpiredError):
        modal.FunctionCall.from_id(handle["job_id"]).get(timeout=0)
    status = make_hook().get_status(handle)
    assert status.state is JobState.FAILED and status.details["reason"] == "output_expired", status


def test_preemption_is_told_by_modals_status_not_by_words(md_emulator):
    """A failure whose text speaks of preemption (it may carry the step's own output) is a failure."""
    hook = make_hook()
    handle = hook.submit(make_spec(hook, sleep_then_return, 60, task_id="says_preempted"))
    _wait_running(md_emulator, hook, handle)
    md_emulator.inject("failure", job=handle["job_id"], message="Runner interrupted due to worker preemption")
    event = run_trigger(hook, handle)
    assert event["status"] == "failed" and event["details"]["modal_status"] == "failure", event


def test_late_log_lines_are_neither_lost_nor_repeated(md_emulator):
    """Modal may take a line in after lines written later: followed by entry id, it still comes, once."""
    hook = make_hook()
    md_emulator.late_logs(every=3, seconds=0.3)
    try:
        handle = hook.submit(make_spec(hook, print_lines, 60, task_id="late_logs"))
        lines: list[str] = []
        cursor = None
        for _ in range(10_000):  # as the trigger reads: while it runs, then until a read brings nothing
            over = hook.get_status(handle).state.terminal
            new, cursor = asyncio.run(make_hook().aread_logs(handle, cursor))
            lines += new
            if over and not new:
                break
    finally:
        md_emulator.late_logs(0)
    stamps = [e["timestamp_ns"] for e in md_emulator.log_entries(handle["job_id"])]
    assert any(later < earlier for earlier, later in itertools.pairwise(stamps)), "no line came late"
    assert sorted(line for line in lines if line.startswith("line ")) == sorted(f"line {i}" for i in range(60))


def _within(seconds: float, fn, *args):
    """``fn(*args)``'s result or exception, failing the test when it takes longer than ``seconds``."""
    import threading

    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn(*args)
        except Exception as exc:
            out["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"{fn.__name__} still waits after {seconds}s"
    return out


@pytest.mark.parametrize("lost", [1, None], ids=["one_reply_lost", "every_reply_lost"])
def test_a_lost_spawn_reply_ends_with_the_one_call_in_bounded_time(md_emulator, monkeypatch, lost):
    """Modal made the call but its reply was lost: the spawn is sent again under the step try's key and gets
    that call, neither a second one nor a hang. Every reply lost: the spawn gives up in bounded time; the same try,
    sent again (by another worker), gets the call Modal made under the recorded key instead of a second one."""
    monkeypatch.setattr(modal_call, "ATTEMPT_TIMEOUT", 1.0 if lost else 0.5)
    if not lost:
        monkeypatch.setattr(modal_call, "TOTAL_TIMEOUT", 3.0)
    hook = make_hook()
    spec = make_spec(hook, _greet, "lost", task_id=f"lost_reply_{lost}")
    hook.submit(make_spec(hook, _greet, "warm", task_id=f"warm_{lost}"))  # the app is deployed
    before = len(md_emulator.calls)
    md_emulator.lose_replies("FunctionMap", times=lost)
    try:
        out = _within(15, hook.submit, spec)
    finally:
        md_emulator.clear_faults()
    if not lost:
        assert isinstance(out.get("error"), TimeoutError), out
        assert len(md_emulator.calls) == before + 1  # Modal made the call once, however often it was asked
    handle = out["value"] if lost else make_hook().submit(spec)
    assert [call["id"] for call in md_emulator.calls[before:]] == [handle["job_id"]]
    assert run_trigger(hook, handle)["status"] == "succeeded"


def test_lost_look_up_replies_are_bounded(md_emulator, monkeypatch):
    """The look-ups of the record of calls and of the function are sent again, not waited for forever."""
    monkeypatch.setattr(modal_call, "ATTEMPT_TIMEOUT", 1.0)
    spec = make_spec(make_hook(), _greet, "look", task_id="lost_look_up",
                     settings=ModalStepOperatorSettings(memory=777))  # options of its own: a new app
    md_emulator.lose_replies("DictGetOrCreate", times=1)
    md_emulator.lose_replies("FunctionGet", times=1)
    try:
        found = _within(20, make_hook().find_job, spec.identity)
        spawned = _within(20, make_hook().submit, spec)
    finally:
        md_emulator.clear_faults()
    assert found == {"value": None} and spawned["value"]["job_id"].startswith("fc-"), (found, spawned)


def _random(size: int) -> bytes:
    import os

    return os.urandom(size)


def test_a_lost_reply_while_collecting_a_large_result_is_bounded(md_emulator, monkeypatch):
    monkeypatch.setattr(modal_call, "ATTEMPT_TIMEOUT", 1.0)
    hook = make_hook()
    handle = hook.submit(make_spec(hook, _random, 100_000, task_id="lost_blob_get"))  # a result in a blob
    md_emulator.wait_for_call(handle["job_id"], "success")
    md_emulator.lose_replies("BlobGet", times=1)
    try:
        out = _within(20, hook.collect_output, handle)
    finally:
        md_emulator.clear_faults()
    assert "error" not in out, out
    assert len(_load(read_outcome(store_path(handle["output_uri"])).value)) == 100_000
    assert any(r["method"] == "BlobGet" and r["status"] == "LOST" for r in md_emulator.request_log)


def test_an_escalated_attempt_is_nonpreemptible_and_no_preemption_strikes_it(md_emulator):
    hook = make_hook()
    spot = make_spec(hook, sleep_then_return, 1, task_id="escalated")
    spec = make_spec(hook, sleep_then_return, 1, task_id="escalated", try_number=2)
    spec.on_demand = True
    assert hook.prepare(spec)["app_name"] != hook.render(spot)["app_name"]  # other options, another app
    rule = md_emulator.inject("preemption", after=0.3, restart=False, count=None)  # every new preemptible call
    try:
        handle = hook.submit(spec)
        event = run_trigger(hook, handle)
    finally:
        md_emulator.clear_faults()
    assert (handle["spot"], handle["on_demand"]) == (False, True), handle
    assert event["status"] == "succeeded" and rule.applied == [], event
    assert md_emulator.function(handle["app_name"], "run_step", handle["environment"])["nonpreemptible"] is True


def test_a_gpu_step_has_no_on_demand_capacity_to_escalate_to_on_modal():
    hook = make_hook()
    spec = make_spec(hook, sleep_then_return, 0, task_id="gpu_escalated", resources=ResourceSettings(gpu_count=1))
    assert not hook.spot(spec) and hook.spot(make_spec(hook, sleep_then_return, 0, task_id="cpu_escalated"))
