"""``KubernetesEmulator``: the API server, scheduler, kubelet and Job controller on a background thread."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from aiohttp import web

from airflow_stepops.testing._kit import Emulator, configured
from airflow_stepops.testing._loop_thread import LoopThread, serve_app
from airflow_stepops.testing.kubernetes._cluster import Cluster
from airflow_stepops.testing.kubernetes._config import EmulatorConfig
from airflow_stepops.testing.kubernetes._faults import RUNNING_KINDS, Fault, FaultRule
from airflow_stepops.testing.kubernetes._jobs import JobController
from airflow_stepops.testing.kubernetes._kubelet import Kubelet
from airflow_stepops.testing.kubernetes._server import ApiFault, ApiServer
from airflow_stepops.testing.kubernetes._store import JOBS, PODS, RESOURCES, Resource, Store
from airflow_stepops.testing.kubernetes._util import JSON, deep

T = TypeVar("T")


def _resource(kind: str) -> Resource:
    for res in RESOURCES:
        if kind.lower() in (res.plural, res.kind.lower(), *res.short_names):
            return res
    raise ValueError(f"unknown resource {kind!r}; expected one of {[r.plural for r in RESOURCES]}")


class KubernetesEmulator(Emulator):
    """A local Kubernetes API on 127.0.0.1 whose Jobs run their pod's command as local subprocesses.

    Use it as a context manager (or ``start()`` / ``stop()``); point the real clients at it with
    ``api_client()``, ``async_api_client()`` or a kubeconfig from ``write_kubeconfig()``. Settings are
    the fields of ``EmulatorConfig`` (``grace_period_cap=2``, ``namespaces=("default", "ml")``, ...).

    A job's id is its name, or ``<namespace>/<name>`` where the name is in several namespaces; its status
    the Job's ``Complete``/``Failed``/``Suspended`` condition, else ``Running``, and a deleted Job is ``gone``.
    """

    STATES: ClassVar[dict[str, str]] = {"Complete": "succeeded", "Failed": "failed"}
    #: a kit preemption is a kubelet eviction (DisruptionTarget), a failure the container killed (OOMKilled)
    KINDS: ClassVar[dict[str, str]] = {"preemption": "evicted", "failure": "oom_killed"}

    def __init__(self, config: EmulatorConfig | None = None, *, port: int = 0, **settings: Any) -> None:
        self.config = configured(config or EmulatorConfig(), settings)
        self._wanted_port = port
        self.port = 0
        self._serving = LoopThread("stepops-kubernetes-emulator")
        self._runner: web.AppRunner | None = None
        self.cluster: Cluster
        self.server: ApiServer

    # ----- lifecycle --------------------------------------------------------------------------------

    def _start(self) -> None:
        self._open_workdir(None, "k8s")
        self._serving.start(self._startup, "the Kubernetes emulator")

    async def _startup(self) -> None:
        assert self.workdir is not None
        self.cluster = Cluster(Store(), self.config, asyncio.get_running_loop())
        self.cluster.kubelet = Kubelet(self.cluster, self.workdir, lambda: self.port)
        self.cluster.jobs = JobController(self.cluster)
        self.cluster.bootstrap()
        self.server = ApiServer(self.cluster)
        self._runner, self.port = await serve_app(self.server.app(), self._wanted_port)
        self.server.address = f"127.0.0.1:{self.port}"

    def _teardown(self) -> None:
        """Kill every pod process, close streams and the server, end the thread."""
        self._serving.stop(self._shutdown, timeout=60)
        self._close_workdir()

    async def _shutdown(self) -> None:
        self.server.closing = True
        self.cluster.store.close_watches()
        await self.cluster.kubelet.shutdown()
        if self._runner is not None:
            await self._runner.cleanup()
        loop = asyncio.get_running_loop()
        current = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks(loop) if t is not current]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
        await loop.shutdown_asyncgens()
        await loop.shutdown_default_executor()

    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the emulator's loop (all state lives there) and return its result."""
        loop, thread = self._serving.loop, self._serving.thread
        if loop is None or thread is None:
            raise RuntimeError("the emulator is not running")
        if threading.current_thread() is thread:
            return fn()

        async def call() -> T:
            return fn()
        return asyncio.run_coroutine_threadsafe(call(), loop).result(30)

    # ----- clients ----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def configuration(self) -> Any:
        """A ``kubernetes.client.Configuration`` for this API."""
        from kubernetes import client

        return self._configure(client.Configuration())

    def api_client(self) -> Any:
        """A sync ``kubernetes.client.ApiClient``; close it when done."""
        from kubernetes import client

        return client.ApiClient(self.configuration())

    def async_configuration(self) -> Any:
        from kubernetes_asyncio import client

        return self._configure(client.Configuration())

    def async_api_client(self) -> Any:
        """A ``kubernetes_asyncio.client.ApiClient``; create it inside the event loop that uses it."""
        from kubernetes_asyncio import client

        return client.ApiClient(self.async_configuration())

    def _configure(self, configuration: Any) -> Any:
        configuration.host = self.url
        if self.config.token:
            configuration.api_key = {"authorization": self.config.token}
            configuration.api_key_prefix = {"authorization": "Bearer"}
        return configuration

    def kubeconfig(self, context: str = "stepops-emulator", namespace: str = "default") -> JSON:
        """A kubeconfig document with one cluster, user and context (current) for this API."""
        user: JSON = {"token": self.config.token} if self.config.token else {}
        return {"apiVersion": "v1", "kind": "Config", "preferences": {}, "current-context": context,
                "clusters": [{"name": context, "cluster": {"server": self.url}}],
                "users": [{"name": context, "user": user}],
                "contexts": [{"name": context, "context": {"cluster": context, "user": context,
                                                           "namespace": namespace}}]}

    def write_kubeconfig(self, path: str | Path | None = None, context: str = "stepops-emulator",
                         namespace: str = "default") -> Path:
        """Write ``kubeconfig()`` (JSON, which is YAML) to ``path`` or into the emulator's directory."""
        if path is None:
            assert self.workdir is not None
            path = self.workdir / f"kubeconfig-{context}"
        path = Path(path)
        path.write_text(json.dumps(self.kubeconfig(context, namespace), indent=2))
        return path

    # ----- faults -----------------------------------------------------------------------------------

    def inject(self, kind: Fault | str, job: str | None = None, after: float = 0.0, *, namespace: str | None = None,
               pod_prefix: str | None = None, count: int | None = 1, **fields: Any) -> FaultRule:
        """Give a fault (a ``Fault``, or its kind and ``fields``) to the next ``count`` new pods matching (None:
        every matching pod). A running-pod fault for a Job whose pod runs strikes it ``after`` seconds from now."""
        fault = self._fault(Fault, kind, after, **fields)
        if job is not None and fault.kind in RUNNING_KINDS:
            found = self._find(job)
            pods = [p for p in self._pods(found) if self._pod_pids(p)] if found else []
            if pods:
                namespace, name = found["metadata"]["namespace"], found["metadata"]["name"]
                loop = self._serving.loop
                assert loop is not None
                for pod in pods:
                    loop.call_soon_threadsafe(loop.call_later, fault.after, self._strike, namespace,
                                              pod["metadata"]["name"], fault)
                return FaultRule(fault, name, 0, [p["metadata"]["name"] for p in pods], namespace=namespace)
            job, namespace = (job.rsplit("/", 1)[::-1] if "/" in job else (job, namespace))
        rule = FaultRule(fault, job, count, namespace=namespace, pod_prefix=pod_prefix)
        self._call(lambda: self.cluster.fault_rules.append(rule))
        return rule

    def _strike(self, namespace: str, pod: str, fault: Fault) -> None:
        obj = self.cluster.store.peek(PODS, namespace, pod)
        runtime = self.cluster.kubelet.runtimes.get(obj["metadata"]["uid"]) if obj else None
        if runtime is not None and runtime.current is not None:
            self.cluster.kubelet.strike(runtime, fault)

    def disrupt(self, namespace: str, pod: str, fault: Fault | str = "evicted") -> None:
        """Strike a running pod now: ``evicted``, ``preempted``, ``node_shutdown``, ``oom_killed``, ..."""
        chosen = Fault(fault) if isinstance(fault, str) else fault

        if not self._pod_pids(self.get_object(PODS.plural, namespace, pod)):
            raise RuntimeError(f"pod {namespace}/{pod} has no running container to disrupt")
        self._call(lambda: self._strike(namespace, pod, chosen))

    def fail_requests(self, status: int = 500, *, method: str | None = None, path: str | None = None,
                      count: int | None = 1, after_commit: bool = False, message: str | None = None) -> ApiFault:
        """Answer the next ``count`` matching API requests with ``status``; ``after_commit`` loses the reply."""
        fault = ApiFault(method, path, status, count, after_commit)
        if message:
            fault.message = message
        self._call(lambda: self.server.faults.append(fault))
        return fault

    def delay_replies(self, seconds: float, *, method: str | None = None, path: str | None = None,
                      count: int | None = 1) -> ApiFault:
        """Perform the next ``count`` matching requests but hold their answers for ``seconds``: a client
        whose timeout is shorter never sees the reply."""
        fault = ApiFault(method, path, count=count, delay=seconds)
        self._call(lambda: self.server.faults.append(fault))
        return fault

    def clear_faults(self) -> None:
        def clear() -> None:
            self.cluster.fault_rules.clear()
            self.server.faults.clear()
        self._call(clear)

    # ----- inspection -------------------------------------------------------------------------------

    def requests(self, method: str | None = None, path: str | None = None) -> list[dict[str, Any]]:
        """The API requests served so far (method, path, query, status), optionally filtered."""
        import re

        return [dict(r) for r in self._call(lambda: list(self.server.requests))
                if (method is None or r["method"] == method.upper()) and (path is None or re.search(path, r["path"]))]

    def get_object(self, kind: str, namespace: str | None, name: str) -> JSON | None:
        """A copy of a stored object (``kind``: plural, kind or short name), None if absent."""
        res = _resource(kind)
        return self._call(lambda: deep(self.cluster.store.peek(res, namespace if res.namespaced else None, name)))

    def list_objects(self, kind: str, namespace: str | None = None, label_selector: str | None = None) -> list[JSON]:
        res = _resource(kind)
        return self._call(lambda: deep(self.cluster.store.select(res, namespace, label_selector)))

    @property
    def jobs(self) -> list[JSON]:
        """Every Job of every namespace."""
        return self.list_objects(JOBS.plural)

    @staticmethod
    def job_id(job: JSON) -> str:
        return job["metadata"]["name"]

    def _find(self, job_id: str) -> JSON | None:
        namespace, _, name = job_id.rpartition("/")
        found = [j for j in self.list_objects(JOBS.plural, namespace or None) if j["metadata"]["name"] == name]
        return found[0] if found else None

    def job(self, job_id: str) -> JSON:
        """A Job by name (or ``namespace/name``); KeyError when there is none."""
        found = self._find(job_id)
        if found is None:
            raise KeyError(f"no job {job_id!r}")
        return found

    def status(self, job_id: str) -> str:
        conditions = (self.job(job_id).get("status") or {}).get("conditions") or []
        done = {c["type"] for c in conditions if c["status"] == "True"}
        return next((c for c in ("Complete", "Failed", "Suspended") if c in done), "Running")

    def _pods(self, job: JSON) -> list[JSON]:
        meta = job["metadata"]
        return self.list_objects(PODS.plural, meta["namespace"], f"batch.kubernetes.io/job-name={meta['name']}")

    def _pod_pids(self, pod: JSON | None) -> dict[str, int]:
        """Process ids of a pod's running containers, by container name."""
        def find() -> dict[str, int]:
            runtime = self.cluster.kubelet.runtimes.get(pod["metadata"]["uid"]) if pod else None
            if runtime is None:
                return {}
            return {name: runs[-1].proc.pid for name, runs in runtime.runs.items()
                    if runs and runs[-1].proc is not None and runs[-1].proc.returncode is None}
        return self._call(find)

    def pids(self, job_id: str) -> list[int]:
        """The running container processes (process group leaders) of the Job's pods."""
        found = self._find(job_id)
        return [pid for pod in (self._pods(found) if found else []) for pid in self._pod_pids(pod).values()]

    def pvc_path(self, namespace: str, claim: str) -> Path:
        """The host directory behind a PersistentVolumeClaim (created on demand)."""
        return self._call(lambda: self.cluster.kubelet.pvc_path(namespace, claim))

    def wait_for_job(self, namespace: str, name: str, timeout: float = 30.0) -> JSON:
        """Block until the Job has a Complete or Failed condition; returns it (TimeoutError otherwise)."""
        return self.wait_for_state(f"{namespace}/{name}", ("succeeded", "failed"), timeout)
