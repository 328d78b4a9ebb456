"""Promises every remote flavor keeps, written once and checked for each against its emulator through the
flavor's real hook and trigger. What only one flavor promises stays in tests/<flavor>/."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from airflow_stepops.artifacts import store_path
from airflow_stepops.bundle import read_outcome
from airflow_stepops.exceptions import StepOperatorConfigError, StepRequirementsError, rebuild_remote_error
from airflow_stepops.flavors import get_flavor
from airflow_stepops.hooks.base import JobState
from airflow_stepops.hooks.kubernetes_job import STEP_LABEL
from airflow_stepops.images import python_image, worker_python
from airflow_stepops.resources import ResourceSettings
from airflow_stepops.runtime import protocol

from .emulated import eventually
from .flavorjobs import EMULATORS, make_hook, make_spec, render, run_trigger
from .package_index import PROBE, PROBE_VALUE
from .steps import import_probe, raise_value_error, sleep_then_return

REMOTE = sorted(EMULATORS)


@pytest.fixture
def emulator(request, flavor):
    """The session emulator behind ``flavor``'s step operator; the Jobs of the kubernetes flavor are checked
    against the Kubernetes schema afterwards, as in tests/kubernetes."""
    pytest.importorskip({"kubernetes": "kubernetes", "sagemaker": "moto", "vertex": "google.cloud.aiplatform_v1",
                         "azureml": "azure.ai.ml", "modal": "modal"}[flavor])
    emulator = request.getfixturevalue(EMULATORS[flavor])
    if flavor == "modal":
        request.getfixturevalue("modal_step_operator")
    yield emulator
    if flavor == "kubernetes":
        from .kubernetes.conftest import validate_new_jobs

        validate_new_jobs(emulator)


@pytest.mark.parametrize("flavor", REMOTE)
def test_max_runtime_is_a_timeout(flavor, emulator):
    limit = "timeout" if flavor == "modal" else "max_runtime_in_seconds"
    hook = make_hook(flavor)
    handle = hook.submit(make_spec(hook, sleep_then_return, 60, task_id="deadline",
                                   settings=get_flavor(flavor).settings_model()(**{limit: 2})))
    event = run_trigger(hook, handle)
    assert event["status"] == "failed" and event["details"]["reason"] == "timed_out", event
    if flavor == "kubernetes":  # the limit is the Job's own
        assert "activeDeadlineSeconds=2" in event["message"]
    if flavor == "azureml":  # the limit is the job's own, which Azure ML cancels: no error of the step
        job = emulator.job(handle["job_id"])
        assert job["properties"]["limits"]["timeout"] == "PT2S" and job["status"] == "Canceled" and not job["error"]


@pytest.mark.parametrize(("flavor", "says"), [
    ("kubernetes", "exit code 1"), ("sagemaker", "ValueError: bad input 7"), ("vertex", ""),
    ("azureml", "exited with status code 1"), ("modal", "")])
def test_a_remote_exception_fails_the_step_and_comes_back_whole(flavor, says, emulator):
    hook = make_hook(flavor)
    handle = hook.submit(make_spec(hook, raise_value_error, 7, task_id="raises"))
    event = run_trigger(hook, handle)
    assert event["status"] == "failed" and says in event["message"], event
    assert any("ValueError: bad input 7" in line for line in event["log_tail"]), event["log_tail"]
    hook.collect_output(handle)  # as the operator's execute_complete does
    error = read_outcome(store_path(handle["output_uri"])).error
    assert (error["type"], error["message"]) == ("builtins.ValueError", "bad input 7")
    assert "in raise_value_error" in error["traceback"]


@pytest.mark.parametrize(("flavor", "refusal"), [("azureml", "Azure ML refused to create the command job"),
                                                 ("vertex", "Vertex AI refused to create the CustomJob")])
def test_quota_error_is_a_clear_error_and_nothing_runs(flavor, refusal, emulator):
    hook = make_hook(flavor)
    spec = make_spec(hook, sleep_then_return, 0, task_id="quota")
    before = len(emulator.job_ids)
    emulator.inject("quota_exceeded")
    with pytest.raises(StepOperatorConfigError, match=f"{refusal} .*quota"):
        hook.submit(spec)
    assert hook.find_job(spec.identity) is None and len(emulator.job_ids) == before


#: flavor -> how many jobs its emulator holds for a submitted step try
JOBS_OF_TRY = {
    "kubernetes": lambda k8s, spec, handle: len(k8s.list_objects("jobs", "steps", f"{STEP_LABEL}={handle['step']}")),
    "sagemaker": lambda sm, spec, handle: [j["TrainingJobName"] for j in sm.jobs].count(handle["job_id"]),
    "vertex": lambda vx, spec, handle: [j["labels"].get("stepops-step") for j in vx.jobs].count(
        spec.identity.digest[:40]),
    "azureml": lambda az, spec, handle: [j["properties"]["tags"].get("stepops-step") for j in az.jobs].count(
        spec.identity.digest[:40])}


@pytest.mark.parametrize("flavor", sorted(JOBS_OF_TRY))
def test_submit_is_exactly_once_per_try(flavor, emulator):
    hook = make_hook(flavor)
    spec = make_spec(hook, sleep_then_return, 0, task_id="exactly_once")
    first = hook.submit(spec)
    again = make_hook(flavor).submit(spec)  # e.g. a worker that died after creating the job
    assert again["job_id"] == first["job_id"] and hook.find_job(spec.identity)["job_id"] == first["job_id"]
    assert JOBS_OF_TRY[flavor](emulator, spec, first) == 1
    assert hook.find_job(spec.identity.for_try(2)) is None
    assert run_trigger(hook, first)["status"] == "succeeded"


@pytest.mark.parametrize("flavor", ["azureml", "modal", "vertex"])
def test_operator_side_cancel_and_status(flavor, emulator):
    """``on_kill`` of a non-deferred step: the sync client cancels; cancelling a finished job is quiet."""
    hook = make_hook(flavor)
    handle = hook.submit(make_spec(hook, sleep_then_return, 120, task_id="sync_cancel"))
    eventually(lambda: hook.get_status(handle).state is JobState.RUNNING and emulator.pids(handle["job_id"]),
               what="the step to start")
    assert flavor != "modal" or hook.get_status(handle).details["modal_task_id"].startswith("ta-")
    hook.cancel(handle)
    emulator.wait_for_state(handle["job_id"], "cancelled")
    assert hook.get_status(handle).state is JobState.CANCELLED
    eventually(lambda: emulator.pids(handle["job_id"]) == [], 10, "the step's process to end")
    hook.cancel(handle)  # already finished: quiet
    if flavor != "modal":  # a job that is not there is a failure
        key = "name" if flavor == "vertex" else "job_id"
        other = handle[key][:-1] + ("1" if handle[key].endswith("0") else "0")
        missing = hook.get_status({**handle, key: other})
        assert missing.state is JobState.FAILED and missing.details["reason"] == "job_missing", missing


#: the flavors whose steps run in a container image
CONTAINER = sorted(JOBS_OF_TRY)


def plain_image_hook(flavor, monkeypatch, index):
    """A step operator of ``flavor`` that names no image, its jobs installing from the tests' package index
    (Kubernetes: with a pvc:// store, whose claim keeps installed requirements)."""
    like = "k8s_pvc_step_operator" if flavor == "kubernetes" else ""
    return make_hook(flavor, f"{flavor}_default_image", monkeypatch, like=like, image=None,
                     environment={"PIP_INDEX_URL": index.url})


def with_requirements(flavor, requirements):
    """``flavor``'s settings with ``requirements`` (SageMaker: in a warm pool, whose cache keeps them)."""
    pool = {"keep_alive_period_in_seconds": 600} if flavor == "sagemaker" else {}
    return get_flavor(flavor).settings_model()(requirements=requirements, **pool)


def finished(hook, spec, timeout=180):
    """Submit ``spec``, wait as a deferred task does: the event, and what the step left."""
    handle = hook.submit(spec)
    event = run_trigger(hook, handle, timeout=timeout)
    hook.collect_output(handle)
    return event, read_outcome(store_path(handle["output_uri"]))


@pytest.mark.parametrize("flavor", CONTAINER)
def test_requirements_install_when_the_job_starts_on_the_default_image_and_are_cached(
        flavor, emulator, package_index, monkeypatch):
    hook = plain_image_hook(flavor, monkeypatch, package_index)
    spec = make_spec(hook, import_probe, task_id="requirements", settings=with_requirements(flavor, [f"{PROBE}==1.0"]))
    image = hook.image(spec)
    assert (f"-py{worker_python().replace('.', '')}-" in image if flavor == "sagemaker" else image == python_image())
    event, outcome = finished(hook, spec)
    log = "\n".join(event["log_tail"])
    assert event["status"] == "succeeded" and outcome.value == PROBE_VALUE, (event, outcome)
    assert "the image has no cloudpickle" in log and "requirements: installed in" in log, log
    again = make_spec(hook, import_probe, task_id="requirements_again",
                      settings=with_requirements(flavor, [f"{PROBE}==1.0"]))
    event, outcome = finished(hook, again)
    log = "\n".join(event["log_tail"])
    assert outcome.value == PROBE_VALUE and "reused the install cached" in log and "pip install" not in log, log


@pytest.mark.parametrize("flavor", CONTAINER)
def test_a_requirement_pip_cannot_install_fails_the_step_naming_it(flavor, emulator, package_index, monkeypatch):
    hook = plain_image_hook(flavor, monkeypatch, package_index)
    spec = make_spec(hook, import_probe, task_id="unknown_requirement",
                     settings=with_requirements(flavor, ["stepops-no-such-package==1.0"]))
    event, outcome = finished(hook, spec)
    assert event["status"] == "failed" and outcome is not None and outcome.error, event
    error = outcome.error
    assert (error["type"], error["phase"]) == (protocol.REQUIREMENTS_TYPE, "install"), error
    raised = rebuild_remote_error(error["type"], error["message"], error.get("traceback", ""))
    assert isinstance(raised, StepRequirementsError)
    assert "stepops-no-such-package==1.0" in str(raised) and "exit code 1" in str(raised), raised


@pytest.mark.parametrize("flavor", CONTAINER)
def test_render_shows_the_default_image_and_the_install_step(flavor, emulator, package_index, monkeypatch, airflow_db):
    hook = plain_image_hook(flavor, monkeypatch, package_index)  # the step operator of tests/dags/requirements_steps.py
    body = render(emulator, flavor, "requirements_steps", f"on_{flavor}")
    spec = make_spec(hook, import_probe, task_id=f"on_{flavor}", settings=with_requirements(flavor, [f"{PROBE}==1.0"]))
    assert body["image"] == hook.image(spec), body
    assert flavor == "azureml" or body["image"] in json.dumps(body["request"])  # Azure ML: an environment of it
    install = body["install"]
    assert install["requirements"] == ["# what the steps of requirements_steps.py install", f"{PROBE}==1.0",
                                       "--prefer-binary"], install
    assert install["cache"] == hook.requirements_cache(spec) and install["cache"].startswith(("/", "${{")), install


def test_a_dag_of_steps_with_requirements_runs_on_every_container_flavor(request, package_index, monkeypatch,
                                                                         airflow_db):
    """The operator reads the requirements file beside the DAG file and ships it: each step imports the package."""
    from airflow_stepops._compat import dagbag_class

    from .unit.test_operator import _run, _xcom

    for flavor in CONTAINER:
        request.getfixturevalue(EMULATORS[flavor])
        plain_image_hook(flavor, monkeypatch, package_index)
    dags = Path(__file__).parent / "dags"
    run, tis = _run(dagbag_class()(dag_folder=str(dags / "requirements_steps.py")).get_dag("requirements_steps"))
    assert run.state == "success", {k: ti.state for k, ti in tis.items()}
    assert {task_id: _xcom(ti) for task_id, ti in tis.items()} == {f"on_{f}": PROBE_VALUE for f in CONTAINER}


# capacity failures ------------------------------------------------------------------------------------------------
# A job that never got capacity is FAILED with a reason of CAPACITY_REASONS (the operator moves such a step to its
# next step operator); one that waited longer than max_queue_seconds is stopped and reported as "queue_timeout".

def _capacity_fault(flavor, emulator):
    """Inject ``flavor``'s fault of a job that gets no capacity; the settings the step needs for it."""
    if flavor == "kubernetes":  # no node can take the pod
        emulator.inject("unschedulable", message="0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
                        duration=None)
        return get_flavor(flavor).settings_model()(unschedulable_timeout_seconds=1)
    if flavor == "sagemaker":
        emulator.inject("insufficient_capacity", job_prefix="sm-tests-capacity-fault")
    else:
        emulator.inject("stockout", after=0.2)
    return None


#: flavor -> the reason its capacity fault is reported with. Azure ML and Modal fail no job for want of capacity:
#: their jobs wait queued (see hooks/azureml.py QUOTA_CODES, hooks/modal.py submit), which max_queue_seconds bounds.
CAPACITY_FAULTS = {"kubernetes": "unschedulable", "sagemaker": "insufficient_capacity", "vertex": "stockout"}


@pytest.mark.parametrize("flavor", sorted(CAPACITY_FAULTS))
def test_a_job_without_capacity_fails_with_a_capacity_reason(flavor, emulator):
    from airflow_stepops.hooks.base import CAPACITY_REASONS

    hook = make_hook(flavor)
    spec = make_spec(hook, sleep_then_return, 0, task_id="capacity_fault", settings=_capacity_fault(flavor, emulator))
    handle = hook.submit(spec)
    event = run_trigger(hook, handle)
    assert event["status"] == "failed" and event["details"]["reason"] == CAPACITY_FAULTS[flavor], event
    status = hook.get_status(handle) if flavor != "kubernetes" else None  # (the pending Job was deleted)
    assert status is None or (status.state is JobState.FAILED and status.details["reason"] in CAPACITY_REASONS)


def _hold_queued(flavor, emulator):
    """The next job waits for capacity: a pod no node takes (one scheduled and pulling its image has capacity)."""
    if flavor == "kubernetes":
        emulator.inject("unschedulable", message="0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
                        duration=120)
    else:
        emulator.inject("slow_start", duration=120)


#: flavor -> whether a job of its emulator is gone or stopped (what the trigger's cancel leaves)
def _stopped(flavor, emulator, spec, handle):
    if flavor == "kubernetes":
        return JOBS_OF_TRY["kubernetes"](emulator, spec, handle) == 0
    emulator.wait_for_state(handle["job_id"], "cancelled")
    return True


@pytest.mark.parametrize("flavor", REMOTE)
def test_a_job_queued_past_max_queue_seconds_is_stopped_as_a_queue_timeout(flavor, emulator):
    import time

    hook = make_hook(flavor)
    spec = make_spec(hook, sleep_then_return, 0, task_id="queue_timeout")
    spec.max_queue_seconds = 1.5
    _hold_queued(flavor, emulator)
    handle = hook.submit(spec)
    assert handle["max_queue_seconds"] == 1.5
    handle["submitted_at"] = time.time()  # as the operator records it
    event = run_trigger(hook, handle)
    assert event["status"] == "failed" and event["details"]["reason"] == "queue_timeout", event
    assert "max_queue_seconds=1.5" in event["message"], event
    assert eventually(lambda: _stopped(flavor, emulator, spec, handle), what="the queued job to be stopped")


@pytest.mark.parametrize("flavor", [f for f in REMOTE if f != "kubernetes"])  # its clock is the Job's own age
def test_the_queue_limit_counts_from_submission_across_trigger_restarts(flavor, emulator):
    """A triggerer that restarts (a new trigger for the same handle) does not restart the clock."""
    import time

    hook = make_hook(flavor)
    spec = make_spec(hook, sleep_then_return, 0, task_id="queue_timeout_restart")
    spec.max_queue_seconds = 30
    _hold_queued(flavor, emulator)
    handle = {**hook.submit(spec), "submitted_at": time.time() - 60}
    started = time.monotonic()
    event = run_trigger(hook, handle)
    assert event["details"]["reason"] == "queue_timeout" and time.monotonic() - started < 20, event


def test_a_pod_unschedulable_past_max_queue_seconds_is_a_queue_timeout_of_the_kubernetes_flavor(request):
    """Kubernetes' own mechanism: the shorter of unschedulable_timeout_seconds and max_queue_seconds decides."""
    emulator = request.getfixturevalue(EMULATORS["kubernetes"])
    hook = make_hook("kubernetes")
    spec = make_spec(hook, sleep_then_return, 0, task_id="unschedulable_queue")
    spec.max_queue_seconds = 1
    emulator.inject("unschedulable", message="0/1 nodes are available: 1 Insufficient cpu.", duration=None)
    handle = hook.submit(spec)
    status = eventually(lambda: (s := hook.get_status(handle)).state.terminal and s, what="the pod to time out")
    assert status.state is JobState.FAILED and status.details["reason"] == "queue_timeout", status
    assert "max_queue_seconds=1" in status.message and status.details["stop_job"], status
    hook.cancel(handle)


#: flavor -> how its emulator refuses a create for quota
QUOTA_REFUSALS = {
    "azureml": lambda emu: emu.inject("quota_exceeded"),
    "vertex": lambda emu: emu.inject("quota_exceeded"),
    "sagemaker": lambda emu: emu.fail_requests(
        "ResourceLimitExceeded", action="CreateTrainingJob",
        message="The account-level service limit 'ml.m5.large for training job usage' is 0 Instances, with current "
                "utilization of 0 Instances and a request delta of 1 Instances. Please use AWS Service Quotas to "
                "request an increase for this quota.")}


@pytest.mark.parametrize("flavor", sorted(QUOTA_REFUSALS))
def test_a_create_refused_for_quota_is_a_capacity_error_and_nothing_runs(flavor, emulator):
    from airflow_stepops.exceptions import StepCapacityError

    hook = make_hook(flavor)
    spec = make_spec(hook, sleep_then_return, 0, task_id="quota_capacity")
    before = len(emulator.job_ids)
    QUOTA_REFUSALS[flavor](emulator)
    with pytest.raises(StepCapacityError, match="quota") as raised:
        hook.submit(spec)
    assert raised.value.reason == "quota_exceeded"
    assert hook.find_job(spec.identity) is None and len(emulator.job_ids) == before


def test_a_modal_call_waiting_for_a_gpu_type_without_capacity_is_a_queue_timeout(request):
    """Modal fails no call for want of GPUs, it keeps it waiting: max_queue_seconds turns that into a capacity
    failure."""
    from airflow_stepops.settings.modal import ModalStepOperatorSettings

    pytest.importorskip("modal")
    emulator = request.getfixturevalue(EMULATORS["modal"])
    request.getfixturevalue("modal_step_operator")
    hook = make_hook("modal")
    spec = make_spec(hook, sleep_then_return, 0, task_id="no_h100", settings=ModalStepOperatorSettings(gpu="H100"))
    spec.max_queue_seconds = 1.5
    emulator.inject("no_capacity", gpu="H100")
    try:
        event = run_trigger(hook, hook.submit(spec))
    finally:
        emulator.clear_faults()
    assert event["status"] == "failed" and event["details"]["reason"] == "queue_timeout", event


# on-demand escalation ----------------------------------------------------------------------------------------------

#: flavor -> (settings that ask for spot capacity, connection extras the on-demand attempt needs)
SPOT_SETTINGS = {"sagemaker": ({"use_spot_instances": True}, {}), "vertex": ({"use_spot": True}, {}),
                 "azureml": ({"job_tier": "Spot"}, {}), "modal": ({}, {}),
                 "kubernetes": ({"use_spot": True}, {"on_demand_pod_overrides": {
                     "node_selector": {"karpenter.sh/capacity-type": "on-demand"}}})}
#: flavor -> whether a rendered request runs on spot capacity (True), on-demand capacity (False)
RENDERED_SPOT = {
    "sagemaker": lambda r: r["EnableManagedSpotTraining"] and "MaxWaitTimeInSeconds" in r["StoppingCondition"],
    "vertex": lambda r: {"SPOT": True, "STANDARD": False}[r["jobSpec"]["scheduling"]["strategy"]],
    "azureml": lambda r: {"Spot": True, "Standard": False}[r["properties"]["queueSettings"]["jobTier"]],
    "kubernetes": lambda r: {"spot": True, "on-demand": False}[
        r["spec"]["template"]["spec"]["nodeSelector"]["karpenter.sh/capacity-type"]],
    "modal": lambda r: not r["options"].get("nonpreemptible"),
}


@pytest.mark.parametrize("flavor", REMOTE)
def test_a_spot_step_renders_on_demand_when_escalated(flavor, emulator, monkeypatch):
    settings, extras = SPOT_SETTINGS[flavor]
    hook = make_hook(flavor, f"{flavor}_on_demand", monkeypatch, **extras)
    spec = make_spec(hook, sleep_then_return, 0, task_id="escalated",
                     settings=get_flavor(flavor).settings_model()(**settings))
    assert hook.spot(spec) is True
    assert RENDERED_SPOT[flavor](hook.render(spec)) is True
    hook.check_on_demand(spec)  # what the connection gives is enough to escalate
    spec.on_demand = True
    on_demand = hook.render(spec)
    assert RENDERED_SPOT[flavor](on_demand) is False, on_demand
    assert hook.spot(spec) is True  # what the settings ask for, whatever the attempt runs on


# failover and escalation, before anything is submitted ------------------------------------------------------------
def test_render_shows_every_step_operator_of_a_list_and_its_on_demand_request(sm_emulator, vx_emulator, airflow_db):
    before = set(vx_emulator.job_ids)
    body = render(sm_emulator, "sagemaker", "failover_steps", "fit")
    sagemaker, vertex = body["candidates"]
    assert (sagemaker["step_operator"], vertex["step_operator"]) == ("sagemaker_step_operator", "vertex_step_operator")
    assert sagemaker["request"]["EnableManagedSpotTraining"] is True
    assert sagemaker["on_demand_request"]["EnableManagedSpotTraining"] is False  # the budget's last attempt
    assert vertex["request"]["jobSpec"]["scheduling"]["strategy"] == "SPOT"
    assert vertex["on_demand_request"]["jobSpec"]["scheduling"]["strategy"] == "STANDARD"
    assert body["request"] == sagemaker["request"] and set(vx_emulator.job_ids) <= before  # nothing submitted


def _step(step_operator, **kwargs):
    from airflow_stepops.operators.base import StepOperator

    return StepOperator(task_id="capacity_checks", python_callable=sleep_then_return, step_operator=step_operator,
                        **kwargs)


@pytest.mark.parametrize(("step_operator", "settings", "says"), [
    (["k8s_step_operator", "no_such_operator"], {}, "'no_such_operator': no Airflow connection"),
    (["k8s_step_operator"], {"step_operator.vertex": {"use_spot": True}},
     "'step_operator.vertex' settings were given, but no step operator of the step is of flavor 'vertex'"),
    (["k8s_no_overrides"], {"step_operator.kubernetes": {"use_spot": True}}, "on_demand_pod_overrides"),
])
def test_what_a_list_of_step_operators_cannot_do_is_refused_before_submitting(k8s_emulator, monkeypatch, step_operator,
                                                                              settings, says):
    from airflow_stepops.bundle import StepIdentity

    make_hook("kubernetes", "k8s_no_overrides", monkeypatch, on_demand_pod_overrides=None)

    before = set(k8s_emulator.job_ids)
    with pytest.raises(StepOperatorConfigError, match=re.escape(says)):
        _step(step_operator, settings=settings).check_step_operators(StepIdentity("d", "r", "t", -1, 1))
    assert set(k8s_emulator.job_ids) == before


def test_a_spot_step_that_only_retries_needs_no_on_demand_overrides(k8s_emulator):
    from airflow_stepops.bundle import StepIdentity

    _step(["k8s_step_operator"], on_preemption="retry",
          settings={"step_operator.kubernetes": {"use_spot": True}}).check_step_operators(
        StepIdentity("d", "r", "t", -1, 1))


# cost ---------------------------------------------------------------------------------------------------------------
# Every flavor prices a step (its table, or for Kubernetes the connection's prices), refuses a max_cost that cannot pay
# for the least it bills before anything is submitted, puts the run time max_cost leaves into its request, and its
# trigger stops the job when that run time is spent ("cost_limit").

#: what the cost tests' steps reserve (Kubernetes prices exactly this)
COST_RESOURCES = {"cpu_count": 1, "memory": "1GiB"}
K8S_PRICES = {"on_demand": {"cpu_hour": 0.9, "memory_gib_hour": 0.09}}


def _priced_hook(flavor, monkeypatch):
    """``flavor``'s step operator; Kubernetes' with ``prices`` (a cluster has no list price)."""
    if flavor == "kubernetes":
        return make_hook(flavor, "k8s_priced", monkeypatch, prices=K8S_PRICES)
    return make_hook(flavor)


def _cost_step(hook, **kwargs):
    return _step([hook.step_operator_conn_id], resources=COST_RESOURCES, **kwargs)


def _cost_spec(hook, task_id, seconds):
    from airflow_stepops.resources import ResourceSettings

    return make_spec(hook, sleep_then_return, seconds, task_id=task_id, resources=ResourceSettings(**COST_RESOURCES))


@pytest.mark.parametrize("flavor", REMOTE)
def test_the_estimate_of_a_step_is_its_rate_over_its_maximum_runtime(flavor, emulator, monkeypatch):
    from airflow_stepops.cost import estimate

    hook = _priced_hook(flavor, monkeypatch)
    spec = _cost_spec(hook, "estimate", 0)
    price = hook.price(spec)
    found = estimate(hook, spec)
    assert price.per_hour and price.per_hour > 0 and found["rate_per_hour"] == round(price.per_hour, 6), found
    assert found["currency"] == "USD" and found["basis"] and found["source"], found
    runtime = found["max_runtime_seconds"]
    assert runtime == hook.max_runtime(spec), found
    if runtime is None:  # Kubernetes and Azure ML set no runtime limit of their own
        assert flavor in ("kubernetes", "azureml") and found["most"] == "unbounded (no maximum runtime)", found
    else:
        assert found["most"] == pytest.approx(price.per_hour * price.billed_seconds(runtime) / 3600, abs=1e-6)
    limit = "timeout" if flavor == "modal" else "max_runtime_in_seconds"
    spec.settings = get_flavor(flavor).settings_model()(**{limit: 1800})
    found = estimate(hook, spec)
    assert found["max_runtime_seconds"] == 1800 and found["most"] == pytest.approx(price.per_hour / 2, abs=1e-6), found
    if flavor == "kubernetes":
        assert price.per_hour == pytest.approx(0.9 + 0.09) and "'k8s_priced'" in found["source"]


@pytest.mark.parametrize("flavor", REMOTE)
def test_a_max_cost_too_small_is_refused_before_anything_is_submitted(flavor, emulator, monkeypatch):
    from airflow_stepops.bundle import StepIdentity
    from airflow_stepops.exceptions import StepCostLimitError

    hook = _priced_hook(flavor, monkeypatch)
    before = set(emulator.job_ids)
    with pytest.raises(StepCostLimitError, match=rf"max_cost=1e-07 does not pay for the least the step can be "
                                                 rf"billed on step operator '{hook.step_operator_conn_id}'"):
        _cost_step(hook, max_cost=1e-7).check_step_operators(StepIdentity("d", "r", "cost_refused", -1, 1))
    assert set(emulator.job_ids) == before


def test_an_unpriced_kubernetes_step_operator_refuses_max_cost_naming_the_missing_prices(k8s_emulator):
    from airflow_stepops.bundle import StepIdentity
    from airflow_stepops.exceptions import StepCostLimitError

    before = set(k8s_emulator.job_ids)
    with pytest.raises(StepCostLimitError, match=r"max_cost=5: the price of the step on step operator "
                                                 r"'k8s_step_operator' is unknown .*no on-demand prices "
                                                 r"\(prices\.on_demand"):
        _step(["k8s_step_operator"], max_cost=5, resources=COST_RESOURCES).check_step_operators(
            StepIdentity("d", "r", "cost_unpriced", -1, 1))
    assert set(k8s_emulator.job_ids) == before


#: flavor -> the run time limit of a submitted job, as its emulator received it
RUNTIME_LIMITS = {
    "sagemaker": lambda sm, handle: sm.job(handle["job_id"])["StoppingCondition"]["MaxRuntimeInSeconds"],
    "vertex": lambda vx, handle: int(vx.job(handle["job_id"])["jobSpec"]["scheduling"]["timeout"].rstrip("s")),
    "azureml": lambda az, handle: az.job(handle["job_id"])["properties"]["limits"]["timeout"],
    "kubernetes": lambda k8s, handle: [j["spec"].get("activeDeadlineSeconds") for j in k8s.list_objects(
        "jobs", "steps", f"{STEP_LABEL}={handle['step']}")],
    "modal": lambda md, handle: md.function(handle["app_name"], "run_step")["timeout_secs"]}
#: flavor -> RUNTIME_LIMITS of a job limited to 5 s
FIVE_SECONDS = {"sagemaker": 5, "vertex": 5, "azureml": "PT5S", "kubernetes": [5], "modal": 5}


@pytest.mark.parametrize("flavor", REMOTE)
def test_a_step_that_spends_its_max_cost_is_stopped_by_the_trigger(flavor, emulator, monkeypatch):
    import time

    from airflow_stepops.cost import handle_cost

    hook = _priced_hook(flavor, monkeypatch)
    spec = _cost_spec(hook, "cost_stop", 60)
    rate = hook.price(spec).per_hour
    # Azure ML bills at least a minute: no max_cost buys less, so its 5 s are set as the operator would compute them;
    # SageMaker bills up to 120 s to stop a job, which max_cost keeps back
    seconds = 60 if flavor == "azureml" else 5
    max_cost = rate * (seconds + hook.stop_billing_seconds) / 3600 * 1.0001
    built = _cost_step(hook, max_cost=max_cost).build_spec(hook, spec.identity, [])
    assert built.cost_seconds == seconds and built.price.per_hour == rate, built
    spec.price, spec.cost_seconds = built.price, 5
    assert hook.max_runtime(spec) == 5
    handle = {**hook.submit(spec), "submitted_at": time.time()}
    handle["cost"] = handle_cost(spec, max_cost, 0.0, hook.max_runtime(spec))
    assert RUNTIME_LIMITS[flavor](emulator, handle) == FIVE_SECONDS[flavor]  # the backend's own backstop
    event = run_trigger(hook, handle)
    assert event["status"] == "cost_limit", event
    assert "its accrued cost reached max_cost (5 s of run time)" in event["message"], event
    details = event["details"]
    assert 2.5 <= details["finished_at"] - details["started_at"] < 5, details  # 2 s before the limit
    assert eventually(lambda: _stopped(flavor, emulator, spec, handle), what="the job to be stopped")
    if flavor != "kubernetes":
        assert eventually(lambda: emulator.pids(handle["job_id"]) == [], 15, "the step's process to end")


@pytest.mark.parametrize("flavor", REMOTE)
def test_the_charge_of_a_finished_step_is_its_rate_times_its_billed_seconds(flavor, emulator, monkeypatch):
    from airflow_stepops.cost import charge, handle_cost

    hook = _priced_hook(flavor, monkeypatch)
    spec = _cost_spec(hook, "cost_charge", 1)
    spec.price = hook.price(spec)
    handle = hook.submit(spec)
    handle["cost"] = handle_cost(spec, None, 0.0, hook.max_runtime(spec))
    event = run_trigger(hook, handle)
    assert event["status"] == "succeeded", event
    charged = charge(handle, event["details"])
    rate, billed = spec.price.per_hour, charged["billed_seconds"]
    assert billed > 0 and charged["rate_per_hour"] == rate and charged["currency"] == "USD", charged
    assert charged["amount"] == round(rate * billed / 3600, 9), charged
    if flavor == "sagemaker":  # the service's own billed seconds
        assert billed == emulator.job(handle["job_id"])["BillableTimeInSeconds"] >= 1
    elif flavor == "azureml":  # at least a minute
        assert billed == 60
    else:
        details = event["details"]
        assert billed == spec.price.billed_seconds(details["finished_at"] - details["started_at"]) >= 1, details


@pytest.mark.parametrize("flavor", ["local", *REMOTE])
def test_render_shows_the_rate_the_most_an_attempt_can_cost_and_what_max_cost_pays_for(flavor, request, monkeypatch,
                                                                                       airflow_db):
    """``stepops render`` of a step with max_cost=50 and a two-hour execution_timeout (tests/dags/cost_steps.py)."""
    from .dags.cost_steps import ESTIMATED

    emulator = request.getfixturevalue(EMULATORS[flavor]) if flavor != "local" else None
    if flavor == "modal":
        request.getfixturevalue("modal_step_operator")
    hook = _priced_hook(flavor, monkeypatch) if flavor != "local" else make_hook("local", ESTIMATED["local"])
    body = render(emulator, flavor, "cost_estimates", f"on_{flavor}") if emulator is not None else _render_local()
    cost = body["cost"]
    spec = make_spec(hook, int, task_id=f"on_{flavor}", dag_id="cost_estimates", timeout_seconds=7200,
                     resources=ResourceSettings(cpu_count=1, memory="1GiB"))
    price = hook.price(spec)
    rate, spec.cost_seconds = price.per_hour, price.seconds_within(50.0)
    assert rate and cost["rate_per_hour"] == pytest.approx(rate) and cost["currency"] == "USD", cost
    runtime = cost["max_runtime_seconds"]
    assert runtime and runtime == hook.max_runtime(spec), cost  # the limit the request carries (max_cost's too)
    assert cost["most"] == pytest.approx(rate * runtime / 3600, rel=1e-3, abs=1e-6), cost
    assert cost["max_cost"]["limit"] == 50.0 and cost["max_cost"]["runtime_within_seconds"] > 0, cost


def _render_local():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "airflow_stepops.cli", "render", "cost_estimates", "on_local"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout[out.stdout.index("{"):])
