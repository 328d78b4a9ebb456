"""The ``kubernetes`` flavor: each step try is one ``batch/v1`` Job.

Credentials come from the cncf-kubernetes provider's hooks (a ``kubernetes`` connection, a kubeconfig
file and context, or the in-cluster service account); ``kubernetes`` and ``kubernetes_asyncio`` are
imported only inside methods. Data travels in the pod spec and the termination message (or a pod
log block it names) when small, through a mounted PersistentVolumeClaim (``pvc://`` store) or, when large, through the artifact store itself.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import tarfile
import time
from collections.abc import Callable
from functools import cached_property
from typing import Any, ClassVar

from airflow_stepops.artifacts import local_path, store_path
from airflow_stepops.bundle import StepIdentity
from airflow_stepops.exceptions import StepFailedError, StepOperatorConfigError
from airflow_stepops.hooks import kubernetes_job as manifest
from airflow_stepops.hooks import kubernetes_logs as logs
from airflow_stepops.hooks.base import JobHandle, JobStatus, StepOperatorHook, StepSpec, settings_as
from airflow_stepops.hooks.kubernetes_status import container_status, interpret, latest_pod
from airflow_stepops.prices import Price, resource_price
from airflow_stepops.runtime import protocol
from airflow_stepops.runtime.protocol import BUNDLE_FILES, Env
from airflow_stepops.settings.kubernetes import (
    KubernetesStepOperatorConfig,
    KubernetesStepOperatorSettings,
    merged_pod_options,
)
from airflow_stepops.settings.step import settings_error

HANDLE_ANNOTATION = f"{manifest.LABEL_PREFIX}/handle"
#: steps selected by one list call (``step in (...)``; keeps the URL short)
STEPS_PER_LIST = 100
#: tries of one API call; timeouts, broken connections, 429 and 5xx are retried with back-off, the
#: answers the API conventions call retryable (https://github.com/kubernetes/community/blob/master/
#: contributors/devel/sig-architecture/api-conventions.md#http-status-codes)
API_ATTEMPTS = 4
RETRY_STATUSES = (429, 500, 502, 503, 504)


#: where ``build_request`` leaves the bundle's transport to ``submit``
TRANSPORT_STANDIN = {"name": Env.BUNDLE_PARTS, "value": "<the bundle: pod spec, volume or store, chosen at "
                     "submit by its size>"}


class KubernetesStepOperatorHook(StepOperatorHook):
    """Runs steps as Kubernetes Jobs; sync client on workers, ``kubernetes_asyncio`` in the triggerer."""

    flavor: ClassVar[str] = "kubernetes"
    default_poll_interval: ClassVar[float] = 5.0
    min_poll_interval: ClassVar[float] = 0.5

    config: KubernetesStepOperatorConfig  # type: ignore[assignment]

    # ---- clients ------------------------------------------------------------------------------
    def _credentials(self) -> dict[str, Any]:
        cfg = self.config
        if cfg.kubernetes_conn_id:
            return {"conn_id": cfg.kubernetes_conn_id}
        if cfg.incluster:
            return {"conn_id": None, "cluster_context": None, "config_file": None, "in_cluster": True}
        if cfg.kubernetes_context or cfg.config_file:
            # a context names a kubeconfig entry: never fall back to the in-cluster account instead
            return {"conn_id": None, "cluster_context": cfg.kubernetes_context,
                    "config_file": cfg.config_file or _default_kubeconfig(), "in_cluster": None}
        return {"conn_id": "kubernetes_default"}

    @cached_property
    def api_client(self) -> Any:
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
        from kubernetes.config import ConfigException

        creds = self._credentials()
        try:
            return KubernetesHook(**creds).get_conn()
        except ConfigException as exc:
            raise self._no_cluster(creds, exc) from None

    def _no_cluster(self, creds: dict[str, Any], exc: Exception) -> StepOperatorConfigError:
        """Which credential sources were tried, why each gave nothing, and how to set one."""
        import os

        how = (f"set one in the extras of step operator connection {self.step_operator_conn_id!r}: \"kubernetes_conn_id\" (a kubernetes "
               "connection), \"kubernetes_context\" (with \"config_file\" for a kubeconfig elsewhere) or "
               "\"incluster\": true")
        if creds.get("conn_id") != "kubernetes_default" or self.config.kubernetes_conn_id:
            source = creds.get("conn_id") or f"kubeconfig {creds.get('config_file')}, context {creds.get('cluster_context')}"
            return StepOperatorConfigError(f"kubernetes: no cluster from {source}: {exc}; {how}")
        kubeconfig = _default_kubeconfig()
        tried = ["Airflow connection 'kubernetes_default' (absent, or without a kubeconfig)",
                 "the in-cluster service account (" + ("KUBERNETES_SERVICE_HOST is not set: not in a pod"
                                                       if not os.environ.get("KUBERNETES_SERVICE_HOST")
                                                       else "its token could not be read") + ")",
                 f"the kubeconfig {kubeconfig} (" + (str(exc) if os.path.exists(kubeconfig) else "no such file") + ")"]
        return StepOperatorConfigError(f"kubernetes: no cluster credentials found; tried {'; '.join(tried)}. "
                                       f"{how[:1].upper()}{how[1:]}")

    @cached_property
    def batch(self) -> Any:
        from kubernetes import client

        return client.BatchV1Api(self.api_client)

    @cached_property
    def core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api_client)

    @cached_property
    def async_hook(self) -> Any:
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import AsyncKubernetesHook

        creds = self._credentials()
        if creds["conn_id"]:
            return AsyncKubernetesHook(conn_id=creds["conn_id"])
        # the async hook reads a kubeconfig path only from connection extras
        extras = {k: v for k, v in {"kube_config_path": creds["config_file"], "cluster_context":
                                    creds["cluster_context"], "in_cluster": creds["in_cluster"]}.items() if v}
        return AsyncKubernetesHook(conn_id=None, connection_extras=extras)

    @property
    def namespace(self) -> str:
        return self.config.kubernetes_namespace

    @property
    def _timeout(self) -> tuple[float, float]:
        """(connect, read) seconds of every API call: a lost reply becomes a retry, never a hung worker."""
        seconds = self.config.api_timeout_seconds
        return min(seconds, 10.0), seconds

    def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> bytes:
        """The body of one sync API call, with a timeout and a bounded retry of what can heal."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        for attempt in range(API_ATTEMPTS):
            try:
                return bytes(method(*args, _preload_content=False, _request_timeout=self._timeout, **kwargs).data)
            except (ApiException, HTTPError) as exc:
                if attempt + 1 == API_ATTEMPTS or getattr(exc, "status", None) not in (None, *RETRY_STATUSES):
                    raise
                self.log.warning("Kubernetes API call %s failed (%s); retrying", method.__name__, exc)
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    async def _acall(self, api: str, method: str, *args: Any, action: str, missing: tuple[int, ...] = (),
                     **kwargs: Any) -> bytes | None:
        """The body of one async API call, with a timeout and a bounded retry of what can heal."""
        import asyncio

        import aiohttp
        from kubernetes_asyncio import client
        from kubernetes_asyncio.client.exceptions import ApiException

        for attempt in range(API_ATTEMPTS):
            try:
                async with self.async_hook.get_conn() as conn:
                    response = await getattr(getattr(client, api)(conn), method)(
                        *args, _preload_content=False, _request_timeout=self._timeout, **kwargs)
                    return await self._body(response, action, missing)
            except (ApiException, aiohttp.ClientError, asyncio.TimeoutError) as exc:
                if attempt + 1 == API_ATTEMPTS or getattr(exc, "status", None) not in (None, *RETRY_STATUSES):
                    raise
                self.log.warning("Kubernetes API call %s failed (%r); retrying", method, exc)
                await asyncio.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def artifact_root(self) -> Any:
        if self.config.pvc_store is not None:
            return store_path("file://" + str(self.config.worker_store_path))
        return super().artifact_root()

    def _api_error(self, exc: Any, action: str) -> StepOperatorConfigError | None:
        """A clear error for API answers that will not heal by retrying; None for the others."""
        status = getattr(exc, "status", None)
        try:
            message = json.loads(exc.body).get("message", "")
        except (TypeError, ValueError, AttributeError):
            message = str(getattr(exc, "reason", "")) or str(exc)
        where = f"namespace {self.namespace!r} ({self.config.credentials_source()})"
        if status in (401, 403):
            return StepOperatorConfigError(f"Kubernetes refused to {action} in {where}: {message}; check the "
                                           "credentials and RBAC of the step operator "
                                           f"{self.step_operator_conn_id!r}")
        if status in (400, 404, 422):
            return StepOperatorConfigError(f"Kubernetes rejected the request to {action} in {where}: {message}")
        return None

    # ---- the Job ------------------------------------------------------------------------------
    def build_request(self, spec: StepSpec) -> dict[str, Any]:
        """The Job with a stand-in for how the pod gets its bundle: ``submit`` chooses that by the bundle's
        size, once it is written."""
        settings = settings_as(spec, KubernetesStepOperatorSettings)
        try:
            settings.check_resources(spec.resources)
        except ValueError as exc:
            raise settings_error("kubernetes", exc) from None
        if settings.require_checkpoint_dir and manifest.checkpoint_dir(self.config, spec.identity) is None:
            raise StepOperatorConfigError(
                f"settings['step_operator.kubernetes'].require_checkpoint_dir: step operator "
                f"{self.step_operator_conn_id!r} has no durable place for {Env.CHECKPOINT_DIR}; set "
                "\"checkpoint_volume_claim\" (a ReadWriteMany PersistentVolumeClaim) in its connection extras, or "
                "use a pvc:// artifact_store")
        job = manifest.build_job(identity=spec.identity, config=self.config, settings=settings,
                                 options=merged_pod_options(self.config, settings), resources=spec.resources,
                                 image=str(self.image(spec)),
                                 transport_env=[TRANSPORT_STANDIN],
                                 max_runtime=self.max_runtime(spec), on_demand=spec.on_demand)
        handle_info = {"output_uri": spec.output_uri, "transport": "volume" if self.config.pvc_store else "inline",
                       "unschedulable_timeout": settings.unschedulable_timeout_seconds,
                       "start_timeout": settings.start_timeout_seconds,
                       "spot": settings.use_spot and not spec.on_demand, "on_demand": spec.on_demand,
                       # the unschedulable timeout of the step's pod is also its queue limit (the shorter one)
                       **({"max_queue_seconds": spec.max_queue_seconds} if spec.max_queue_seconds is not None else {}),
                       "memory_limit": ((job["spec"]["template"]["spec"]["containers"][0].get("resources") or {})
                                        .get("limits") or {}).get("memory")}
        job["metadata"]["annotations"][HANDLE_ANNOTATION] = json.dumps(handle_info, sort_keys=True)
        try:
            manifest.check_metadata(job)
        except ValueError as exc:
            raise StepOperatorConfigError(f"the Job of step {spec.task_label}: {exc}") from None
        return job

    def requirements_cache(self, spec: StepSpec) -> str | None:
        return manifest.requirements_cache(self.config)

    def spot(self, spec: StepSpec) -> bool:
        return settings_as(spec, KubernetesStepOperatorSettings).use_spot

    def max_runtime(self, spec: StepSpec) -> int | None:
        return spec.backstop(settings_as(spec, KubernetesStepOperatorSettings).max_runtime_in_seconds,
                             timeout_margin=manifest.TIMEOUT_BACKSTOP_SECONDS)

    def price(self, spec: StepSpec) -> Price:
        """What the pod requests, at the connection's prices per CPU-, GiB- and GPU-hour (a cluster has no list
        price of its own)."""
        resources, spot = spec.resources, self.spot(spec) and not spec.on_demand
        return resource_price(self.prices(), spot=spot, cpus=resources.cpu_count, memory_gib=resources.get_memory(),
                              gpus=resources.effective_gpu_count if resources.wants_gpu else 0,
                              gpu_type=resources.gpu_type, where=f"step operator {self.step_operator_conn_id!r}")

    def check_on_demand(self, spec: StepSpec) -> None:
        """Without the spot node selector a pod may still land on a spot node: an on-demand attempt needs the
        connection to say which nodes are on-demand."""
        if self.spot(spec) and self.config.on_demand_pod_overrides is None:
            raise StepOperatorConfigError(
                f"step operator {self.step_operator_conn_id!r} cannot move a use_spot step to on-demand nodes: set "
                "\"on_demand_pod_overrides\" in the connection extras (node_selector, tolerations, affinity of the "
                "on-demand nodes, e.g. {\"node_selector\": {\"karpenter.sh/capacity-type\": \"on-demand\"}})")

    def render(self, spec: StepSpec) -> dict[str, Any]:
        job = self.build_request(spec)
        container = job["spec"]["template"]["spec"]["containers"][0]
        container["command"] = [*container["command"][:2], "<airflow_stepops/runtime/entry.py>"]
        return job

    def _bundle_archive(self, files: dict[str, bytes]) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o600
                tar.addfile(info, io.BytesIO(data))
        return buffer.getvalue()

    def transport_env(self, spec: StepSpec) -> list[dict[str, Any]]:
        """How the pod gets its bundle and inputs and returns its output (see runtime/entry.py)."""
        bundle = store_path(spec.bundle_uri)
        output = store_path(spec.output_uri)
        if self.config.pvc_store is not None:
            bundle_dir, output_dir = local_path(bundle), local_path(output)
            assert bundle_dir is not None and output_dir is not None
            refs: dict[str, Any] = {}
            for index, ref in enumerate(spec.refs):
                where = local_path(ref.path)
                in_pod = manifest.pod_path(self.config, where) if where else None
                if in_pod is None:  # an input from another store: stage it on the volume
                    (bundle / "refs").mkdir(parents=True, exist_ok=True)
                    ref.copy_to(f"{bundle_dir}/{protocol.staged_ref(index)}")
                    in_pod = manifest.pod_path(self.config, f"{bundle_dir}/{protocol.staged_ref(index)}")
                refs[str(index)] = {"path": in_pod}
            return [{"name": Env.BUNDLE_PATH, "value": manifest.pod_path(self.config, bundle_dir)},
                    {"name": Env.OUTPUT_PATH, "value": manifest.pod_path(self.config, output_dir)},
                    {"name": Env.REFS, "value": json.dumps(refs)}]
        limit = self.config.inline_transfer_max_bytes
        files = {name: (bundle / name).read_bytes() for name in BUNDLE_FILES}
        raw = sum(len(data) for data in files.values())
        ref_sizes = sum(ref.size for ref in spec.refs)
        env: list[dict[str, Any]] = [{"name": Env.BUNDLE_URI, "value": spec.bundle_uri},
                                     {"name": Env.OUTPUT_URI, "value": spec.output_uri},
                                     {"name": Env.INLINE_MAX_BYTES, "value": str(limit)}]
        by_uri = {str(i): {"uri": ref.uri} for i, ref in enumerate(spec.refs)}
        attempts = []
        if spec.refs and raw + ref_sizes <= 8 * limit:
            inline_refs = {protocol.staged_ref(i): ref.path.read_bytes() for i, ref in enumerate(spec.refs)}
            attempts.append(({**files, **inline_refs}, {str(i): {"inline": protocol.staged_ref(i)}
                                                        for i in range(len(spec.refs))}))
        if raw <= 8 * limit:
            attempts.append((files, by_uri))
        for contents, refs_env in attempts:
            archive = self._bundle_archive(contents)
            if len(archive) <= limit:
                text = base64.b64encode(archive).decode()
                return [*manifest.chunked_env(Env.BUNDLE, text),
                        {"name": Env.BUNDLE_SHA256, "value": hashlib.sha256(archive).hexdigest()},
                        {"name": Env.REFS, "value": json.dumps(refs_env)}, *env]
        if not spec.bundle_uri.startswith("file://"):
            raise StepOperatorConfigError(
                f"the step's bundle ({raw} bytes with its inputs) is larger than inline_transfer_max_size="
                f"{self.config.inline_transfer_max_size} and pods cannot read the {spec.bundle_uri.split(':')[0]}:// "
                "artifact store (step images need only Python and cloudpickle); use a pvc:// artifact_store, or "
                "pass large inputs as artifacts of a pvc:// store")
        self.log.info("Bundle of %d bytes is larger than inline_transfer_max_size: the pod reads it from %s",
                      raw, spec.bundle_uri)
        return [{"name": Env.REFS, "value": json.dumps(by_uri)}, *env]

    def _handle(self, job: dict[str, Any]) -> JobHandle:
        meta = job["metadata"]
        info = json.loads(meta.get("annotations", {}).get(HANDLE_ANNOTATION) or "{}")
        return {"flavor": "kubernetes", "job_id": meta["name"], "namespace": meta.get("namespace", self.namespace),
                "step": meta["labels"][manifest.STEP_LABEL], "conn_id": self.step_operator_conn_id,
                "try_number": int(meta["labels"].get(f"{manifest.LABEL_PREFIX}/try-number", 0)), **info}

    def find_job(self, identity: StepIdentity) -> JobHandle | None:
        job = self._read_job(manifest.job_name(identity), self.namespace)
        if job is None:
            return None
        meta = job["metadata"]
        annotations = meta.get("annotations") or {}
        if (meta.get("labels") or {}).get(manifest.STEP_LABEL) != identity.digest[:40] or any(
                annotations.get(key) != value for key, value in manifest.identity_annotations(identity).items()):
            raise StepOperatorConfigError(
                f"Job {self.namespace}/{job['metadata']['name']} exists but was not created for this step try; "
                "delete it or rename the task"
            )
        return self._handle(job)

    def submit(self, spec: StepSpec) -> JobHandle:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        job = copy.deepcopy(self.prepare(spec))  # the prepared Job keeps its stand-in: submit may run again
        env = job["spec"]["template"]["spec"]["containers"][0]["env"]
        at = env.index(TRANSPORT_STANDIN)
        env[at:at + 1] = self.transport_env(spec)
        if isinstance(spec.settings, KubernetesStepOperatorSettings) and spec.settings.use_spot and \
                not spec.on_demand and manifest.checkpoint_dir(self.config, spec.identity) is None:
            self.log.warning("Step %s runs on spot nodes but gets no %s: step operator %r has no "
                             "checkpoint_volume_claim or pvc:// artifact_store, so a retry after a preemption starts "
                             "over", spec.task_label or job["metadata"]["name"], Env.CHECKPOINT_DIR, self.step_operator_conn_id)
        try:
            self._call(self.batch.create_namespaced_job, self.namespace, job)
        except (ApiException, HTTPError) as exc:
            # 409: another submitter of this try, or a try whose reply was lost, created it; the last try's
            # lost reply or 5xx may have created it too: re-attach to the Job of this identity, if any
            if getattr(exc, "status", None) in (None, 409, *RETRY_STATUSES):
                existing = self.find_job(spec.identity)
                if existing is not None:
                    self.log.info("Job %s already exists: re-attaching", job["metadata"]["name"])
                    return existing
            raise (self._api_error(exc, "create the Job") if isinstance(exc, ApiException) else None) or exc
        self.log.info("Created Job %s/%s (image %s)", self.namespace, job["metadata"]["name"],
                      job["spec"]["template"]["spec"]["containers"][0]["image"])
        return self._handle(job)

    # ---- reading state (sync) -------------------------------------------------------------------
    def _read_job(self, name: str, namespace: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return json.loads(self._call(self.batch.read_namespaced_job, name, namespace))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise self._api_error(exc, f"read Job {name}") or exc

    def _pods(self, handle: JobHandle) -> list[dict[str, Any]]:
        return json.loads(self._call(self.core.list_namespaced_pod, handle["namespace"],
                                     label_selector=f"{manifest.STEP_LABEL}={handle['step']}"))["items"]

    def _interpret(self, handle: JobHandle, job: dict[str, Any] | None, pods: list[dict[str, Any]]) -> JobStatus:
        status = interpret(job, pods, name=f"{handle['namespace']}/{handle['job_id']}", now=time.time(),
                           unschedulable_timeout=float(handle.get("unschedulable_timeout") or 900),
                           start_timeout=float(handle.get("start_timeout") or 1800),
                           memory_limit=handle.get("memory_limit"), max_queue=handle.get("max_queue_seconds"))
        status.details.setdefault("spot", bool(handle.get("spot")))
        return status

    def get_status(self, handle: JobHandle) -> JobStatus:
        job = self._read_job(handle["job_id"], handle["namespace"])
        pods = self._pods(handle) if job is not None and not _finished_ok(job) else []
        return self._interpret(handle, job, pods)

    def cancel(self, handle: JobHandle) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self._call(self.batch.delete_namespaced_job, handle["job_id"], handle["namespace"],
                       propagation_policy="Foreground")
            self.log.info("Deleted Job %s/%s (foreground propagation)", handle["namespace"], handle["job_id"])
        except ApiException as exc:
            if exc.status != 404:
                raise

    def _pod_log(self, pod: str, namespace: str, **kwargs: Any) -> str:
        from kubernetes.client.exceptions import ApiException

        try:
            return self._call(self.core.read_namespaced_pod_log, pod, namespace, container=manifest.CONTAINER,
                              **kwargs).decode(errors="replace")
        except ApiException as exc:
            if exc.status in (400, 404):  # not started yet, or gone
                return ""
            raise

    def collect_output(self, handle: JobHandle) -> None:
        """Write the output the pod returned (inline transport) to the artifact store: from its
        termination message, or from the pod log block that message names by sha256. The kubelet rotates
        logs at containerLogMaxSize and pods/log serves only the current file
        (https://kubernetes.io/docs/concepts/cluster-administration/logging/#log-rotation), so a block
        can be lost; that is an error, never a wrong or missing-but-silent result."""
        if handle.get("transport") != "inline":
            return
        output = store_path(handle["output_uri"])
        if any((output / name).exists() for name in protocol.OUTCOME_FILES):
            return
        pod = latest_pod(self._pods(handle))
        terminated = (container_status(pod).get("state") or {}).get("terminated") if pod else None
        record = logs.output_record((terminated or {}).get("message"), handle["job_id"])
        if pod is None or record is None:
            return
        kind, digest, payload = record
        if kind == "data":
            archive = logs.decode_record(digest, payload)
        else:
            archive = logs.extract_output_block(self._pod_log(pod["metadata"]["name"], handle["namespace"]),
                                                handle["job_id"], digest)
        if archive is None:
            raise StepFailedError(
                f"job {handle['job_id']} printed its output ({payload} bytes) at the end of its pod log, but "
                "the log no longer holds it whole: the kubelet rotates container logs (containerLogMaxSize) and "
                "serves only the current file. Use a pvc:// artifact_store, or a lower inline_transfer_max_size "
                "so that large outputs go to the artifact store" if kind == "log" else
                f"job {handle['job_id']} returned a damaged output in its termination message")
        output.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile() and "/" not in m.name),
                             key=lambda m: m.name in protocol.OUTCOME_FILES)
            for member in members:
                source = tar.extractfile(member)
                assert source is not None
                (output / member.name).write_bytes(source.read())

    def console_url(self, handle: JobHandle) -> str | None:
        template = self.config.console_url_template
        return template.format(namespace=handle["namespace"], name=handle["job_id"]) if template else None

    # ---- the async side (triggerer) -------------------------------------------------------------
    async def _body(self, response: Any, action: str, missing: tuple[int, ...] = ()) -> bytes | None:
        """The body of a ``_preload_content=False`` answer; kubernetes_asyncio does not raise for
        error statuses then, so do it here (clear errors for what will not heal). With
        a status in ``missing`` (a container not started yet, a pod gone) gives None."""
        from kubernetes_asyncio.client.exceptions import ApiException

        data = await response.read()
        if response.status in missing:
            return None
        if response.status >= 400:
            exc = ApiException(status=response.status, reason=response.reason)
            exc.body = data.decode(errors="replace")
            raise self._api_error(exc, action) or exc
        return bytes(data)

    async def _alist(self, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        import asyncio

        api, method = ("BatchV1Api", "list_namespaced_job") if kind == "jobs" else ("CoreV1Api", "list_namespaced_pod")
        data = await self._acall(api, method, namespace, label_selector=selector, action=f"list {kind}")
        assert data is not None
        # Jobs carry inline bundles: parse off the event loop
        return (await asyncio.to_thread(json.loads, data))["items"]

    async def aget_statuses(self, handles: list[JobHandle]) -> list[JobStatus | BaseException]:
        """Two list calls per namespace and per 100 steps per round, selecting exactly the steps polled."""
        import asyncio

        out: dict[int, JobStatus | BaseException] = {}
        groups: dict[str, list[tuple[int, JobHandle]]] = {}
        for i, handle in enumerate(handles):
            groups.setdefault(handle["namespace"], []).append((i, handle))
        for namespace, members in sorted(groups.items()):
            for start in range(0, len(members), STEPS_PER_LIST):
                mine = members[start:start + STEPS_PER_LIST]
                selector = f"{manifest.STEP_LABEL} in ({','.join(sorted({h['step'] for _, h in mine}))})"
                try:
                    jobs, pods = await asyncio.gather(self._alist("jobs", namespace, selector),
                                                      self._alist("pods", namespace, selector))
                except Exception as exc:
                    out.update({i: exc for i, _ in mine})
                    continue
                jobs_by_name = {j["metadata"]["name"]: j for j in jobs}
                pods_by_step: dict[str, list[dict[str, Any]]] = {}
                for pod in pods:
                    pods_by_step.setdefault((pod["metadata"].get("labels") or {}).get(manifest.STEP_LABEL, ""),
                                            []).append(pod)
                for i, handle in mine:
                    out[i] = self._interpret(handle, jobs_by_name.get(handle["job_id"]),
                                             pods_by_step.get(handle["step"], []))
        return [out[i] for i in range(len(handles))]

    async def acancel(self, handle: JobHandle) -> None:
        if await self._acall("BatchV1Api", "delete_namespaced_job", handle["job_id"], handle["namespace"],
                             propagation_policy="Foreground", action="delete the Job", missing=(404,)) is not None:
            self.log.info("Deleted Job %s/%s (foreground propagation)", handle["namespace"], handle["job_id"])

    async def aread_logs(self, handle: JobHandle, cursor: Any) -> tuple[list[str], Any]:
        if not (isinstance(cursor, dict) and cursor.get("pod")):  # a step's Job has one pod (backoffLimit 0)
            pod = latest_pod(await self._alist("pods", handle["namespace"], f"{manifest.STEP_LABEL}={handle['step']}"))
            if pod is None:
                return [], cursor
            cursor = logs.fresh_cursor(cursor, pod["metadata"]["name"])
        data = await self._acall("CoreV1Api", "read_namespaced_pod_log", cursor["pod"], handle["namespace"],
                                 container=manifest.CONTAINER, timestamps=True, action="read the pod log",
                                 missing=(400, 404), **logs.since_seconds(cursor))
        if data is None:
            return [], cursor
        return logs.new_lines(data.decode(errors="replace"), cursor, handle["job_id"])


def _default_kubeconfig() -> str:
    """The kubeconfig kubectl would read: the first file of ``$KUBECONFIG``, else ``~/.kube/config``."""
    import os

    for path in os.environ.get("KUBECONFIG", "").split(os.pathsep):
        if path and os.path.exists(os.path.expanduser(path)):
            return os.path.expanduser(path)
    return os.path.expanduser("~/.kube/config")


def _finished_ok(job: dict[str, Any]) -> bool:
    return any(c.get("type") == "Complete" and c.get("status") == "True"
               for c in (job.get("status") or {}).get("conditions") or [])
