"""The Kubernetes emulator, driven only through the real ``kubernetes`` and ``kubernetes_asyncio`` clients.

What the kubernetes flavor will rely on is pinned here: Job/Pod status the way Kubernetes writes it,
409 on a duplicate Job name (exactly-once submission), label selectors, watches, logs, foreground
deletion killing the process group, deadlines and every injectable fault.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

kubernetes = pytest.importorskip("kubernetes")
kubernetes_asyncio = pytest.importorskip("kubernetes_asyncio")

from kubernetes import client, config, watch  # noqa: E402

from airflow_stepops.testing.kubernetes import FAULT_ANNOTATION, Fault, KubernetesEmulator, NodeSpec  # noqa: E402

from ..emulated import eventually, gone  # noqa: E402

NS = "default"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def job_manifest(name: str, script: str, *, labels: dict[str, str] | None = None,
                 annotations: dict[str, str] | None = None, resources: dict[str, Any] | None = None,
                 container: dict[str, Any] | None = None, pod: dict[str, Any] | None = None,
                 **spec: Any) -> dict[str, Any]:
    main = {"name": "main", "image": "python:3.11-slim", "command": ["python3", "-c", textwrap.dedent(script)],
            **(container or {})}
    if resources:
        main["resources"] = resources
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"backoffLimit": 0, **spec, "template": {
            "metadata": {"labels": {"app": "stepops", **(labels or {})}, "annotations": annotations or {}},
            "spec": {"restartPolicy": "Never", "containers": [main], **(pod or {})}}},
    }


SLEEPER = """
    import os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print(os.getpid(), child.pid, flush=True)
    time.sleep(120)
"""


@pytest.fixture(scope="module")
def k8s() -> Iterator[KubernetesEmulator]:
    with KubernetesEmulator(grace_period_cap=1, image_pull_backoff=0.2, restart_backoff=0.1) as emulator:
        yield emulator


@pytest.fixture(scope="module")
def api(k8s: KubernetesEmulator) -> Iterator[Any]:
    api_client = k8s.api_client()
    yield api_client
    api_client.close()


@pytest.fixture
def batch(api: Any) -> Any:
    return client.BatchV1Api(api)


@pytest.fixture
def core(api: Any) -> Any:
    return client.CoreV1Api(api)


def condition(job: Any, kind: str) -> Any:
    return next((c for c in job.status.conditions or [] if c.type == kind and c.status == "True"), None)


def finished(batch: Any, name: str, timeout: float = 15.0) -> Any:
    def probe() -> Any:
        job = batch.read_namespaced_job(name, NS)
        return job if condition(job, "Complete") or condition(job, "Failed") else None
    return eventually(probe, timeout, f"job {name} to finish")


def only_pod(core: Any, job: str) -> Any:
    pods = eventually(lambda: core.list_namespaced_pod(NS, label_selector=f"job-name={job}").items, what="a pod")
    assert len(pods) == 1
    return pods[0]


def log_text(core: Any, pod: str, **kwargs: Any) -> str:
    # kubernetes 36.x returns the repr of the bytes from read_namespaced_pod_log (client regression,
    # kubernetes-client/python#2596); the raw response is what a flavor should read.
    return core.read_namespaced_pod_log(pod, NS, _preload_content=False, **kwargs).data.decode()


def running_pids(core: Any, job: str) -> tuple[Any, list[int]]:
    def probe() -> tuple[Any, list[int]] | None:
        pods = core.list_namespaced_pod(NS, label_selector=f"job-name={job}").items
        if not pods or pods[0].status.phase != "Running":
            return None
        text = log_text(core, pods[0].metadata.name)
        return (pods[0], [int(p) for p in text.split()]) if text.strip() else None
    return eventually(probe, what=f"job {job} to print its pids")


# ----- the happy path ---------------------------------------------------------------------------------


def test_job_runs_the_command_and_completes(batch: Any, core: Any) -> None:
    name = unique("hello")
    created = batch.create_namespaced_job(NS, job_manifest(name, "import sys; print('hi', flush=True); print('err', file=sys.stderr)"))
    assert created.metadata.uid and created.metadata.resource_version and created.metadata.creation_timestamp
    assert created.spec.selector.match_labels == {"batch.kubernetes.io/controller-uid": created.metadata.uid}

    job = finished(batch, name)
    assert condition(job, "Complete").reason == "CompletionsReached"
    assert condition(job, "SuccessCriteriaMet") is not None
    assert job.status.succeeded == 1 and not job.status.failed and not job.status.active
    assert job.status.start_time and job.status.completion_time

    pod = only_pod(core, name)
    assert pod.metadata.name.startswith(f"{name}-") and len(pod.metadata.name) == len(name) + 6
    assert pod.metadata.labels["batch.kubernetes.io/job-name"] == name
    assert pod.metadata.labels["controller-uid"] == created.metadata.uid
    assert pod.metadata.labels["app"] == "stepops"
    assert pod.metadata.owner_references[0].kind == "Job" and pod.metadata.owner_references[0].controller
    assert pod.status.phase == "Succeeded"
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (0, "Completed")
    assert {c.type for c in pod.status.conditions} >= {"PodScheduled", "Initialized", "Ready", "ContainersReady"}

    assert log_text(core, pod.metadata.name) == "hi\nerr\n"
    assert log_text(core, pod.metadata.name, tail_lines=1) == "err\n"
    stamped = log_text(core, pod.metadata.name, timestamps=True).splitlines()
    assert stamped[0].endswith("Z hi") and stamped[0][:4].isdigit()
    assert "hi" in core.read_namespaced_pod_log(pod.metadata.name, NS)


def test_failing_command_fails_the_job(batch: Any, core: Any) -> None:
    name = unique("fail")
    batch.create_namespaced_job(NS, job_manifest(name, "import sys; print('boom'); sys.exit(3)"))
    job = finished(batch, name)
    failed = condition(job, "Failed")
    assert failed.reason == "BackoffLimitExceeded" and failed.message == "Job has reached the specified backoff limit"
    assert condition(job, "FailureTarget") is not None and not condition(job, "Complete")
    assert job.status.failed == 1 and not job.status.succeeded and job.status.completion_time is None
    pod = only_pod(core, name)
    assert pod.status.phase == "Failed"
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (3, "Error")


def test_an_image_without_python_fails_a_python_command(batch: Any, core: Any) -> None:
    name = unique("nopython")
    batch.create_namespaced_job(NS, job_manifest(name, "print('never')", container={"command": ["python", "-c", "1"]}))
    finished(batch, name)
    terminated = only_pod(core, name).status.container_statuses[0].state.terminated
    assert terminated.exit_code == 127 and "python" in (terminated.message or "") + "".join(
        core.read_namespaced_pod_log(only_pod(core, name).metadata.name, NS))


def test_backoff_limit_retries_with_new_pods(batch: Any, core: Any) -> None:
    name = unique("retry")
    batch.create_namespaced_job(NS, job_manifest(name, "import sys; sys.exit(1)", backoffLimit=1))
    job = finished(batch, name)
    assert condition(job, "Failed").reason == "BackoffLimitExceeded" and job.status.failed == 2
    assert len(core.list_namespaced_pod(NS, label_selector=f"job-name={name}").items) == 2


def test_duplicate_job_name_is_409_already_exists(batch: Any) -> None:
    name = unique("once")
    batch.create_namespaced_job(NS, job_manifest(name, "pass"))
    with pytest.raises(client.ApiException) as raised:
        batch.create_namespaced_job(NS, job_manifest(name, "pass"))
    assert raised.value.status == 409
    body = json.loads(raised.value.body)
    assert (body["kind"], body["reason"], body["code"]) == ("Status", "AlreadyExists", 409)
    assert body["message"] == f'jobs.batch "{name}" already exists'
    assert body["details"] == {"name": name, "group": "batch", "kind": "jobs"}


def test_lost_create_reply_then_retry_sees_409(k8s: KubernetesEmulator, batch: Any) -> None:
    name = unique("lost")
    k8s.fail_requests(503, method="POST", path="/jobs$", after_commit=True)
    with pytest.raises(client.ApiException) as raised:
        batch.create_namespaced_job(NS, job_manifest(name, "pass"))
    assert raised.value.status == 503
    with pytest.raises(client.ApiException) as again:
        batch.create_namespaced_job(NS, job_manifest(name, "pass"))
    assert again.value.status == 409
    assert len(k8s.requests("POST", f"/namespaces/{NS}/jobs$")) >= 2


def test_not_found_is_a_404_status(batch: Any, core: Any) -> None:
    with pytest.raises(client.ApiException) as raised:
        batch.read_namespaced_job("nope", NS)
    body = json.loads(raised.value.body)
    assert (raised.value.status, body["reason"], body["message"]) == (404, "NotFound", 'jobs.batch "nope" not found')
    with pytest.raises(client.ApiException) as pod_missing:
        core.read_namespaced_pod_log("nope", NS)
    assert pod_missing.value.status == 404
    with pytest.raises(client.ApiException) as no_namespace:
        batch.create_namespaced_job("missing-ns", job_manifest(unique("x"), "pass"))
    assert json.loads(no_namespace.value.body)["message"] == 'namespaces "missing-ns" not found'


def test_invalid_jobs_are_rejected_like_the_api_server(batch: Any) -> None:
    bad_policy = job_manifest(unique("always"), "pass")
    bad_policy["spec"]["template"]["spec"]["restartPolicy"] = "Always"
    too_long = job_manifest("x" * 64, "pass")
    bad_label = job_manifest(unique("label"), "pass", labels={"team": "not valid!"})
    negative = job_manifest(unique("neg"), "pass", resources={"limits": {"memory": "-1Gi"}})
    huge = job_manifest(unique("huge"), "pass", annotations={"a": "x" * 131072, "b": "y" * 131072})  # 2 bytes over
    bad_key = job_manifest(unique("key"), "pass", annotations={"not/a/key": "v"})
    bad_env = job_manifest(unique("env"), "pass", container={"env": [{"name": "A=B", "value": "1"}]})
    for manifest, field in ((bad_policy, "spec.template.spec.restartPolicy"), (too_long, "metadata.name"),
                            (bad_label, "metadata.labels"), (negative, "resources.limits[memory]"),
                            (huge, "spec.template.metadata.annotations"), (bad_key, "metadata.annotations"),
                            (bad_env, "containers[0].env[0].name")):
        with pytest.raises(client.ApiException) as raised:
            batch.create_namespaced_job(NS, manifest)
        body = json.loads(raised.value.body)
        assert (raised.value.status, body["reason"]) == (422, "Invalid")
        assert any(field in cause["field"] for cause in body["details"]["causes"]), body
    relaxed = job_manifest(unique("relaxed"), "pass", container={"env": [{"name": "1.odd-but:valid", "value": "1"}]})
    batch.create_namespaced_job(NS, relaxed)  # 1.33 accepts printable ASCII names (KEP-4369)


# ----- selectors and watches --------------------------------------------------------------------------


def test_label_selectors_on_jobs_and_pods(batch: Any, core: Any) -> None:
    run = uuid.uuid4().hex[:6]
    first, second = unique("sel-a"), unique("sel-b")
    batch.create_namespaced_job(NS, job_manifest(first, "pass", labels={"run": run, "team": "a"}))
    batch.create_namespaced_job(NS, job_manifest(second, "pass", labels={"run": run, "team": "b"}))

    def names(selector: str) -> set[str]:
        return {j.metadata.name for j in batch.list_namespaced_job(NS, label_selector=selector).items}
    assert names(f"run={run},team=a") == {first}
    assert names(f"run={run},team!=a") == {second}
    assert names(f"run={run},team in (a,b)") == {first, second}
    assert names(f"run={run},team notin (a)") == {second}
    assert names(f"run={run},!missing") == {first, second}
    assert names(f"run={run},missing") == set()
    pods = eventually(lambda: core.list_namespaced_pod(NS, label_selector=f"run={run},team=b").items)
    assert [p.metadata.labels["job-name"] for p in pods] == [second]
    assert core.list_pod_for_all_namespaces(label_selector=f"job-name={first}").items
    by_name = core.list_namespaced_pod(NS, field_selector=f"metadata.name={pods[0].metadata.name}").items
    assert [p.metadata.name for p in by_name] == [pods[0].metadata.name]

    page = batch.list_namespaced_job(NS, label_selector=f"run={run}", limit=1)
    assert len(page.items) == 1 and page.metadata._continue
    rest = batch.list_namespaced_job(NS, label_selector=f"run={run}", limit=1, _continue=page.metadata._continue)
    assert {page.items[0].metadata.name, rest.items[0].metadata.name} == {first, second}


def test_watch_streams_job_and_pod_events(batch: Any, core: Any) -> None:
    name = unique("watch")
    batch.create_namespaced_job(NS, job_manifest(name, "import time; time.sleep(0.3)"))
    job_events, pod_phases = [], []
    for event in watch.Watch().stream(batch.list_namespaced_job, NS, label_selector=f"job-name={name}",
                                      timeout_seconds=15):
        job_events.append(event["type"])
        if condition(event["object"], "Complete"):
            break
    assert job_events[0] == "ADDED" and set(job_events[1:]) == {"MODIFIED"}

    stream = watch.Watch()
    for event in stream.stream(core.list_namespaced_pod, NS, label_selector=f"job-name={name}", timeout_seconds=15):
        pod = event["object"]
        if not pod_phases or pod_phases[-1] != pod.status.phase:
            pod_phases.append(pod.status.phase)
        if pod.status.phase == "Succeeded":
            stream.stop()
    assert pod_phases[-1] == "Succeeded"

    # Resuming from a resourceVersion replays what came after it, the way the real watch cache does.
    listed = batch.list_namespaced_job(NS, label_selector=f"job-name={name}")
    later = unique("watch")
    batch.create_namespaced_job(NS, job_manifest(later, "pass", labels={"resume": name}))
    resumed = next(iter(watch.Watch().stream(batch.list_namespaced_job, NS, label_selector=f"resume={name}",
                                             timeout_seconds=5, resource_version=listed.metadata.resource_version)))
    assert (resumed["type"], resumed["object"].metadata.name) == ("ADDED", later)


def test_watch_from_the_start_shows_every_pod_phase(k8s: KubernetesEmulator, batch: Any, core: Any) -> None:
    name = unique("phases")
    phases: list[tuple[str, str | None]] = []
    done = threading.Event()

    def follow() -> None:
        stream = watch.Watch()
        for event in stream.stream(core.list_namespaced_pod, NS, label_selector=f"job-name={name}",
                                   timeout_seconds=15):
            pod = event["object"]
            statuses = pod.status.container_statuses or []
            state = statuses[0].state if statuses else None
            waiting = state.waiting.reason if state and state.waiting else None
            phases.append((pod.status.phase, waiting))
            if pod.status.phase == "Succeeded":
                break
        done.set()

    watcher = threading.Thread(target=follow)
    watcher.start()
    time.sleep(0.2)
    batch.create_namespaced_job(NS, job_manifest(name, "pass"))
    watcher.join(20)
    assert done.is_set()
    assert ("Pending", None) in phases and ("Pending", "ContainerCreating") in phases
    assert phases[-1][0] == "Succeeded" and any(p == "Running" for p, _ in phases)


# ----- deletion, deadlines, TTL -----------------------------------------------------------------------


def test_foreground_delete_kills_the_process_group_and_removes_pods(batch: Any, core: Any) -> None:
    name = unique("kill")
    batch.create_namespaced_job(NS, job_manifest(name, SLEEPER))
    _, pids = running_pids(core, name)
    assert not gone(*pids)

    raw = batch.delete_namespaced_job(name, NS, propagation_policy="Foreground", _preload_content=False)
    response = json.loads(raw.data)  # the Job, held by the foregroundDeletion finalizer until its pods are gone
    assert response["kind"] == "Job" and response["metadata"]["deletionTimestamp"]
    assert response["metadata"]["finalizers"] == ["foregroundDeletion"]

    eventually(lambda: not core.list_namespaced_pod(NS, label_selector=f"job-name={name}").items, what="pods gone")
    eventually(lambda: not batch.list_namespaced_job(NS, field_selector=f"metadata.name={name}").items,
               what="job gone")
    eventually(lambda: gone(*pids), 5, "the processes to die")


def test_background_delete_removes_the_job_at_once(batch: Any, core: Any) -> None:
    name = unique("bg")
    batch.create_namespaced_job(NS, job_manifest(name, SLEEPER))
    _, pids = running_pids(core, name)
    status = batch.delete_namespaced_job(name, NS, propagation_policy="Background")
    assert status.status == "Success" and status.details.name == name
    with pytest.raises(client.ApiException):
        batch.read_namespaced_job(name, NS)
    eventually(lambda: not core.list_namespaced_pod(NS, label_selector=f"job-name={name}").items, what="pods gone")
    eventually(lambda: gone(*pids), 5, "the processes to die")


def test_default_delete_orphans_the_pod_like_batch_v1_does(batch: Any, core: Any) -> None:
    name = unique("orphan")
    batch.create_namespaced_job(NS, job_manifest(name, SLEEPER))
    pod, pids = running_pids(core, name)
    batch.delete_namespaced_job(name, NS)
    eventually(lambda: not batch.list_namespaced_job(NS, field_selector=f"metadata.name={name}").items)
    orphan = eventually(lambda: (p := core.read_namespaced_pod(pod.metadata.name, NS)).metadata.owner_references
                        is None and p)
    assert orphan.status.phase == "Running" and not gone(*pids)

    core.delete_namespaced_pod(pod.metadata.name, NS)
    eventually(lambda: not core.list_namespaced_pod(NS, label_selector=f"job-name={name}").items, what="pod gone")
    eventually(lambda: gone(*pids), 5, "the processes to die")


def test_sigterm_is_honoured_within_the_grace_period(batch: Any, core: Any) -> None:
    name = unique("term")
    script = """
        import os, signal, sys, time
        def bye(*_):
            print("got SIGTERM", flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, bye)
        print(os.getpid(), flush=True)
        time.sleep(120)
    """
    batch.create_namespaced_job(NS, job_manifest(name, script))
    pod, pids = running_pids(core, name)
    seen: list[Any] = []
    since = core.list_namespaced_pod(NS, label_selector=f"job-name={name}").metadata.resource_version
    core.delete_namespaced_pod(pod.metadata.name, NS)
    for event in watch.Watch().stream(core.list_namespaced_pod, NS, label_selector=f"job-name={name}",
                                      resource_version=since, timeout_seconds=10):
        seen.append(event["object"])
        if event["type"] == "DELETED" and event["object"].metadata.name == pod.metadata.name:
            break
    last = [p for p in seen if p.metadata.name == pod.metadata.name][-1]
    assert last.metadata.deletion_timestamp is not None
    assert last.status.container_statuses[0].state.terminated.exit_code == 0
    assert gone(*pids)


def test_active_deadline_fails_the_job_and_kills_the_process(batch: Any, core: Any) -> None:
    name = unique("deadline")
    started = time.monotonic()
    batch.create_namespaced_job(NS, job_manifest(name, SLEEPER, activeDeadlineSeconds=2))
    _, pids = running_pids(core, name)
    job = finished(batch, name)
    failed = condition(job, "Failed")
    assert (failed.reason, failed.message) == ("DeadlineExceeded", "Job was active longer than specified deadline")
    assert 2 <= time.monotonic() - started < 6
    assert not job.status.active
    eventually(lambda: gone(*pids), 5, "the processes to die")
    assert job.status.failed == 1


def test_ttl_after_finished_deletes_job_and_pods(batch: Any, core: Any) -> None:
    name = unique("ttl")
    batch.create_namespaced_job(NS, job_manifest(name, "pass", ttlSecondsAfterFinished=0))
    assert eventually(lambda: not batch.list_namespaced_job(NS, field_selector=f"metadata.name={name}").items
               and not core.list_namespaced_pod(NS, label_selector=f"job-name={name}").items, what="ttl cleanup")


def test_patch_replace_and_suspend(batch: Any, core: Any) -> None:
    name = unique("patch")
    batch.create_namespaced_job(NS, job_manifest(name, SLEEPER, suspend=True))
    job = eventually(lambda: condition(j := batch.read_namespaced_job(name, NS), "Suspended") and j)
    assert not core.list_namespaced_pod(NS, label_selector=f"job-name={name}").items

    patched = batch.patch_namespaced_job(name, NS, {"metadata": {"annotations": {"stepops/try": "1"}}})
    assert patched.metadata.annotations == {"stepops/try": "1"}
    assert int(patched.metadata.resource_version) > int(job.metadata.resource_version)
    json_patched = batch.patch_namespaced_job(name, NS, [{"op": "add", "path": "/metadata/labels/extra",
                                                          "value": "yes"}])
    assert json_patched.metadata.labels["extra"] == "yes"
    stale = batch.read_namespaced_job(name, NS)
    stale.metadata.resource_version = job.metadata.resource_version
    with pytest.raises(client.ApiException) as raised:
        batch.replace_namespaced_job(name, NS, stale)
    assert (raised.value.status, json.loads(raised.value.body)["reason"]) == (409, "Conflict")
    with pytest.raises(client.ApiException) as immutable:
        batch.patch_namespaced_job(name, NS, {"spec": {"template": {"spec": {"restartPolicy": "OnFailure"}}}})
    assert immutable.value.status == 422

    batch.patch_namespaced_job(name, NS, {"spec": {"suspend": False}})
    _, pids = running_pids(core, name)
    resumed = batch.read_namespaced_job(name, NS)
    assert not condition(resumed, "Suspended") and resumed.status.active == 1
    batch.patch_namespaced_job(name, NS, {"spec": {"suspend": True}})
    eventually(lambda: gone(*pids), 5, "the suspended pod's processes to die")
    eventually(lambda: not core.list_namespaced_pod(NS, label_selector=f"job-name={name}").items)
    suspended = batch.read_namespaced_job(name, NS)
    assert condition(suspended, "Suspended") and not suspended.status.failed and not condition(suspended, "Failed")
    batch.delete_namespaced_job(name, NS, propagation_policy="Background")


# ----- logs -------------------------------------------------------------------------------------------


def test_log_follow_through_watch_in_both_clients(k8s: KubernetesEmulator, batch: Any, core: Any) -> None:
    from kubernetes_asyncio import client as aclient
    from kubernetes_asyncio import watch as awatch

    name = unique("wlog")
    script = "import time\nfor i in range(3):\n    print('step', i, flush=True); time.sleep(0.1)"
    batch.create_namespaced_job(NS, job_manifest(name, script))
    pod = pod_when(core, name, lambda p: p.status.phase in ("Running", "Succeeded")).metadata.name
    assert list(watch.Watch().stream(core.read_namespaced_pod_log, pod, NS)) == [f"step {i}" for i in range(3)]

    async def follow() -> list[str]:
        async with k8s.async_api_client() as api:
            async with awatch.Watch().stream(aclient.CoreV1Api(api).read_namespaced_pod_log, pod, NS) as lines:
                return [line async for line in lines]
    assert asyncio.run(follow()) == [f"step {i}\n" for i in range(3)]


def test_follow_streams_lines_while_the_process_runs(batch: Any, core: Any) -> None:
    name = unique("follow")
    script = """
        import time
        for i in range(4):
            print("line", i, flush=True)
            time.sleep(0.2)
    """
    batch.create_namespaced_job(NS, job_manifest(name, script))
    pod = eventually(lambda: next((p for p in core.list_namespaced_pod(NS, label_selector=f"job-name={name}").items
                                   if p.status.phase == "Running"), None))
    response = core.read_namespaced_pod_log(pod.metadata.name, NS, follow=True, _preload_content=False)
    arrivals = []
    for line in response.stream(amt=None):
        arrivals.append((time.monotonic(), line.decode()))
    text = "".join(t for _, t in arrivals)
    assert text == "".join(f"line {i}\n" for i in range(4))
    assert arrivals[-1][0] - arrivals[0][0] > 0.3  # streamed as written, not at the end
    assert log_text(core, pod.metadata.name, since_seconds=60).count("line") == 4


def test_logs_of_a_waiting_container_are_a_400(batch: Any, core: Any) -> None:
    name = unique("wait")
    batch.create_namespaced_job(NS, job_manifest(name, "pass", annotations={FAULT_ANNOTATION: "image_pull"}))
    pod = eventually(lambda: next((p for p in core.list_namespaced_pod(NS, label_selector=f"job-name={name}").items
                                   if p.status.container_statuses), None))
    with pytest.raises(client.ApiException) as raised:
        core.read_namespaced_pod_log(pod.metadata.name, NS)
    assert raised.value.status == 400
    assert "is waiting to start" in json.loads(raised.value.body)["message"]
    batch.delete_namespaced_job(name, NS, propagation_policy="Foreground")


# ----- faults -----------------------------------------------------------------------------------------


def pod_when(core: Any, job: str, probe: Callable[[Any], bool], timeout: float = 10.0) -> Any:
    def find() -> Any:
        return next((p for p in core.list_namespaced_pod(NS, label_selector=f"job-name={job}").items if probe(p)), None)
    return eventually(find, timeout, f"a pod of {job} in the expected state")


def waiting_reason(pod: Any) -> str | None:
    statuses = pod.status.container_statuses or []
    return statuses[0].state.waiting.reason if statuses and statuses[0].state.waiting else None


def test_image_pull_failure_keeps_the_pod_pending(batch: Any, core: Any) -> None:
    name = unique("pull")
    batch.create_namespaced_job(NS, job_manifest(name, "pass", annotations={FAULT_ANNOTATION: "image_pull"}))
    first = pod_when(core, name, lambda p: waiting_reason(p) == "ErrImagePull")
    assert first.status.phase == "Pending" and "python:3.11-slim" in first.status.container_statuses[0].state.waiting.message
    backoff = pod_when(core, name, lambda p: waiting_reason(p) == "ImagePullBackOff")
    assert backoff.status.container_statuses[0].state.waiting.message == 'Back-off pulling image "python:3.11-slim"'
    assert batch.read_namespaced_job(name, NS).status.active == 1
    events = core.list_namespaced_event(NS, field_selector=f"involvedObject.name={first.metadata.name}").items
    assert any(e.reason == "Failed" and "Failed to pull image" in e.message for e in events)
    batch.delete_namespaced_job(name, NS, propagation_policy="Foreground")


def test_create_container_config_error_injected_and_natural(k8s: KubernetesEmulator, batch: Any, core: Any) -> None:
    injected = unique("cfg")
    k8s.inject(Fault("create_container_config", message='secret "hf-token" not found'), job=injected)
    batch.create_namespaced_job(NS, job_manifest(injected, "pass"))
    pod = pod_when(core, injected, lambda p: waiting_reason(p) == "CreateContainerConfigError")
    assert pod.status.container_statuses[0].state.waiting.message == 'secret "hf-token" not found'

    natural = unique("cfg")
    env = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "token"}}}]
    batch.create_namespaced_job(NS, job_manifest(natural, "pass", container={"env": env}))
    pod = pod_when(core, natural, lambda p: waiting_reason(p) == "CreateContainerConfigError")
    assert pod.status.container_statuses[0].state.waiting.message == 'secret "absent" not found'
    for name in (injected, natural):
        batch.delete_namespaced_job(name, NS, propagation_policy="Foreground")


def test_unschedulable_injected_and_from_the_scheduler(k8s: KubernetesEmulator, batch: Any, core: Any) -> None:
    def scheduled(pod: Any) -> Any:
        return next((c for c in pod.status.conditions or [] if c.type == "PodScheduled"), None)

    gpu = {"limits": {"nvidia.com/gpu": "1"}}
    injected = unique("nogpu")
    k8s.inject("unschedulable", job=injected)
    batch.create_namespaced_job(NS, job_manifest(injected, "pass", resources=gpu))
    pod = pod_when(core, injected, lambda p: bool(scheduled(p)))
    cond = scheduled(pod)
    assert (pod.status.phase, cond.status, cond.reason) == ("Pending", "False", "Unschedulable")
    assert cond.message.startswith("0/1 nodes are available: 1 Insufficient nvidia.com/gpu.")

    too_big = unique("bigjob")
    batch.create_namespaced_job(NS, job_manifest(too_big, "pass", resources={"limits": {"nvidia.com/gpu": "64"}}))
    pod = pod_when(core, too_big, lambda p: bool(scheduled(p)))
    assert scheduled(pod).message.startswith("0/1 nodes are available: 1 Insufficient nvidia.com/gpu.")

    selector = unique("a100")
    batch.create_namespaced_job(NS, job_manifest(selector, "pass", pod={"nodeSelector": {"gpu": "h100"}}))
    pod = pod_when(core, selector, lambda p: bool(scheduled(p)))
    assert "didn't match Pod's node affinity/selector" in scheduled(pod).message
    events = core.list_namespaced_event(NS, field_selector=f"involvedObject.name={pod.metadata.name}").items
    assert any(e.reason == "FailedScheduling" for e in events)
    for name in (injected, too_big, selector):
        batch.delete_namespaced_job(name, NS, propagation_policy="Foreground")


def test_unschedulable_for_a_while_then_runs(k8s: KubernetesEmulator, batch: Any, core: Any) -> None:
    name = unique("queued")
    k8s.inject(Fault("unschedulable", duration=0.5), job=name)
    started = time.monotonic()
    batch.create_namespaced_job(NS, job_manifest(name, "pass"))
    assert condition(finished(batch, name), "Complete")
    assert time.monotonic() - started >= 0.5
    events = core.list_namespaced_event(NS, field_selector=f"involvedObject.name={only_pod(core, name).metadata.name}")
    assert [e.reason for e in events.items if e.reason in ("FailedScheduling", "Scheduled")] == [
        "FailedScheduling", "Scheduled"]


@pytest.mark.parametrize(("kind", "pod_reason", "disruption"), [
    ("evicted", "Evicted", "TerminationByKubelet"),
    ("node_shutdown", "Terminated", "TerminationByKubelet"),
])
def test_eviction_and_node_shutdown(k8s: KubernetesEmulator, batch: Any, core: Any, kind: str, pod_reason: str,
                                    disruption: str) -> None:
    name = unique(kind.replace("_", "-"))
    k8s.inject(Fault(kind, after=0.3), job=name)
    batch.create_namespaced_job(NS, job_manifest(name, SLEEPER))
    _, pids = running_pids(core, name)
    job = finished(batch, name)
    assert condition(job, "Failed").reason == "BackoffLimitExceeded"
    pod = only_pod(core, name)
    assert (pod.status.phase, pod.status.reason) == ("Failed", pod_reason)
    target = next(c for c in pod.status.conditions if c.type == "DisruptionTarget")
    assert (target.status, target.reason) == ("True", disruption)
    assert pod.status.container_statuses[0].state.terminated.exit_code in (137, 143)
    eventually(lambda: gone(*pids), 5, "the processes to die")


def test_preemption_marks_and_deletes_the_pod(k8s: KubernetesEmulator, batch: Any, core: Any) -> None:
    name = unique("preempt")
    batch.create_namespaced_job(NS, job_manifest(name, SLEEPER))
    pod, pids = running_pids(core, name)
    seen = []
    since = core.list_namespaced_pod(NS, label_selector=f"job-name={name}").metadata.resource_version
    k8s.disrupt(NS, pod.metadata.name, "preempted")
    for event in watch.Watch().stream(core.list_namespaced_pod, NS, label_selector=f"job-name={name}",
                                      resource_version=since, timeout_seconds=10):
        seen.append(event)
        if event["type"] == "DELETED":
            break
    final = seen[-1]["object"]
    target = next(c for c in final.status.conditions if c.type == "DisruptionTarget")
    assert target.reason == "PreemptionByScheduler" and final.status.phase == "Failed"
    assert condition(finished(batch, name), "Failed").reason == "BackoffLimitExceeded"
    assert gone(*pids)


def test_pod_failure_policy_ignores_disruptions(k8s: KubernetesEmulator, batch: Any, core: Any) -> None:
    name = unique("spot")
    k8s.inject(Fault("evicted", after=0.2), job=name)
    policy = {"rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                        {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [42]}}]}
    script = "import time; time.sleep(0.6); print('done')"
    batch.create_namespaced_job(NS, job_manifest(name, script, podFailurePolicy=policy))
    job = finished(batch, name)
    assert condition(job, "Complete") and job.status.succeeded == 1 and not job.status.failed
    phases = sorted(p.status.phase for p in core.list_namespaced_pod(NS, label_selector=f"job-name={name}").items)
    assert phases == ["Failed", "Succeeded"]

    fatal = unique("fatal")
    batch.create_namespaced_job(NS, job_manifest(fatal, "import sys; sys.exit(42)", podFailurePolicy=policy,
                                                 backoffLimit=5))
    failed = condition(finished(batch, fatal), "Failed")
    assert failed.reason == "PodFailurePolicy" and "exit code 42" in failed.message


@pytest.mark.parametrize(("fault", "exit_code", "reason"), [
    (Fault("container_failure", exit_code=7), 7, "Error"),
    (Fault("oom_killed", after=0.3), 137, "OOMKilled"),
    ('{"kind": "container_failure", "exit_code": 5}', 5, "Error"),
])
def test_container_failures(k8s: KubernetesEmulator, batch: Any, core: Any, fault: Fault | str, exit_code: int,
                            reason: str) -> None:
    name = unique("crash")
    if isinstance(fault, Fault):
        k8s.inject(fault, job=name)
        annotations = {}
    else:  # the same fault through the pod annotation
        annotations = {FAULT_ANNOTATION: fault}
    batch.create_namespaced_job(NS, job_manifest(name, "import time; time.sleep(30)", annotations=annotations))
    job = finished(batch, name)
    assert condition(job, "Failed")
    terminated = only_pod(core, name).status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (exit_code, reason)


def test_slow_start_holds_the_pod_in_container_creating(k8s: KubernetesEmulator, batch: Any, core: Any) -> None:
    name = unique("slow")
    k8s.inject(Fault("slow_start", duration=0.6), job=name)
    batch.create_namespaced_job(NS, job_manifest(name, "pass"))
    creating = pod_when(core, name, lambda p: waiting_reason(p) == "ContainerCreating")
    seen_at = time.monotonic()
    assert creating.status.phase == "Pending"
    finished(batch, name)
    assert time.monotonic() - seen_at > 0.4


def test_log_disconnect_ends_follow_streams(k8s: KubernetesEmulator, batch: Any, core: Any) -> None:
    name = unique("gap")
    k8s.inject(Fault("log_disconnect", after=0.4), job=name)
    script = "import time\nfor i in range(10):\n    print(i, flush=True); time.sleep(0.1)"
    batch.create_namespaced_job(NS, job_manifest(name, script))
    pod = pod_when(core, name, lambda p: p.status.phase == "Running")
    text = core.read_namespaced_pod_log(pod.metadata.name, NS, follow=True, _preload_content=False).data.decode()
    assert 0 < len(text.split()) < 10
    finished(batch, name)
    assert log_text(core, pod.metadata.name).split() == [str(i) for i in range(10)]


# ----- environment, volumes, termination message -------------------------------------------------------


def test_env_config_maps_volumes_and_termination_message(k8s: KubernetesEmulator, batch: Any, core: Any) -> None:
    name = unique("env")
    core.create_namespaced_config_map(NS, {"metadata": {"name": name}, "data": {"greeting": "hello"}})
    core.create_namespaced_secret(NS, {"metadata": {"name": name}, "stringData": {"token": "s3cret"}})
    core.create_namespaced_persistent_volume_claim(NS, {"metadata": {"name": name}, "spec": {
        "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
    (k8s.pvc_path(NS, name) / "input.txt").write_text("from the pvc")
    script = """
        import os, pathlib
        print(os.environ["GREETING"], os.environ["TOKEN"], os.environ["POD"], os.environ["GPU"])
        print(pathlib.Path(os.environ["DATA"], "input.txt").read_text())
        print(pathlib.Path("/etc/cfg/greeting".replace("/etc/cfg", os.environ["CFG"])).read_text())
        pathlib.Path(os.environ["OUT"], "result.json").write_text("42")
        pathlib.Path(os.environ["MSG"]).write_text('{"result": 42}')
    """
    container = {
        "env": [{"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": name, "key": "greeting"}}},
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": name, "key": "token"}}},
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "GPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.nvidia.com/gpu"}}},
                {"name": "DATA", "value": "/data"}, {"name": "OUT", "value": "/scratch"},
                {"name": "CFG", "value": "/etc/cfg"}, {"name": "MSG", "value": "/dev/termination-log"}],
        "volumeMounts": [{"name": "data", "mountPath": "/data"}, {"name": "scratch", "mountPath": "/scratch"},
                         {"name": "cfg", "mountPath": "/etc/cfg"}],
        "resources": {"limits": {"nvidia.com/gpu": "2"}},
    }
    volumes = [{"name": "data", "persistentVolumeClaim": {"claimName": name}}, {"name": "scratch", "emptyDir": {}},
               {"name": "cfg", "configMap": {"name": name}}]
    batch.create_namespaced_job(NS, job_manifest(name, script, container=container, pod={"volumes": volumes}))
    assert condition(finished(batch, name), "Complete")
    pod = only_pod(core, name)
    assert log_text(core, pod.metadata.name).splitlines() == [
        f"hello s3cret {pod.metadata.name} 2", "from the pvc", "hello"]
    assert pod.status.container_statuses[0].state.terminated.message == '{"result": 42}'


def test_init_containers_run_first_and_on_failure_restarts_in_place(batch: Any, core: Any) -> None:
    name = unique("init")
    mount = {"volumeMounts": [{"name": "work", "mountPath": "/work"}]}
    init = {"name": "fetch", "image": "busybox", "command": ["sh", "-c", "echo fetched > /work/in.txt; echo ok"], **mount}
    batch.create_namespaced_job(NS, job_manifest(
        name, "import pathlib; print(pathlib.Path('/work/in.txt').read_text().strip())", container=mount,
        pod={"volumes": [{"name": "work", "emptyDir": {}}], "initContainers": [init]}))
    assert condition(finished(batch, name), "Complete")
    pod = only_pod(core, name)
    assert pod.status.init_container_statuses[0].state.terminated.reason == "Completed"
    assert log_text(core, pod.metadata.name, container="fetch") == "ok\n"
    assert log_text(core, pod.metadata.name) == "fetched\n"

    flaky = unique("onfail")
    script = "import sys; print('attempt'); sys.exit(2)"
    manifest = job_manifest(flaky, script, backoffLimit=1, pod={"restartPolicy": "OnFailure"})
    batch.create_namespaced_job(NS, manifest)
    restarted = pod_when(core, flaky, lambda p: bool(p.status.container_statuses)
                         and p.status.container_statuses[0].restart_count >= 1)
    assert log_text(core, restarted.metadata.name, previous=True) == "attempt\n"
    failed = condition(finished(batch, flaky), "Failed")
    assert failed.reason == "BackoffLimitExceeded"


def test_the_host_environment_does_not_leak_into_pods(batch: Any, core: Any, monkeypatch: Any) -> None:
    name = unique("noleak")
    monkeypatch.setenv("STEPOPS_SECRET_OF_THE_WORKER", "leaked")
    script = "import os; print(os.environ.get('STEPOPS_SECRET_OF_THE_WORKER'), os.environ['HOSTNAME'])"
    batch.create_namespaced_job(NS, job_manifest(name, script))
    finished(batch, name)
    pod = only_pod(core, name).metadata.name
    assert log_text(core, pod) == f"None {pod}\n"


# ----- kubernetes_asyncio -----------------------------------------------------------------------------


def test_async_client_full_cycle(k8s: KubernetesEmulator) -> None:
    from kubernetes_asyncio import client as aclient
    from kubernetes_asyncio import watch as awatch

    name = unique("async")

    async def scenario() -> None:
        async with k8s.async_api_client() as api:
            batch, core = aclient.BatchV1Api(api), aclient.CoreV1Api(api)
            await batch.create_namespaced_job(NS, job_manifest(name, "print('async hi')", labels={"flavor": "k8s"}))
            with pytest.raises(aclient.ApiException) as raised:
                await batch.create_namespaced_job(NS, job_manifest(name, "pass"))
            assert raised.value.status == 409
            # The Job has labels of its own, so (as in Kubernetes) it does not get the template's job-name label.
            async with awatch.Watch().stream(batch.list_namespaced_job, NS, field_selector=f"metadata.name={name}",
                                             timeout_seconds=15) as events:
                async for event in events:
                    if condition(event["object"], "Complete"):
                        break
            jobs = await batch.list_namespaced_job(NS, label_selector="flavor=k8s")
            assert name in {j.metadata.name for j in jobs.items}
            job = await batch.read_namespaced_job(name, NS)
            assert job.status.succeeded == 1
            pods = await core.list_namespaced_pod(NS, label_selector=f"job-name={name}")
            pod = await core.read_namespaced_pod(pods.items[0].metadata.name, NS)
            assert pod.status.phase == "Succeeded"
            assert "async hi" in await core.read_namespaced_pod_log(pod.metadata.name, NS)
            raw = await core.read_namespaced_pod_log(pod.metadata.name, NS, _preload_content=False)
            assert await raw.text() == "async hi\n"
            await batch.delete_namespaced_job(name, NS, propagation_policy="Foreground")
            for _ in range(200):
                if not (await batch.list_namespaced_job(NS, field_selector=f"metadata.name={name}")).items:
                    break
                await asyncio.sleep(0.02)
            assert not (await core.list_namespaced_pod(NS, label_selector=f"job-name={name}")).items

    asyncio.run(scenario())


def test_async_foreground_delete_kills_the_process(k8s: KubernetesEmulator, core: Any) -> None:
    from kubernetes_asyncio import client as aclient

    name = unique("akill")

    async def scenario() -> list[int]:
        async with k8s.async_api_client() as api:
            batch = aclient.BatchV1Api(api)
            await batch.create_namespaced_job(NS, job_manifest(name, SLEEPER))
            _, pids = await asyncio.to_thread(running_pids, core, name)
            await batch.delete_namespaced_job(name, NS, propagation_policy="Foreground")
            return pids

    pids = asyncio.run(scenario())
    assert pids
    assert eventually(lambda: gone(*pids), 5, "the processes to die")


# ----- configuration and lifecycle --------------------------------------------------------------------


def test_kubeconfig_with_context_and_token(tmp_path: Any) -> None:
    with KubernetesEmulator(token="t0ken") as k8s:
        path = k8s.write_kubeconfig(tmp_path / "config", context="gpu-cluster", namespace="default")
        configuration = client.Configuration()
        config.load_kube_config(config_file=str(path), context="gpu-cluster", client_configuration=configuration)
        with client.ApiClient(configuration) as api:
            assert client.VersionApi(api).get_code().git_version.startswith("v1.")
            assert client.CoreV1Api(api).read_namespace("default").status.phase == "Active"
        with client.ApiClient(client.Configuration(host=k8s.url)) as anonymous:
            with pytest.raises(client.ApiException) as raised:
                client.BatchV1Api(anonymous).list_namespaced_job(NS)
            assert raised.value.status == 401

        async def load_async() -> str:
            from kubernetes_asyncio import client as aclient
            from kubernetes_asyncio import config as aconfig

            aconfiguration = aclient.Configuration()
            await aconfig.load_kube_config(config_file=str(path), context="gpu-cluster",
                                           client_configuration=aconfiguration)
            async with aclient.ApiClient(aconfiguration) as api:
                return (await aclient.VersionApi(api).get_code()).git_version
        assert asyncio.run(load_async()).startswith("v1.")


def test_discovery_endpoints(api: Any) -> None:
    assert client.CoreApi(api).get_api_versions().versions == ["v1"]
    assert "batch" in {g.name for g in client.ApisApi(api).get_api_versions().groups}
    resources = {r.name for r in client.BatchV1Api(api).get_api_resources().resources}
    assert {"jobs", "jobs/status"} <= resources
    core_resources = {r.name for r in client.CoreV1Api(api).get_api_resources().resources}
    assert {"pods", "pods/log", "events", "namespaces"} <= core_resources


def test_stop_leaves_no_process_or_thread() -> None:
    threads_before = set(threading.enumerate())
    with KubernetesEmulator(grace_period_cap=1, node=NodeSpec(capacity={"cpu": "4", "memory": "8Gi"})) as k8s:
        with k8s.api_client() as api:
            batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
            batch.create_namespaced_job(NS, job_manifest("lingering", SLEEPER))
            _, pids = running_pids(core, "lingering")
            stream = watch.Watch()
            watcher = threading.Thread(target=lambda: list(stream.stream(core.list_namespaced_pod, NS,
                                                                         timeout_seconds=60)))
            watcher.start()
            time.sleep(0.1)
    watcher.join(5)
    assert not watcher.is_alive(), "open watches end when the emulator stops"
    assert gone(*pids)
    eventually(lambda: set(threading.enumerate()) <= threads_before, 5, "the emulator's threads to end")
    assert not [c for c in psutil.Process().children(recursive=True) if c.pid in pids]
