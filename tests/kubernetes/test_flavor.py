"""The kubernetes flavor against the emulator: real clients, real Jobs, real processes.

Hook and trigger level: every Job the flavor creates is read back from the API server and validated
against the Kubernetes OpenAPI schema.
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

pytest.importorskip("kubernetes")
pytest.importorskip("kubernetes_validate")

from airflow_stepops.artifacts import store_path
from airflow_stepops.bundle import read_outcome
from airflow_stepops.exceptions import StepOperatorConfigError
from airflow_stepops.hooks import kubernetes_job as manifest
from airflow_stepops.resources import ResourceSettings
from airflow_stepops.runtime.protocol import OUTPUT_PREFIX, REF_MARKER, Env, staged_ref
from airflow_stepops.settings.kubernetes import KubernetesStepOperatorSettings
from airflow_stepops.testing.kubernetes import FAULT_ANNOTATION

from ..flavorjobs import hook_maker, make_spec, run_trigger
from ..steps import sleep_then_return
from .conftest import validate_job

make_hook = hook_maker("kubernetes")

pytestmark = pytest.mark.usefixtures("k8s_emulator")
NS = "steps"


def _job(k8s, handle):
    return k8s.get_object("jobs", NS, handle["job_id"])


def _gone(k8s, handle, timeout=20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _job(k8s, handle) is None and not k8s.list_objects(
                "pods", NS, f"{manifest.STEP_LABEL}={handle['step']}"):
            return True
        time.sleep(0.1)
    return False


def _wait_running(hook, handle, timeout: float = 30.0) -> None:
    from airflow_stepops.hooks.base import JobState

    deadline = time.monotonic() + timeout
    while hook.get_status(handle).state is not JobState.RUNNING:
        assert time.monotonic() < deadline, "the step did not start"
        time.sleep(0.2)


def _greet(name: str) -> dict:
    import os

    print("hello", name, "from", os.environ["STEPOPS_FLAVOR"])
    return {"greeting": f"hi {name}", "threads": os.environ.get("OMP_NUM_THREADS")}


def test_step_runs_as_a_validated_job_with_logs_and_an_inline_result(k8s_emulator):
    hook = make_hook()
    spec = make_spec(hook, _greet, "ada", task_id="greet",
                     resources=ResourceSettings(cpu_count=1.5, memory="3GiB", disk_size="10GB", gpu_count=1,
                                                gpu_type="A100"),
                     settings=KubernetesStepOperatorSettings(max_runtime_in_seconds=600, labels={"team": "ml"},
                                                             environment={"OMP_NUM_THREADS": "2"}))
    handle = hook.submit(spec)
    event = run_trigger(hook, handle)
    assert event["status"] == "succeeded", event
    assert "hello ada from kubernetes" in event["log_tail"]
    assert not any(OUTPUT_PREFIX.format(marker="") in line for line in event["log_tail"])  # data is not shown as log
    # the trigger already secured the output from the pod log, before the task resumes on a worker
    assert read_outcome(store_path(handle["output_uri"])).value == {"greeting": "hi ada", "threads": "2"}

    job = _job(k8s_emulator, handle)
    validate_job(job)
    assert len(job["metadata"]["name"]) <= 63 and job["metadata"]["labels"]["team"] == "ml"
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["activeDeadlineSeconds"] == 600
    assert job["spec"]["ttlSecondsAfterFinished"] == 3600
    pod = job["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["requests"] == {"cpu": "1500m", "memory": "3Gi", "ephemeral-storage": "10G",
                                     "nvidia.com/gpu": "1"}
    assert resources["limits"] == {"memory": "3Gi", "ephemeral-storage": "10G", "nvidia.com/gpu": "1"}
    term = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
    assert term["matchExpressions"][0]["key"] == "nvidia.com/gpu.product"
    assert "NVIDIA-A100-SXM4-40GB" in term["matchExpressions"][0]["values"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert hook.console_url(handle) == f"https://k8s.example/#/job/steps/{handle['job_id']}"


def test_gpu_type_no_node_has_fails_fast_with_the_schedulers_reason(k8s_emulator):
    hook = make_hook()
    spec = make_spec(hook, _greet, "x", task_id="gpu_type",
                     resources=ResourceSettings(gpu_count=1, gpu_type="H100"),
                     settings=KubernetesStepOperatorSettings(unschedulable_timeout_seconds=1))
    handle = hook.submit(spec)
    event = run_trigger(hook, handle)
    assert event["status"] == "failed"
    assert "unschedulable" in event["message"] and "node affinity" in event["message"], event["message"]
    assert _gone(k8s_emulator, handle), "the pending Job was not deleted"


def test_more_gpus_than_any_node_has_fails_fast(k8s_emulator):
    hook = make_hook()
    spec = make_spec(hook, _greet, "x", task_id="many_gpus", resources=ResourceSettings(gpu_count=8),
                     settings=KubernetesStepOperatorSettings(unschedulable_timeout_seconds=1))
    handle = hook.submit(spec)
    event = run_trigger(hook, handle)
    assert event["status"] == "failed" and "Insufficient nvidia.com/gpu" in event["message"], event["message"]
    assert _gone(k8s_emulator, handle)


@pytest.mark.parametrize(("fault", "reason"), [("image_pull", "ImagePullBackOff|ErrImagePull"),
                                              ("create_container_config", "CreateContainerConfigError")])
def test_pods_that_cannot_start_fail_fast_naming_the_reason(k8s_emulator, fault, reason):
    import re

    hook = make_hook()
    spec = make_spec(hook, _greet, "x", task_id=f"cannot_start_{fault}",
                     settings=KubernetesStepOperatorSettings(annotations={FAULT_ANNOTATION: fault}))
    handle = hook.submit(spec)
    event = run_trigger(hook, handle)
    assert event["status"] == "failed" and re.search(reason, event["message"]), event["message"]
    assert _gone(k8s_emulator, handle)


@pytest.mark.parametrize("fault", ["evicted", "preempted", "node_shutdown"])
def test_disrupted_pods_are_reported_as_preemption(k8s_emulator, fault):
    hook = make_hook()
    spec = make_spec(hook, sleep_then_return, 30, task_id=f"disrupted_{fault}", settings=KubernetesStepOperatorSettings(
        annotations={FAULT_ANNOTATION: json.dumps({"kind": fault, "after": 0.5})}))
    handle = hook.submit(spec)
    event = run_trigger(hook, handle)
    assert event["status"] == "preempted", event
    validate_job(_job(k8s_emulator, handle))


def test_oom_killed_step_names_its_memory_limit(k8s_emulator):
    hook = make_hook()
    spec = make_spec(hook, sleep_then_return, 30, task_id="oom", resources=ResourceSettings(memory="256MiB"),
                     settings=KubernetesStepOperatorSettings(annotations={FAULT_ANNOTATION: json.dumps(
                         {"kind": "oom_killed", "after": 0.5})}))
    event = run_trigger(hook, hook.submit(spec))
    assert event["status"] == "failed" and "OOMKilled" in event["message"] and "256Mi" in event["message"]


def _write_pid_and_sleep(seconds: float) -> None:
    import os
    import time

    print("pid", os.getpid(), flush=True)
    time.sleep(seconds)


def _make_bytes(size: int) -> bytes:
    import os

    return os.urandom(size)


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_large_bundles_results_and_inputs_go_through_the_artifact_store(k8s_emulator):
    import hashlib

    hook = make_hook()
    big = os.urandom(3 << 20)  # incompressible, 6x the inline limit
    handle = hook.submit(make_spec(hook, _digest, big, task_id="big_bundle"))
    job = _job(k8s_emulator, handle)
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env[Env.BUNDLE_URI] == handle["output_uri"].rsplit("/", 1)[0] + "/bundle"
    assert run_trigger(hook, handle)["status"] == "succeeded"
    hook.collect_output(handle)
    assert read_outcome(store_path(handle["output_uri"])).value == hashlib.sha256(big).hexdigest()

    producer = hook.submit(make_spec(hook, _make_bytes, 2 << 20, task_id="big_result"))
    assert run_trigger(hook, producer)["status"] == "succeeded"
    hook.collect_output(producer)
    ref = read_outcome(store_path(producer["output_uri"])).value
    assert ref.size > 2 << 20 and ref.uri.startswith("file://")
    consumer = hook.submit(make_spec(hook, _digest, {REF_MARKER: 0}, task_id="big_input", refs=[ref]))
    consumer_env = {e["name"]: e.get("value") for e in
                    _job(k8s_emulator, consumer)["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert json.loads(consumer_env[Env.REFS]) == {"0": {"uri": ref.uri}}
    assert run_trigger(hook, consumer)["status"] == "succeeded"
    hook.collect_output(consumer)
    assert read_outcome(store_path(consumer["output_uri"])).value == hashlib.sha256(ref.load()).hexdigest()


def _make_set() -> set:
    return {"a", "b"}


def _describe(value) -> list:
    return [*sorted(value), type(value).__name__]


def test_small_artifacts_travel_inline_both_ways(k8s_emulator):
    hook = make_hook()
    producer = hook.submit(make_spec(hook, _make_set, task_id="small_ref"))
    assert run_trigger(hook, producer)["status"] == "succeeded"
    hook.collect_output(producer)
    ref = read_outcome(store_path(producer["output_uri"])).value
    assert ref.type == "builtins.set"
    consumer = hook.submit(make_spec(hook, _describe, {REF_MARKER: 0}, task_id="small_ref_input",
                                     refs=[ref]))
    env = {e["name"]: e.get("value") for e in
           _job(k8s_emulator, consumer)["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert json.loads(env[Env.REFS]) == {"0": {"inline": staged_ref(0)}} and int(env[Env.BUNDLE_PARTS]) >= 1
    assert run_trigger(hook, consumer)["status"] == "succeeded"
    hook.collect_output(consumer)
    assert read_outcome(store_path(consumer["output_uri"])).value == ["a", "b", "set"]


def test_pvc_artifact_store_is_mounted_into_the_pod(k8s_emulator):
    hook = make_hook("k8s_pvc_step_operator")
    handle = hook.submit(make_spec(hook, _make_bytes, 1 << 20, task_id="pvc"))
    job = _job(k8s_emulator, handle)
    validate_job(job)
    pod = job["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "stepops-artifacts", "persistentVolumeClaim": {"claimName": "step-data"}}]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env[Env.OUTPUT_PATH].startswith("/var/run/stepops/store/k8s_tests/")
    assert run_trigger(hook, handle)["status"] == "succeeded"
    hook.collect_output(handle)  # nothing to collect: the pod wrote to the volume
    ref = read_outcome(store_path(handle["output_uri"])).value
    assert ref.size > 1 << 20 and len(ref.load()) == 1 << 20


def test_render_validates_before_anything_is_created(k8s_emulator, monkeypatch):
    hook = make_hook()
    job = hook.render(make_spec(hook, _greet, "x", task_id="render_only"))
    validate_job(job)
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][:2] == ["python3", "-c"]
    monkeypatch.setenv("AIRFLOW_CONN_K8S_NO_IMAGE", json.dumps({"conn_type": "stepops_kubernetes", "extra": {
        "config_file": os.environ["AIRFLOW_HOME"] + "/kubeconfig", "kubernetes_namespace": NS}}))
    bare = make_hook("k8s_no_image")  # no image: the default one of the workers' Python
    container = bare.render(make_spec(bare, _greet, "x", task_id="no_image"))["spec"]["template"]["spec"]["containers"]
    assert container[0]["image"] == f"python:{sys.version_info[0]}.{sys.version_info[1]}-slim"
    assert k8s_emulator.list_objects("jobs", NS, f"{manifest.LABEL_PREFIX}/task-id=no_image") == []


def test_metadata_the_api_server_would_refuse_is_refused_when_building_the_job(k8s_emulator):
    with pytest.raises(ValueError, match="'not/a/key' is not a valid annotation key"):
        KubernetesStepOperatorSettings(annotations={"not/a/key": "v"})
    hook = make_hook()
    almost = KubernetesStepOperatorSettings(annotations={"notes": "x" * (256 * 1024 - 5)})  # fits on its own
    with pytest.raises(StepOperatorConfigError, match=r"metadata.annotations: \d+ bytes of annotations; Kubernetes "
                                                      r"allows at most 262144"):
        make_spec(hook, _greet, "x", task_id="big_annotations", settings=almost)  # + identity annotations
    assert k8s_emulator.list_objects("jobs", NS, f"{manifest.LABEL_PREFIX}/task-id=big_annotations") == []


def test_missing_namespace_is_a_clear_error(k8s_emulator, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_K8S_NO_NS", json.dumps({"conn_type": "stepops_kubernetes", "extra": {
        "config_file": os.environ["AIRFLOW_HOME"] + "/kubeconfig", "kubernetes_namespace": "nowhere",
        "image": "python:3"}}))
    hook = make_hook("k8s_no_ns")
    with pytest.raises(StepOperatorConfigError, match=r"Kubernetes rejected the request to create the Job in "
                       r"namespace 'nowhere'.*not found"):
        hook.submit(make_spec(hook, _greet, "x", task_id="no_ns"))


def test_credentials_from_a_cncf_kubernetes_connection(k8s_emulator, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_MY_CLUSTER", json.dumps({"conn_type": "kubernetes", "extra": {
        "kube_config_path": os.environ["AIRFLOW_HOME"] + "/kubeconfig", "cluster_context": "emulator"}}))
    monkeypatch.setenv("AIRFLOW_CONN_K8S_VIA_CONN", json.dumps({"conn_type": "stepops_kubernetes", "extra": {
        "kubernetes_conn_id": "my_cluster", "kubernetes_namespace": NS, "image": "python:3"}}))
    hook = make_hook("k8s_via_conn")
    handle = hook.submit(make_spec(hook, _greet, "conn", task_id="via_conn"))
    event = run_trigger(hook, handle)  # the async client also takes the connection's kubeconfig
    assert event["status"] == "succeeded" and "hello conn from kubernetes" in event["log_tail"]


def test_operator_on_kill_deletes_the_job(k8s_emulator):
    from airflow_stepops.operators.kubernetes import KubernetesStepOperator

    hook = make_hook()
    handle = hook.submit(make_spec(hook, _write_pid_and_sleep, 120, task_id="operator_kill"))
    _wait_running(hook, handle)
    op = KubernetesStepOperator(task_id="operator_kill", python_callable=_greet, step_operator="k8s_step_operator",
                                deferrable=False)
    op._hook, op._handle = hook, handle  # as after submission in execute()
    op.on_kill()
    assert _gone(k8s_emulator, handle)


def test_a_context_without_config_file_uses_kubectls_kubeconfig(k8s_emulator, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", os.pathsep.join(["/nonexistent/config", os.environ["AIRFLOW_HOME"] + "/kubeconfig"]))
    monkeypatch.setenv("AIRFLOW_CONN_K8S_CONTEXT_ONLY", json.dumps({"conn_type": "stepops_kubernetes", "extra": {
        "kubernetes_context": "emulator", "kubernetes_namespace": NS, "image": "python:3"}}))
    hook = make_hook("k8s_context_only")
    assert hook._credentials()["config_file"] == os.environ["AIRFLOW_HOME"] + "/kubeconfig"
    handle = hook.submit(make_spec(hook, _greet, "ctx", task_id="context_only"))
    assert run_trigger(hook, handle)["status"] == "succeeded"


def test_forbidden_api_answers_end_the_wait_with_a_clear_error(k8s_emulator):
    import asyncio

    hook = make_hook()
    handle = hook.submit(make_spec(hook, sleep_then_return, 2, task_id="forbidden"))
    k8s_emulator.fail_requests(403, method="GET", path=r"/namespaces/steps/jobs$", count=None,
                               message='jobs.batch is forbidden: User "airflow" cannot list resource "jobs"')
    try:
        [status] = asyncio.run(hook.aget_statuses([handle]))
        assert isinstance(status, StepOperatorConfigError), status
        assert "Kubernetes refused to list jobs" in str(status) and "RBAC" in str(status)
        event = run_trigger(hook, handle, timeout=30)
        assert event["status"] == "error" and "cannot list resource" in event["message"]
    finally:
        k8s_emulator.clear_faults()
    assert run_trigger(hook, handle)["status"] == "succeeded"


def test_a_large_bundle_on_an_object_store_is_refused_before_submitting(k8s_emulator, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_K8S_MEMORY_STORE", json.dumps({"conn_type": "stepops_kubernetes", "extra": {
        "config_file": os.environ["AIRFLOW_HOME"] + "/kubeconfig", "kubernetes_context": "emulator",
        "kubernetes_namespace": NS, "image": "python:3", "artifact_store": "memory://stepops-k8s"}}))
    hook = make_hook("k8s_memory_store")
    spec = make_spec(hook, _digest, os.urandom(3 << 20), task_id="object_store_big")
    with pytest.raises(StepOperatorConfigError, match=r"larger than inline_transfer_max_size=512KiB and pods cannot "
                       r"read the memory:// artifact store"):
        hook.submit(spec)
    assert k8s_emulator.list_objects("jobs", NS, f"{manifest.LABEL_PREFIX}/task-id=object_store_big") == []


ON_DEMAND = {"node_selector": {"karpenter.sh/capacity-type": "on-demand"},
             "tolerations": [{"key": "on-demand", "operator": "Exists", "effect": "NoSchedule"}]}


def test_escalating_a_spot_step_needs_on_demand_pod_overrides(k8s_emulator, monkeypatch):
    spot = KubernetesStepOperatorSettings(use_spot=True)
    hook = make_hook("k8s_no_overrides", monkeypatch=monkeypatch, on_demand_pod_overrides=None)
    spec = make_spec(hook, _greet, "x", task_id="no_overrides", settings=spot)
    with pytest.raises(StepOperatorConfigError, match=r"'k8s_no_overrides' cannot move a use_spot step to "
                       r"on-demand nodes: set \"on_demand_pod_overrides\" in the connection extras"):
        hook.check_on_demand(spec)
    hook.check_on_demand(make_spec(hook, _greet, "x", task_id="not_spot"))  # nothing to escalate
    make_hook("k8s_on_demand", monkeypatch=monkeypatch, on_demand_pod_overrides=ON_DEMAND).check_on_demand(spec)


def test_on_demand_pod_overrides_are_checked_like_pod_options(k8s_emulator, monkeypatch):
    hook = make_hook("k8s_bad_overrides", monkeypatch=monkeypatch,
                     on_demand_pod_overrides={"tolerations": [{"operator": "Equal", "effect": "NoSchedule"}]})
    with pytest.raises(StepOperatorConfigError, match=r"on_demand_pod_overrides.tolerations\[0\]: a toleration "
                       r"without a key must have operator 'Exists'"):
        hook.config  # noqa: B018


def test_an_escalated_step_leaves_the_spot_nodes(k8s_emulator, monkeypatch):
    """The on-demand attempt's pod selects the on-demand nodes instead of the spot ones: on a cluster of spot nodes
    only (the emulator's node) the scheduler finds none for it."""
    hook = make_hook("k8s_on_demand", monkeypatch=monkeypatch, on_demand_pod_overrides=ON_DEMAND)
    spec = make_spec(hook, _greet, "x", task_id="escalated",
                     settings=KubernetesStepOperatorSettings(use_spot=True, unschedulable_timeout_seconds=1))
    spec.on_demand = True
    handle = hook.submit(spec)
    assert (handle["on_demand"], handle["spot"]) == (True, False), handle
    pod_spec = _job(k8s_emulator, handle)["spec"]["template"]["spec"]
    assert pod_spec["nodeSelector"] == {"karpenter.sh/capacity-type": "on-demand"}, pod_spec
    assert ON_DEMAND["tolerations"][0] in pod_spec["tolerations"]
    event = run_trigger(hook, handle)
    assert event["status"] == "failed" and "didn't match Pod's node affinity/selector" in event["message"], event
