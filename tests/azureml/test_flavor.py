"""The azureml flavor against the emulator: azure-ai-ml's MLClient (sync, run in threads by the trigger),
real job processes reading the bundle input and writing the output through Azurite-backed datastores."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("azure.ai.ml")

from airflow_stepops.artifacts import store_path
from airflow_stepops.bundle import read_outcome, replace_refs
from airflow_stepops.exceptions import StepOperatorConfigError
from airflow_stepops.hooks.base import JobState
from airflow_stepops.resources import ResourceSettings
from airflow_stepops.runtime.protocol import staged_ref
from airflow_stepops.settings.azureml import AzureMLStepOperatorSettings

from ..flavorjobs import hook_maker, make_spec, run_trigger, stored_ref
from ..steps import greet, sleep_then_return

make_hook = hook_maker("azureml")

pytestmark = pytest.mark.usefixtures("az_emulator")


def test_step_runs_as_a_command_job_with_logs_and_result(az_emulator):
    hook = make_hook()
    handle = hook.submit(make_spec(hook, greet, "ada", task_id="greet",
                                   resources=ResourceSettings(gpu_type="T4", memory="16GB")))
    event = run_trigger(hook, handle)
    assert event["status"] == "succeeded", event
    assert "hello ada from azureml" in event["log_tail"]
    result = read_outcome(store_path(handle["output_uri"])).value
    assert result["greeting"] == "hi ada" and result["bundle"].endswith("/inputs/bundle")
    job = az_emulator.job(handle["job_id"])
    props = job["properties"]
    assert props["resources"]["instanceType"] == "Standard_NC4as_T4_v3" and "computeId" not in props
    assert props["inputs"]["bundle"]["uri"].startswith("azureml://datastores/workspaceblobstore/paths/artifacts/")
    assert props["outputs"]["output"]["mode"] == "ReadWriteMount"
    assert props["tags"]["team"] == "ml" and props["tags"]["stepops-task"] == "greet"
    assert props["experimentName"] == "az_tests"
    assert hook.console_url(handle).startswith(f"https://ml.azure.com/runs/{handle['job_id']}?wsid=/subscriptions/")
    assert event["details"]["azureml_status"] == "Completed" and event["details"]["finished_at"]


def test_logs_stream_while_the_job_runs(az_emulator):
    hook = make_hook()
    handle = hook.submit(make_spec(hook, sleep_then_return, 3, task_id="stream"))
    az_emulator.wait_for_status(handle["job_id"], "Running")
    cursor, lines = None, []
    deadline = time.monotonic() + 20
    while "sleeping" not in lines and time.monotonic() < deadline:
        new, cursor = hook.read_logs(handle, cursor)
        lines += new
        time.sleep(0.2)
    assert "sleeping" in lines and hook.get_status(handle).state is JobState.RUNNING  # seen before the end
    assert run_trigger(hook, handle)["status"] == "succeeded"
    more, _ = hook.read_logs(handle, cursor)
    assert "sleeping" not in more  # the cursor does not read a line twice


def _write_in_pieces() -> str:
    import sys
    import time

    for part in (b"first line\ncaf\xc3", b"\xa9 au lait\n"):  # an upload in between ends inside the "é"
        sys.stdout.buffer.write(part)
        sys.stdout.buffer.flush()
        time.sleep(1.5)
    return "done"


def test_lines_cut_by_an_upload_arrive_whole_once(az_emulator):
    """The log blob is uploaded as the process writes it, so a read can end inside a line (and a character)."""
    hook = make_hook()
    handle = hook.submit(make_spec(hook, _write_in_pieces, task_id="pieces"))
    az_emulator.wait_for_status(handle["job_id"], "Running")
    cursor, lines, reads = None, [], 0
    deadline = time.monotonic() + 60
    while hook.get_status(handle).state not in (JobState.SUCCEEDED, JobState.FAILED) and time.monotonic() < deadline:
        new, cursor = hook.read_logs(handle, cursor)
        lines, reads = lines + new, reads + 1
        time.sleep(0.1)
    for _ in range(5):  # what the finished job still has to say, as the trigger drains it
        new, cursor = hook.read_logs(handle, cursor)
        lines += new
    assert reads > 20 and lines.count("first line") == 1 and lines.count("café au lait") == 1, lines
    assert not [line for line in lines if "\ufffd" in line or line == "caf"], lines


def test_every_rendered_job_passes_the_sdk_validation(az_emulator):
    from azure.ai.ml.entities import Job
    from azure.ai.ml.entities._job.to_rest_functions import to_rest_job_object

    hook, cluster = make_hook(), make_hook("azureml_cluster_step_operator")
    cases = [
        (hook, {"settings": AzureMLStepOperatorSettings(instance_type="Standard_NC24ads_A100_v4", job_tier="spot",
                                                        shm_size="16GB", max_runtime_in_seconds=3600,
                                                        environment_variables={"MODE": "train"},
                                                        experiment_name="exp-1", tags={"cost": "r&d"}),
                 "timeout_seconds": 600}),
        (hook, {"resources": ResourceSettings(gpu_count=8, gpu_type="H100")}),
        (cluster, {"settings": AzureMLStepOperatorSettings(shm_size="2g")}),
        (cluster, {"settings": AzureMLStepOperatorSettings(compute_target_name="", job_tier="Premium")}),
    ]
    for index, (h, kwargs) in enumerate(cases):
        spec = make_spec(h, greet, "x", task_id=f"render_{index}", **kwargs)
        job = h.build_job(spec)
        assert job._validate(raise_error=True).passed
        body = h.render(spec)
        assert body["name"] == job.name and body["properties"]["jobType"] == "Command"
        assert Job._from_rest_object(to_rest_job_object(h.build_job(spec, resolved=True))).name == job.name
    first = make_spec(hook, greet, "x", task_id="render_0", **cases[0][1])
    props = hook.render(first)["properties"]
    assert props["resources"] == {"instanceCount": 1, "instanceType": "Standard_NC24ads_A100_v4", "shmSize": "16g",
                                  "properties": {}}
    assert props["queueSettings"]["jobTier"] == "Spot" and props["limits"]["timeout"] == "PT11M"
    assert props["environmentVariables"]["MODE"] == "train" and props["experimentName"] == "exp-1"
    assert props["environmentId"].endswith("/environments/CliV2AnonymousEnvironment/versions/" +
                                           props["environmentId"].rsplit("/", 1)[-1])
    on_cluster = cluster.render(make_spec(cluster, greet, "x", task_id="render_2", **cases[2][1]))["properties"]
    assert on_cluster["computeId"].endswith("/computes/cpu-cluster") and "instanceType" not in on_cluster["resources"]


def test_sdk_validation_refuses_a_broken_job(az_emulator):
    from azure.ai.ml.entities import QueueSettings

    hook = make_hook()
    spec = make_spec(hook, greet, "x", task_id="broken")
    job = hook.build_job(spec)
    job.queue_settings = QueueSettings(job_tier="bogus")
    with pytest.raises(StepOperatorConfigError, match=r"the Azure ML command job is invalid: .*'bogus'"):
        hook.validate(job)
    job = hook.build_job(spec)
    job.command = None
    with pytest.raises(StepOperatorConfigError, match=r"the Azure ML command job is invalid: .*command"):
        hook.validate(job)


def _raise_timeout() -> None:
    print("connecting to the feature store", flush=True)
    raise TimeoutError("connection to feature-store:5432 timed out after JobTimeout limits.timeout")


def _raise_eviction() -> None:
    raise RuntimeError("cache eviction failed: PreemptionError, node preempted, pre-empted, evicted (NodeFailure)")


@pytest.mark.parametrize(("fn", "task_id"), [(_raise_timeout, "user_timeout"), (_raise_eviction, "user_eviction")])
def test_a_user_error_that_speaks_of_timeouts_or_preemption_stays_a_failure(az_emulator, fn, task_id):
    """Run history's message quotes the step's output: only the error's codes and the job's fields classify."""
    hook = make_hook()
    handle = hook.submit(make_spec(hook, fn, task_id=task_id))
    event = run_trigger(hook, handle)
    assert event["status"] == "failed" and "reason" not in event["details"], event
    assert event["details"]["error_code"] == "UserError"
    assert fn.__name__ != "_raise_timeout" or "timed out" in str(read_outcome(store_path(handle["output_uri"])).error)


def test_spot_preemption_is_preemption(az_emulator):
    hook = make_hook()
    spec = make_spec(hook, sleep_then_return, 60, task_id="spot", settings=AzureMLStepOperatorSettings(job_tier="Spot"))
    az_emulator.inject("preemption", after=0.5)  # the next job created, 0.5 s into Running
    handle = hook.submit(spec)
    assert handle["spot"] and handle["job_tier"] == "Spot"
    event = run_trigger(hook, handle)
    assert event["status"] == "preempted" and event["details"]["reason"] == "preempted", event
    assert "Spot VM was preempted" in event["message"]


def test_low_priority_cluster_preemption_is_preemption(az_emulator, monkeypatch):
    hook = make_hook("az_lowpri", monkeypatch=monkeypatch, like="azureml_cluster_step_operator",
                     compute_target_name="lowpri-cluster")
    spec = make_spec(hook, sleep_then_return, 60, task_id="lowpri")
    az_emulator.inject("preemption", after=0.5)
    handle = hook.submit(spec)
    assert handle["spot"] and handle["compute"] == "lowpri-cluster"
    event = run_trigger(hook, handle)
    assert event["status"] == "preempted" and "low-priority node was preempted" in event["message"], event


def test_node_loss_on_dedicated_compute_is_a_failure(az_emulator):
    from airflow_stepops.hooks.azureml_job import job_name

    hook = make_hook("azureml_cluster_step_operator")
    spec = make_spec(hook, sleep_then_return, 60, task_id="node_lost")
    az_emulator.inject("preemption", job=job_name(spec.identity), after=0.5)  # dedicated nodes: only when named
    event = run_trigger(hook, hook.submit(spec))
    assert event["status"] == "failed" and event["details"]["reason"] == "node_failure", event


def test_a_create_whose_replies_are_lost_ends_with_one_job_and_its_handle(az_emulator, monkeypatch):
    """Azure ML makes the job but no reply arrives (every retry hangs too): the hook gives up on the calls
    within its deadline and finds the job by its name, instead of waiting for azure-core's 300 s read timeout."""
    import threading

    from airflow_stepops.hooks.azureml_job import job_name

    hook = make_hook("az_impatient", monkeypatch=monkeypatch, api_timeout_seconds=2, api_max_attempts=2)
    spec = make_spec(hook, greet, "lost", task_id="lost_reply")
    name = job_name(spec.identity)
    fault = az_emulator.lose_replies("hang", times=None, method="PUT", path_contains=f"/jobs/{name}", hang_seconds=90)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(handle=hook.submit(spec)), daemon=True)
    began = time.monotonic()
    worker.start()
    worker.join(45)
    fault.times = 0
    assert not worker.is_alive(), "submit still waits for a reply that never comes"
    assert result["handle"]["job_id"] == name and time.monotonic() - began < 45
    assert fault.hits == 2  # the create and its one retry were carried out; both replies were lost
    assert [j["name"] for j in az_emulator.jobs].count(name) == 1
    assert run_trigger(hook, result["handle"])["status"] == "succeeded"


def test_a_job_of_another_step_with_the_name_is_not_taken(az_emulator, monkeypatch):
    from airflow_stepops.hooks import azureml_job

    hook = make_hook()
    spec = make_spec(hook, greet, "x", task_id="name_clash")
    taken = hook.submit(spec)
    other = make_spec(hook, greet, "y", task_id="name_clash_other")
    monkeypatch.setattr("airflow_stepops.hooks.azureml.job_name", lambda identity: taken["job_id"])
    assert azureml_job.job_name(other.identity) != taken["job_id"]
    with pytest.raises(StepOperatorConfigError, match="belongs to another step"):
        hook.find_job(other.identity)


def test_artifact_refs_in_the_store_are_job_inputs_others_are_staged(az_emulator, tmp_path):
    hook = make_hook()
    in_store, elsewhere = stored_ref(hook, [1, 2, 3]), stored_ref(hook, [10, 20], tmp_path / "local.pkl")

    def total(a: list, b: list) -> int:
        return sum(a) + sum(b)

    refs: list = []
    args = replace_refs([in_store, elsewhere], refs)
    spec = make_spec(hook, total, *args, task_id="ref_consumer", refs=refs)
    props = hook.render(spec)["properties"]
    assert props["inputs"]["ref_0"]["uri"].startswith("azureml://datastores/workspaceblobstore/paths/artifacts/")
    assert "ref_1" not in props["inputs"] and "${{inputs.bundle}}/" + staged_ref(1) in props["command"]
    handle = hook.submit(spec)
    assert run_trigger(hook, handle)["status"] == "succeeded"
    assert read_outcome(store_path(handle["output_uri"])).value == 36


def test_abfs_store_on_a_cluster(az_emulator):
    hook = make_hook("azureml_cluster_step_operator")
    handle = hook.submit(make_spec(hook, greet, "bo", task_id="cluster"))
    assert handle["compute"] == "cpu-cluster" and not handle["spot"]
    assert run_trigger(hook, handle)["status"] == "succeeded"
    assert read_outcome(store_path(handle["output_uri"])).value["greeting"] == "hi bo"
    props = az_emulator.job(handle["job_id"])["properties"]
    assert props["inputs"]["bundle"]["uri"].startswith("azureml://datastores/workspaceblobstore/paths/"
                                                       "cluster-artifacts/")


@pytest.mark.parametrize(("extra", "message"), [
    ({"workspace_name": None}, r"extra.workspace_name: Field required"),
    ({"resource_group": None}, r"extra.resource_group: Field required"),
    ({"subscription_id": None}, r"extra.subscription_id: Field required"),
    ({"image": "python:3.6-slim"}, r"image: 'python:3.6-slim' has Python 3.6, but the Airflow workers run Python "),
    ({"compute_target_name": "no-such-cluster"}, r"workspace 'stepops-ws' has no compute 'no-such-cluster'"),
    ({"datastore": "workspaceartifactstore", "artifact_store": "abfs://azurite_storage@{container}/x"},
     r"datastore: 'workspaceartifactstore' points at the container 'azureml'"),
    ({"artifact_store": None}, r"artifact_store: step operator 'az_bad' needs a blob artifact store"),
])
def test_config_errors_are_clear_and_nothing_is_submitted(az_emulator, monkeypatch, extra, message):
    container = az_emulator.datastores["workspaceblobstore"]
    hook = make_hook("az_bad", monkeypatch=monkeypatch, **{
        k: v.format(container=container) if isinstance(v, str) else v for k, v in extra.items()})
    before = len(az_emulator.jobs)
    with pytest.raises(StepOperatorConfigError, match=message):
        good = make_hook()
        spec = make_spec(good, greet, "x", task_id="bad_config")
        spec.bundle_uri = str(spec.identity.prefix(hook.artifact_root()) / "bundle")
        spec.output_uri = str(spec.identity.prefix(hook.artifact_root()) / "output")
        hook.submit(spec)
    assert len(az_emulator.jobs) == before


def test_what_azure_ml_refuses_is_refused_before_submitting_and_long_labels_fit(az_emulator):
    """Azure ML's run limits: 50 tags (ours count), display names of 256 characters."""
    hook = make_hook()
    before = len(az_emulator.jobs)
    many = AzureMLStepOperatorSettings(tags={f"t{i}": "v" for i in range(45)})  # + team + 6 identity tags
    with pytest.raises(StepOperatorConfigError, match=r"make 52; an Azure ML job takes at most 50"):
        make_spec(hook, greet, "x", task_id="many_tags", settings=many)
    assert len(az_emulator.jobs) == before
    long_dag = "7" + "d" * 199  # a leading digit: the name gets a "step-" prefix, and keeps its digest
    spec = make_spec(hook, greet, "x", task_id="t" * 100, dag_id=long_dag)
    handle = hook.submit(spec)
    job = az_emulator.job(handle["job_id"])
    assert len(handle["job_id"]) == 255 and handle["job_id"].endswith(f"-t1-{spec.identity.digest[:10]}")
    assert job["properties"]["displayName"] == f"{long_dag}.{'t' * 55}"
    assert run_trigger(hook, handle)["status"] == "succeeded"


def test_job_tier_with_a_cluster_is_refused_before_submitting(az_emulator):
    hook = make_hook("azureml_cluster_step_operator")
    with pytest.raises(StepOperatorConfigError, match=r"job_tier=Spot: job tiers are for serverless compute, but "
                                                      r"the step runs on the compute target 'cpu-cluster'"):
        make_spec(hook, greet, "x", task_id="tier_cluster", settings=AzureMLStepOperatorSettings(job_tier="Spot"))


def test_cluster_too_small_for_the_resources(az_emulator):
    hook = make_hook("azureml_cluster_step_operator")
    spec = make_spec(hook, greet, "x", task_id="small_cluster", resources=ResourceSettings(gpu_count=1))
    with pytest.raises(StepOperatorConfigError, match=r"'cpu-cluster' runs on Standard_DS3_v2 .* does not have"):
        hook.submit(spec)


def _checkpointed(epochs: int) -> dict:
    import os

    path = os.path.join(os.environ["STEPOPS_CHECKPOINT_DIR"], "state.json")
    state = json.load(open(path)) if os.path.exists(path) else {"epoch": 0, "starts": 0}
    state["starts"] += 1
    state["epoch"] = min(state["epoch"] + 2, epochs)  # two epochs per try
    with open(path, "w") as fh:
        json.dump(state, fh)
    return state


def test_a_retry_sees_the_checkpoints_of_the_try_before(az_emulator):
    """``STEPOPS_CHECKPOINT_DIR`` is a read-write mount at a path shared by all tries of the step."""
    hook = make_hook()
    first = hook.submit(make_spec(hook, _checkpointed, 6, task_id="checkpoints", try_number=1))
    assert run_trigger(hook, first)["status"] == "succeeded"
    second = hook.submit(make_spec(hook, _checkpointed, 6, task_id="checkpoints", try_number=2))
    assert run_trigger(hook, second)["status"] == "succeeded"
    assert read_outcome(store_path(second["output_uri"])).value == {"epoch": 4, "starts": 2}


def test_an_escalated_serverless_attempt_runs_on_the_standard_tier_and_no_preemption_strikes_it(az_emulator):
    hook = make_hook()
    spec = make_spec(hook, sleep_then_return, 2, task_id="escalated", settings=AzureMLStepOperatorSettings(job_tier="Spot"))
    spec.on_demand = True
    hook.check_on_demand(spec)  # serverless: the Standard tier needs nothing more
    rule = az_emulator.inject("preemption", after=0.5, count=None)  # every new job on preemptible capacity
    try:
        handle = hook.submit(spec)
        event = run_trigger(hook, handle)
    finally:
        az_emulator.clear_faults()
    assert (handle["spot"], handle["on_demand"], handle["job_tier"]) == (False, True, "Standard"), handle
    assert event["status"] == "succeeded" and rule.applied == [], event
    assert az_emulator.job(handle["job_id"])["properties"]["queueSettings"]["jobTier"] == "Standard"


def test_escalating_from_a_low_priority_cluster_needs_a_dedicated_one(az_emulator, monkeypatch):
    lowpri = {"like": "azureml_cluster_step_operator", "compute_target_name": "lowpri-cluster"}
    hook = make_hook("az_lowpri_only", monkeypatch=monkeypatch, **lowpri)
    spec = make_spec(hook, sleep_then_return, 1, task_id="lowpri_escalated")
    assert hook.spot(spec) is True  # the cluster's nodes are low priority
    with pytest.raises(StepOperatorConfigError, match=r"the step runs on the low-priority cluster 'lowpri-cluster'.*"
                       r"set \"on_demand_compute_target_name\" in the connection extras of 'az_lowpri_only'"):
        hook.check_on_demand(spec)
    dedicated = make_hook("azureml_cluster_step_operator")
    assert dedicated.spot(spec) is False
    dedicated.check_on_demand(spec)  # a dedicated cluster is on-demand already

    hook = make_hook("az_lowpri_escalating", monkeypatch=monkeypatch, on_demand_compute_target_name="cpu-cluster",
                     **lowpri)
    spec = make_spec(hook, sleep_then_return, 1, task_id="lowpri_escalated", try_number=2)
    hook.check_on_demand(spec)
    spec.on_demand = True
    handle = hook.submit(spec)
    assert (handle["compute"], handle["spot"], handle["on_demand"]) == ("cpu-cluster", False, True), handle
    assert run_trigger(hook, handle)["status"] == "succeeded"


def test_on_demand_compute_target_name_is_a_compute_name(az_emulator, monkeypatch):
    hook = make_hook("az_bad_on_demand", monkeypatch=monkeypatch, on_demand_compute_target_name="9 bad")
    with pytest.raises(StepOperatorConfigError, match=r"on_demand_compute_target_name: '9 bad' is not an Azure ML "
                       "compute name"):
        hook.config  # noqa: B018
