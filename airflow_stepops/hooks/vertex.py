"""The ``vertex`` flavor: each step try is one Vertex AI CustomJob.

Credentials come from the google provider's ``GoogleBaseHook`` (a ``google_cloud_platform``
connection, default ``google_cloud_default``). ``google-cloud-aiplatform``'s JobService is used with
the REST transport on workers and its ``rest_asyncio`` transport in the triggerer; Cloud Logging's
``entries:list`` is called over REST. The bundle and the result live in the ``gs://`` artifact store
and the container reaches them through Vertex's ``/gcs/<bucket>`` mount, as the job's own service
account: no credentials of ours go into the job.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from functools import cached_property
from typing import Any, ClassVar

from airflow_stepops.artifacts import store_path
from airflow_stepops.bundle import StepIdentity, stage
from airflow_stepops.exceptions import StepCapacityError, StepOperatorConfigError
from airflow_stepops.hooks.base import JobHandle, JobStatus, StepOperatorHook, StepSpec, settings_as, with_queue_limit
from airflow_stepops.hooks.vertex_job import (
    STEP_LABEL,
    display_name,
    identity_labels,
    job_state,
    mount_path,
    step_filter,
    validate_body,
)
from airflow_stepops.prices import Price, machine_price
from airflow_stepops.runtime import protocol
from airflow_stepops.runtime.protocol import Env
from airflow_stepops.settings.vertex import (
    MAX_TIMEOUT_SECONDS,
    VertexStepOperatorConfig,
    VertexStepOperatorSettings,
)
from airflow_stepops.timestamps import epoch

DEFAULT_DISK_GB = 100
MAX_LIST_PAGES = 10
#: after a create whose reply was lost, look the job up this many times (1, 2, 4, 8 s apart) before giving up
LOST_REPLY_LOOKUPS = 5


class VertexStepOperatorHook(StepOperatorHook):
    """Runs steps as Vertex AI CustomJobs."""

    flavor: ClassVar[str] = "vertex"
    default_poll_interval: ClassVar[float] = 15.0
    min_poll_interval: ClassVar[float] = 2.0

    config: VertexStepOperatorConfig  # type: ignore[assignment]

    @property
    def log_settle_seconds(self) -> float:
        """Cloud Logging may take in entries late ("entries:tail" buffers up to 60 s for them:
        https://cloud.google.com/logging/docs/reference/v2/rest/v2/entries/tail); most arrive within seconds."""
        return self.config.log_settle_seconds

    # ---- clients ------------------------------------------------------------------------------
    @cached_property
    def _google(self) -> Any:
        from airflow.providers.google.common.hooks.base_google import GoogleBaseHook

        return GoogleBaseHook(gcp_conn_id=self.config.gcp_conn_id)

    @cached_property
    def _credentials_and_project(self) -> tuple[Any, str | None]:
        try:
            credentials, project = self._google.get_credentials_and_project_id()
        except Exception as exc:
            raise StepOperatorConfigError(f"gcp_conn_id: cannot get Google credentials from connection "
                                          f"{self.config.gcp_conn_id!r}: {exc}") from None
        return credentials, project

    @property
    def credentials(self) -> Any:
        return self._credentials_and_project[0]

    @cached_property
    def project(self) -> str:
        project = self.config.project or self._credentials_and_project[1]
        if not project:
            raise StepOperatorConfigError(
                f"project: step operator {self.step_operator_conn_id!r} has no GCP project; set \"project\" in its "
                f"extras or in the google connection {self.config.gcp_conn_id!r}")
        return str(project)

    @property
    def location(self) -> str:
        return self.config.location

    @property
    def parent(self) -> str:
        return f"projects/{self.project}/locations/{self.location}"

    @property
    def api_endpoint(self) -> str:
        return self.config.api_endpoint or f"{self.location}-aiplatform.googleapis.com"

    @cached_property
    def jobs(self) -> Any:
        from google.api_core.client_options import ClientOptions
        from google.cloud.aiplatform_v1 import JobServiceClient

        return JobServiceClient(transport="rest", credentials=self.credentials,
                                client_options=ClientOptions(api_endpoint=self.api_endpoint))

    def artifact_root(self) -> Any:
        if not self.config.artifact_store:
            raise StepOperatorConfigError(
                f"artifact_store: step operator {self.step_operator_conn_id!r} needs a gs:// artifact store for "
                "bundles and results (the job reads and writes them through /gcs/<bucket>)")
        store = self.config.artifact_store
        bucket_part = store[len("gs://"):].split("/", 1)[0]
        if "@" not in bucket_part:  # read and write it with the step operator's google connection
            store = f"gs://{self.config.gcp_conn_id}@{store[len('gs://'):]}"
        return store_path(store)

    def _api_error(self, exc: Exception, action: str) -> Exception:
        from google.api_core import exceptions as gexc

        # over REST, api_core picks the exception by HTTP status (BadRequest, not InvalidArgument)
        if isinstance(exc, (gexc.Forbidden, gexc.Unauthorized, gexc.BadRequest, gexc.NotFound,
                            gexc.TooManyRequests)):
            return StepOperatorConfigError(f"Vertex AI refused to {action} ({self.config.credentials_source()}, "
                                           f"{self.parent}): {type(exc).__name__}: {exc.message}")
        return exc

    def _call_options(self, *, sync: bool = True) -> dict[str, Any]:
        """``timeout`` and ``retry`` of one JobService call. The generated clients have neither by default
        (``default_timeout=None``, no retry), so a lost reply would hang the caller. Transient errors are
        retried with backoff, within a bounded time; never a create (see ``_created_despite``)."""
        from google.api_core import retry as retries

        timeout = self.config.api_timeout_seconds
        kind = retries.Retry if sync else retries.AsyncRetry
        return {"timeout": timeout, "retry": kind(predicate=_transient, initial=1.0, maximum=10.0, multiplier=2.0,
                                                  timeout=4 * timeout)}

    # ---- the request --------------------------------------------------------------------------
    def machine(self, spec: StepSpec) -> Any:
        from airflow_stepops.settings.vertex_machines import check_machine

        cfg, settings = self.config, settings_as(spec, VertexStepOperatorSettings)
        try:
            default = check_machine(cfg.machine_type, cfg.accelerator_type, cfg.accelerator_count) \
                if cfg.machine_type else None
            choice = settings.machine_for(spec.resources, default)
        except ValueError as exc:
            raise StepOperatorConfigError(str(exc)) from None
        logged: set[str] = self.__dict__.setdefault("_machines_logged", set())
        if settings.machine_type is None and not spec.resources.empty and choice is not default \
                and spec.identity.digest not in logged:  # render and submit both ask: say it once
            logged.add(spec.identity.digest)
            self.log.info("Machine for %s: %s, the smallest that fits the step's resources",
                          spec.task_label or display_name(spec.identity), choice.describe())
        return choice

    def requirements_cache(self, spec: StepSpec) -> str | None:
        """Under the artifact store, which every job mounts at /gcs: installed requirements outlive the job."""
        return mount_path(str(self.artifact_root() / ".stepops" / "requirements"))

    def _refs(self, spec: StepSpec, bundle: str) -> protocol.Refs:
        """Inputs on GCS are read through the job's /gcs mount; the others are staged into the bundle."""
        return {str(index): {"path": mount_path(ref.uri) or f"{bundle}/{protocol.staged_ref(index)}"}
                for index, ref in enumerate(spec.refs)}

    def build_request(self, spec: StepSpec) -> dict[str, Any]:
        import json

        cfg, settings = self.config, settings_as(spec, VertexStepOperatorSettings)
        bundle, output = mount_path(spec.bundle_uri), mount_path(spec.output_uri)
        if bundle is None or output is None:
            raise StepOperatorConfigError(f"artifact_store: Vertex needs a gs:// store, got {spec.bundle_uri!r}")
        machine = self.machine(spec)
        step_root = output.rsplit("/", 2)[0]  # .../<map index>: shared by all tries of the step
        env = {**cfg.environment, **settings.environment, Env.FLAVOR: "vertex", "PYTHONUNBUFFERED": "1",
               Env.BUNDLE_PATH: bundle, Env.OUTPUT_PATH: output,
               # where a step keeps state that must survive a Spot preemption (the next try finds it)
               Env.CHECKPOINT_DIR: f"{step_root}/checkpoints", Env.REFS: json.dumps(self._refs(spec, bundle)),
               Env.REQUIREMENTS_CACHE: str(self.requirements_cache(spec))}
        runtime = self.max_runtime(spec)
        machine_spec: dict[str, Any] = {"machineType": machine.machine_type}
        if machine.accelerator_type:
            machine_spec.update(acceleratorType=machine.accelerator_type, acceleratorCount=machine.accelerator_count)
        disk = settings.disk_size_gb or (max(math.ceil(spec.resources.disk_bytes / 10**9), DEFAULT_DISK_GB)
                                         if spec.resources.disk_bytes else DEFAULT_DISK_GB)
        # Airflow owns retries. Without disableRetries Vertex restarts a worker that exits non-zero (up to five
        # times) and then retries the whole job (up to three times): side effects and GPU hours repeated within
        # one Airflow try. https://cloud.google.com/vertex-ai/docs/training/understanding-training-service
        # ("Restart workers during the training job"; "Handle training errors"); disableRetries also overrides
        # restartJobOnWorkerRestart to false: https://cloud.google.com/vertex-ai/docs/reference/rest/v1/
        # CustomJobSpec#Scheduling. VM maintenance still restarts the worker: the runtime then finds this try's
        # outcome already written and does not run the step again (runtime/entry.py).
        scheduling: dict[str, Any] = {"timeout": f"{runtime}s", "disableRetries": True}
        # Scheduling.strategy: SPOT uses Spot VMs, STANDARD "uses regular on-demand resources" (an on-demand attempt
        # says so explicitly): https://cloud.google.com/php/docs/reference/cloud-ai-platform/latest/V1.Scheduling.Strategy
        if self.spot(spec):
            scheduling["strategy"] = "STANDARD" if spec.on_demand else "SPOT"
        # max_queue_seconds: Vertex's own scheduling.maxWaitDuration applies only with the DWS FLEX_START strategy
        # ("the maximum duration that a job will wait for the requested resources to be provisioned if the scheduling
        # strategy is set to [Strategy.DWS_FLEX_START]", https://cloud.google.com/vertex-ai/docs/reference/rest/v1/
        # CustomJobSpec#Scheduling), which the step operator does not use: the trigger enforces it
        job_spec: dict[str, Any] = {
            "workerPoolSpecs": [{
                "machineSpec": machine_spec, "replicaCount": "1",
                "diskSpec": {"bootDiskType": settings.boot_disk_type or "pd-ssd", "bootDiskSizeGb": disk},
                "containerSpec": {"imageUri": self.image(spec),
                                  "command": ["python3", f"{bundle}/{protocol.ENTRY_FILE}"],
                                  "env": [{"name": k, "value": v} for k, v in env.items()]},
            }],
            "scheduling": scheduling,
        }
        if cfg.service_account:
            job_spec["serviceAccount"] = cfg.service_account
        if cfg.network:
            job_spec["network"] = cfg.network
        if cfg.reserved_ip_ranges:
            job_spec["reservedIpRanges"] = list(cfg.reserved_ip_ranges)
        if cfg.persistent_resource_id:
            job_spec["persistentResourceId"] = cfg.persistent_resource_id
        body: dict[str, Any] = {"displayName": display_name(spec.identity), "jobSpec": job_spec,
                                "labels": {**cfg.labels, **settings.labels, **identity_labels(spec.identity)}}
        if cfg.encryption_spec_key_name:
            body["encryptionSpec"] = {"kmsKeyName": cfg.encryption_spec_key_name}
        validate_body(body)
        return body

    def spot(self, spec: StepSpec) -> bool:
        return settings_as(spec, VertexStepOperatorSettings).spot

    def max_runtime(self, spec: StepSpec) -> int:
        return spec.backstop(settings_as(spec, VertexStepOperatorSettings).max_runtime_in_seconds
                             or MAX_TIMEOUT_SECONDS) or MAX_TIMEOUT_SECONDS

    def price(self, spec: StepSpec) -> Price:
        """The machine type's rate, plus its accelerators' where they are attached (N1); Spot VMs are "billed by
        job duration and machine type", not while queued or preempted
        (https://cloud.google.com/vertex-ai/docs/training/use-spot-vms)."""
        from airflow_stepops.settings import vertex_machines as table

        choice, spot, prices = self.machine(spec), self.spot(spec) and not spec.on_demand, self.prices()
        machine = machine_price(table.PRICES, table.MACHINE_TYPES.get(choice.machine_type), choice.machine_type,
                                spot=spot, prices=prices)
        if choice.accelerator_type is None or choice.machine_type not in table.MACHINE_TYPES or \
                table.MACHINE_TYPES[choice.machine_type].gpus:  # a fixed-GPU type's price includes its GPUs
            return machine
        attached = table.attached_gpu(choice.accelerator_type)
        gpus = machine_price(table.PRICES, attached, choice.accelerator_type, spot=spot, prices=prices,
                             count=choice.accelerator_count)
        if machine.per_hour is None or gpus.per_hour is None:
            return machine if machine.per_hour is None else gpus
        return replace(machine, per_hour=machine.per_hour + gpus.per_hour, basis=f"{machine.basis} + {gpus.basis}")

    # ---- lifecycle ----------------------------------------------------------------------------
    def _handle(self, job: dict[str, Any], output_uri: str, try_number: int) -> JobHandle:
        pool = (job.get("jobSpec", {}).get("workerPoolSpecs") or [{}])[0]
        return {"flavor": "vertex", "job_id": job["name"].rsplit("/", 1)[-1], "name": job["name"],
                "project": self.project, "location": self.location, "output_uri": output_uri,
                "conn_id": self.step_operator_conn_id, "try_number": try_number,
                "spot": (job.get("jobSpec", {}).get("scheduling") or {}).get("strategy") == "SPOT",
                "machine_type": (pool.get("machineSpec") or {}).get("machineType")}

    @staticmethod
    def _json(job: Any) -> dict[str, Any]:
        import json

        return dict(json.loads(type(job).to_json(job, use_integers_for_enums=False)))

    def _job_name(self, handle: JobHandle) -> str:
        return str(handle.get("name") or f"{self.parent}/customJobs/{handle['job_id']}")

    def find_job(self, identity: StepIdentity) -> JobHandle | None:
        """Vertex assigns job ids: the step try's job is found by its identity label."""
        try:
            found = [self._json(job) for job in self.jobs.list_custom_jobs(
                request={"parent": self.parent, "filter": step_filter(identity)}, **self._call_options())]
        except Exception as exc:
            raise self._api_error(exc, "list custom jobs") from exc
        if not found:
            return None
        job = max(found, key=lambda j: str(j.get("createTime") or ""))
        if len(found) > 1:
            self.log.warning("%d CustomJobs carry the label of step try %s; following the newest, %s", len(found),
                             display_name(identity), job["name"])
        return self._handle(job, str(identity.prefix(self.artifact_root()) / "output"), identity.try_number)

    def submit(self, spec: StepSpec) -> JobHandle:
        body = self.prepare(spec)
        stage(spec.bundle_uri, {i: ref for i, ref in enumerate(spec.refs) if not mount_path(ref.uri)})
        # Vertex assigns job ids and CustomJob create takes no request id: nothing refuses a second job of this
        # try, so the look-up the operator made before writing the bundle is made once more, right before create
        existing = self.find_job(spec.identity)
        if existing is not None:
            self.log.info("CustomJob %s of this try already exists: re-attaching", existing["job_id"])
            existing["on_demand"] = spec.on_demand
            return with_queue_limit(existing, spec)
        try:  # no retry: a second create would make a second job
            job = self._json(self.jobs.create_custom_job(parent=self.parent, custom_job=validate_body(body),
                                                         timeout=self.config.api_timeout_seconds))
        except Exception as exc:
            if not _reply_lost(exc):
                raise self._create_error(exc) from exc
            found = self._created_despite(exc, spec.identity)
            if found is None:
                raise
            found["on_demand"] = spec.on_demand
            return with_queue_limit(found, spec)
        machine = body["jobSpec"]["workerPoolSpecs"][0]["machineSpec"]
        self.log.info("Created Vertex AI CustomJob %s (%s%s%s)", job["name"], machine["machineType"],
                      f", {machine['acceleratorCount']} x {machine['acceleratorType']}"
                      if machine.get("acceleratorType") else "",
                      ", spot" if body["jobSpec"]["scheduling"].get("strategy") == "SPOT" else
                      ", on-demand" if spec.on_demand else "")
        handle = self._handle(job, spec.output_uri, spec.identity.try_number)
        handle["on_demand"] = spec.on_demand
        return with_queue_limit(handle, spec)

    def _create_error(self, exc: Exception) -> Exception:
        """A refused create: HTTP 429 RESOURCE_EXHAUSTED is the project's quota for what the job asks ("The following
        quota metrics exceed quota limits: aiplatform.googleapis.com/custom_model_training_nvidia_l4_gpus",
        github.com/GoogleCloudPlatform/stable-diffusion-on-gcp/issues/12; 429 is RESOURCE_EXHAUSTED in
        https://cloud.google.com/apis/design/errors#handling_errors): a capacity error, nothing was made."""
        from google.api_core import exceptions as gexc

        if isinstance(exc, gexc.TooManyRequests):
            return StepCapacityError(f"Vertex AI refused to create the CustomJob ({self.config.credentials_source()}, "
                                     f"{self.parent}): quota exceeded: {exc.message}", reason="quota_exceeded")
        return self._api_error(exc, "create the CustomJob")

    def _created_despite(self, exc: Exception, identity: StepIdentity) -> JobHandle | None:
        """The job of a create whose reply was lost (timeout, dropped connection, 5xx): Vertex may have made
        it, and CustomJob create takes no request id, so it is looked up by the try's label, a few times
        in case the list lags behind; None if it never shows up (the error then fails this try)."""
        delay = 1.0
        for attempt in range(LOST_REPLY_LOOKUPS):
            found = self.find_job(identity)
            if found is not None:
                self.log.warning("The reply to creating the CustomJob was lost (%s: %s); found the job by its "
                                 "label: %s", type(exc).__name__, exc, found["job_id"])
                return found
            if attempt < LOST_REPLY_LOOKUPS - 1:
                time.sleep(delay)
                delay *= 2
        self.log.error("The reply to creating the CustomJob was lost (%s) and no job carries this try's label",
                       type(exc).__name__)
        return None

    def _get(self, handle: JobHandle) -> dict[str, Any] | None:
        from google.api_core import exceptions as gexc

        try:
            return self._json(self.jobs.get_custom_job(name=self._job_name(handle), **self._call_options()))
        except gexc.NotFound:
            return None
        except Exception as exc:
            raise self._api_error(exc, f"get CustomJob {handle['job_id']}") from exc

    def get_status(self, handle: JobHandle) -> JobStatus:
        return job_state(self._get(handle), handle)

    def cancel(self, handle: JobHandle) -> None:
        from google.api_core import exceptions as gexc

        try:
            self.jobs.cancel_custom_job(name=self._job_name(handle), **self._call_options())
            self.log.info("Cancelling Vertex AI CustomJob %s", handle["job_id"])
        except (gexc.NotFound, gexc.BadRequest):
            pass  # gone, or already finished (FAILED_PRECONDITION, a 400 over REST)

    def console_url(self, handle: JobHandle) -> str | None:
        return self.config.console_url_template.format(location=handle.get("location") or self.location,
                                                       job_id=handle["job_id"],
                                                       project=handle.get("project") or self.project)

    def cost_url(self, handle: JobHandle) -> str | None:
        return f"https://console.cloud.google.com/billing/linkedaccount?project={handle.get('project') or self.project}"

    # ---- async (triggerer) --------------------------------------------------------------------
    async def _token(self) -> str:
        """A valid access token. The google connection is read, and the token refreshed, in a thread: in
        the triggerer a connection lookup on the event loop fails outside a trigger's own ``run()``."""
        import asyncio

        credentials, _ = await asyncio.to_thread(lambda: (self.credentials, self.project))
        if not credentials.valid or not credentials.token:
            from google.auth.transport.requests import Request

            await asyncio.to_thread(credentials.refresh, Request())
        return str(credentials.token)

    async def _async_jobs(self) -> Any:
        """A JobService client on the async REST transport; use it as ``async with`` (it owns an
        aiohttp session). The token is refreshed by the sync credentials, in a thread."""
        import asyncio
        import importlib

        token = await self._token()
        # the first import of aiplatform costs seconds of CPU: not on the triggerer's event loop
        aiplatform = await asyncio.to_thread(importlib.import_module, "google.cloud.aiplatform_v1")
        from google.api_core.client_options import ClientOptions
        from google.auth.aio.credentials import StaticCredentials

        return aiplatform.JobServiceAsyncClient(transport="rest_asyncio", credentials=StaticCredentials(token=token),  # type: ignore[arg-type]
                                     client_options=ClientOptions(api_endpoint=self.api_endpoint))

    async def aget_statuses(self, handles: list[JobHandle]) -> list[JobStatus | BaseException]:
        """One ``ListCustomJobs`` of our jobs created since the oldest waiting one answers for every
        waiting step (the list carries whole jobs); jobs not in it are read one by one."""
        async with await self._async_jobs() as client:
            return await self._poll_round(client, handles)

    async def _poll_round(self, client: Any, handles: list[JobHandle]) -> list[JobStatus | BaseException]:
        import asyncio

        from google.api_core import exceptions as gexc

        # ListCustomJobs filters on display_name, state, create_time and labels only (not update_time):
        # https://cloud.google.com/vertex-ai/docs/reference/rest/v1/projects.locations.customJobs/list
        created: dict[str, str] = self.__dict__.setdefault("_created", {})
        known = [created[h["job_id"]] for h in handles if h["job_id"] in created]
        jobs: dict[str, dict[str, Any]] = {}
        if known:
            oldest = min(known, key=lambda stamp: epoch(stamp) or 0.0)
            request = {"parent": self.parent, "page_size": 100,
                       "filter": f'labels.{STEP_LABEL}:* AND create_time>="{oldest}"'}
            pager = await client.list_custom_jobs(request=request, **self._call_options(sync=False))
            pages = 0
            async for page in pager.pages:
                for job in page.custom_jobs:
                    data = self._json(job)
                    jobs[data["name"].rsplit("/", 1)[-1]] = data
                pages += 1
                if pages >= MAX_LIST_PAGES:
                    break

        async def one(handle: JobHandle) -> dict[str, Any] | None:
            try:
                return self._json(await client.get_custom_job(name=self._job_name(handle),
                                                              **self._call_options(sync=False)))
            except gexc.NotFound:
                return None

        missing = [h for h in handles if h["job_id"] not in jobs]  # new, or not listed (yet)
        fetched = dict(zip((h["job_id"] for h in missing),
                           await asyncio.gather(*(one(h) for h in missing), return_exceptions=True)))
        out: list[JobStatus | BaseException] = []
        for handle in handles:
            result = jobs.get(handle["job_id"]) or fetched.get(handle["job_id"])
            if isinstance(result, BaseException):
                out.append(self._api_error(result, f"get CustomJob {handle['job_id']}")
                           if isinstance(result, Exception) else result)
                continue
            if result is not None and result.get("createTime"):
                created[handle["job_id"]] = result["createTime"]
            out.append(job_state(result, handle))
        for job_id in set(created) - {h["job_id"] for h in handles}:
            del created[job_id]
        return out

    async def acancel(self, handle: JobHandle) -> None:
        from google.api_core import exceptions as gexc

        async with await self._async_jobs() as client:
            try:
                await client.cancel_custom_job(name=self._job_name(handle), **self._call_options(sync=False))
                self.log.info("Cancelling Vertex AI CustomJob %s", handle["job_id"])
            except (gexc.NotFound, gexc.BadRequest):
                pass  # gone, or already finished

    async def aread_logs(self, handle: JobHandle, cursor: Any) -> tuple[list[str], Any]:
        import aiohttp

        from airflow_stepops.hooks.vertex_logs import aread_entries, logging_url

        cursor = dict(cursor or {})
        if time.time() < cursor.get("not_before", 0):  # Cloud Logging read quota: back off after a 429
            return [], cursor
        token = await self._token()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.api_timeout_seconds)) \
                as session:
            try:
                lines, new = await aread_entries(session, logging_url(self.config.logging_endpoint), token,
                                                 handle.get("project") or self.project, handle["job_id"], cursor)
            except RuntimeError as exc:
                if " 429" not in str(exc):
                    raise
                self.log.warning("Cloud Logging read quota exhausted; reading job logs again in 60 s")
                return [], {**cursor, "not_before": time.time() + 60}
        return lines, new


def _reply_lost(exc: BaseException) -> bool:
    """A call that may have been carried out although no answer came: a timeout, a dropped connection, or
    a 500/503/504 (https://cloud.google.com/apis/design/errors#handling_errors: UNAVAILABLE, INTERNAL and
    DEADLINE_EXCEEDED are the retryable ones)."""
    import asyncio

    import requests
    from google.api_core import exceptions as gexc
    from google.auth.exceptions import TransportError

    return isinstance(exc, (gexc.InternalServerError, gexc.ServiceUnavailable, gexc.GatewayTimeout,
                            gexc.DeadlineExceeded, requests.ConnectionError, requests.Timeout,
                            asyncio.TimeoutError, TransportError))


def _transient(exc: BaseException) -> bool:
    """Worth retrying a call that changes nothing (get, list, cancel): a lost reply or a rate limit."""
    from google.api_core import exceptions as gexc

    return _reply_lost(exc) or isinstance(exc, gexc.TooManyRequests)
