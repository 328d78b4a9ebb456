"""The ``azureml`` flavor: each step try is one Azure Machine Learning command job.

Credentials come from the microsoft-azure provider's ``azure`` connection (default ``azure_default``):
a service principal (login = client id, password = secret, extra ``tenantId``) becomes a
``ClientSecretCredential``; anything else, or no such connection, ``DefaultAzureCredential`` (with the
connection's ``managed_identity_client_id`` / ``workload_identity_tenant_id``), as the provider does.
``azure-ai-ml``'s ``MLClient`` (one per hook) creates, reads and cancels jobs; run history gives errors
and the log's SAS URL. The bundle and the result live in the blob artifact store: workers write them with
Airflow's object storage (``abfs://``), the job gets the bundle as a ``uri_folder`` input and writes its
result to a ``rw_mount`` output on the same blobs through a workspace datastore, so the job needs no
credentials of ours and the SDK's local ``code=`` upload is never used.
"""

from __future__ import annotations

import json
import logging
import shlex
from functools import cached_property
from typing import Any, ClassVar

from airflow_stepops.artifacts import store_path
from airflow_stepops.bundle import StepIdentity, stage
from airflow_stepops.exceptions import StepCapacityError, StepOperatorConfigError
from airflow_stepops.hooks.azureml_job import (
    STEP_TAG,
    BlobStore,
    _error_of,
    check_name,
    experiment_name,
    identity_tags,
    job_name,
    job_state,
    parse_store,
)
from airflow_stepops.hooks.base import JobHandle, JobStatus, StepOperatorHook, StepSpec, settings_as, with_queue_limit
from airflow_stepops.prices import Price, machine_price
from airflow_stepops.runtime import protocol
from airflow_stepops.runtime.protocol import Env
from airflow_stepops.settings.azureml import (
    MAX_DISPLAY_NAME,
    MAX_TAGS,
    AzureMLStepOperatorConfig,
    AzureMLStepOperatorSettings,
    tier_with_cluster,
)
from airflow_stepops.timestamps import epoch

PROVIDER = "Microsoft.MachineLearningServices"
#: the SDK's and azure-core's chatter (every request and header at INFO, experimental-class notices)
_QUIET_LOGGERS = ("azure.core.pipeline.policies.http_logging_policy", "azure.identity", "azure.ai.ml",
                  "azure.ai.ml._utils._experimental")


def _quiet_sdk_logs() -> None:
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if name != "azure.ai.ml._utils._experimental"
                                         else logging.ERROR)


class AzureMLStepOperatorHook(StepOperatorHook):
    """Runs steps as Azure ML command jobs."""

    flavor: ClassVar[str] = "azureml"
    default_poll_interval: ClassVar[float] = 15.0
    min_poll_interval: ClassVar[float] = 2.0

    config: AzureMLStepOperatorConfig  # type: ignore[assignment]

    # ---- clients ------------------------------------------------------------------------------
    @cached_property
    def credential(self) -> Any:
        """The azure connection's service principal, else DefaultAzureCredential (also without one)."""
        from airflow.providers.microsoft.azure.utils import get_sync_default_azure_credential

        from airflow_stepops._compat import AirflowNotFoundException
        from airflow_stepops.connections import get_connection

        _quiet_sdk_logs()
        try:
            conn = get_connection(self.config.azure_conn_id)
        except AirflowNotFoundException:
            conn = None
        extras = dict(conn.extra_dejson or {}) if conn is not None else {}

        def extra(name: str) -> Any:
            return extras.get(name) or extras.get(f"extra__azure__{name}") or None

        tenant = extra("tenantId") or extra("tenant_id")
        if conn is not None and conn.login and conn.password and tenant:
            from azure.identity import ClientSecretCredential

            return ClientSecretCredential(tenant_id=tenant, client_id=conn.login, client_secret=conn.password)
        return get_sync_default_azure_credential(managed_identity_client_id=extra("managed_identity_client_id"),
                                                 workload_identity_tenant_id=extra("workload_identity_tenant_id"))

    @cached_property
    def ml_client(self) -> Any:
        """Every call has a deadline and bounded retries: azure-core's defaults wait 300 s for an answer and
        retry 10 times, so a lost reply would hold a worker for most of an hour. MLClient hands these keywords
        to each of its service clients' pipelines (``RetryPolicy`` and the transport's ``read_timeout``)."""
        from azure.ai.ml import MLClient

        _quiet_sdk_logs()
        cfg = self.config
        return MLClient(self.credential, cfg.subscription_id, cfg.resource_group, cfg.workspace_name,
                        enable_telemetry=False, show_progress=False, connection_timeout=min(cfg.api_timeout_seconds, 20),
                        read_timeout=cfg.api_timeout_seconds, retry_total=cfg.api_max_attempts - 1, retry_backoff_max=10)

    @property
    def workspace_id(self) -> str:
        cfg = self.config
        return (f"/subscriptions/{cfg.subscription_id}/resourceGroups/{cfg.resource_group}/providers/{PROVIDER}"
                f"/workspaces/{cfg.workspace_name}")

    def _api_error(self, exc: Exception, action: str) -> Exception:
        from azure.core.exceptions import ClientAuthenticationError, HttpResponseError

        if isinstance(exc, ClientAuthenticationError):
            return StepOperatorConfigError(f"Azure ML: cannot authenticate to {action} ("
                                           f"{self.config.credentials_source()}): {exc}")
        status = getattr(exc, "status_code", None)
        if isinstance(exc, HttpResponseError) and status is not None and 400 <= status < 500 and status != 429:
            message = getattr(getattr(exc, "error", None), "message", None) or str(exc).splitlines()[0]
            return StepOperatorConfigError(f"Azure ML refused to {action} ({self.config.credentials_source()}): "
                                           f"HTTP {status}: {message}")
        return exc

    # ---- the artifact store -------------------------------------------------------------------
    def _container_of(self, datastore: str) -> str:
        try:
            found = self.ml_client.datastores.get(datastore)
        except Exception as exc:
            raise self._api_error(exc, f"read the datastore {datastore!r}") from exc
        container = getattr(found, "container_name", None)
        if not container:
            raise StepOperatorConfigError(f"datastore {datastore!r} is not an Azure Blob datastore (type "
                                          f"{getattr(found, 'type', '?')}); the artifact store must be blob storage")
        return str(container)

    @cached_property
    def store(self) -> BlobStore:
        cfg = self.config
        if not cfg.artifact_store:
            raise StepOperatorConfigError(
                f"artifact_store: step operator {self.step_operator_conn_id!r} needs a blob artifact store for "
                "bundles and results: azureml://datastores/<datastore>/paths/<prefix> or abfs://<storage conn "
                "id>@<container>/<prefix>")
        return parse_store(cfg.artifact_store, cfg.datastore, cfg.storage_conn_id, self._container_of)

    def artifact_root(self) -> Any:
        """The store as workers see it. Its calls go through adlfs to azure-storage-blob, whose clients bound
        every request themselves (20 s to connect, 60 s to read, ``ExponentialRetry`` with 3 retries:
        ``azure/storage/blob/_shared/constants.py`` and ``policies.py``)."""
        _quiet_sdk_logs()  # adlfs's blob client logs every request at INFO too
        return store_path(self.store.worker_uri)

    def check_store(self) -> None:
        super().check_store()
        self._check_datastore()

    def _check_datastore(self) -> None:
        """An abfs:// store is reached by jobs through ``datastore``: it must be the store's container."""
        store = self.store
        if self.config.artifact_store and self.config.artifact_store.startswith("azureml://"):
            return
        if self.__dict__.get("_datastore_checked"):
            return
        container = self._container_of(store.datastore)
        if container != store.container:
            raise StepOperatorConfigError(
                f"datastore: {store.datastore!r} points at the container {container!r}, not at the artifact store's "
                f"{store.container!r}; set \"datastore\" to a datastore of that container (or use an azureml://"
                "datastores/... artifact_store)")
        self.__dict__["_datastore_checked"] = True

    # ---- the job ------------------------------------------------------------------------------
    def compute_target(self, spec: StepSpec, *, on_demand: bool | None = None) -> str | None:
        """The compute the step runs on (None: serverless); an attempt on on-demand capacity (``on_demand``,
        default ``spec.on_demand``) runs on the connection's ``on_demand_compute_target_name`` when it names one."""
        settings = settings_as(spec, AzureMLStepOperatorSettings)
        if settings.compute_target_name is not None:
            compute = settings.compute_target_name or None  # "" is serverless
        else:
            compute = self.config.compute_target_name
        if compute and (spec.on_demand if on_demand is None else on_demand):
            return self.config.on_demand_compute_target_name or compute
        return compute

    def _low_priority(self, compute: str) -> bool:
        """Whether the cluster's nodes are low priority (preemptible): its ``tier`` (AmlCompute ``vmPriority``), read
        with one GET per hook; a job cannot choose its node priority on a cluster, the cluster has one
        (https://learn.microsoft.com/en-us/azure/machine-learning/how-to-use-low-priority-batch: "Per-job
        configuration isn't possible")."""
        return str(self._compute_info(compute).get("tier") or "") == "low_priority"

    def spot(self, spec: StepSpec) -> bool:
        """Serverless: the Spot job tier. On a cluster: whether its nodes are low priority (looked up once)."""
        compute = self.compute_target(spec, on_demand=False)
        if compute:
            return self._low_priority(compute)
        return settings_as(spec, AzureMLStepOperatorSettings).spot

    def check_on_demand(self, spec: StepSpec) -> None:
        """Serverless steps move to the Standard tier; on a low-priority cluster an on-demand attempt needs a
        dedicated cluster: the connection's ``on_demand_compute_target_name``."""
        compute = self.compute_target(spec, on_demand=False)
        if compute and not self.config.on_demand_compute_target_name and self._low_priority(compute):
            raise StepOperatorConfigError(
                f"the step runs on the low-priority cluster {compute!r}, whose nodes cannot be made on-demand for one "
                f"job: set \"on_demand_compute_target_name\" in the connection extras of {self.step_operator_conn_id!r} "
                "to a dedicated cluster for on-demand attempts, or run the step on serverless compute "
                "(compute_target_name=\"\", job_tier=\"Spot\")")

    def price(self, spec: StepSpec) -> Price:
        """The VM size's rate (serverless: the step's; on a cluster: the cluster's), at the Spot tier's or a
        low-priority cluster's price when the attempt runs there."""
        from airflow_stepops.settings.azureml_vms import PRICES, VM_SIZES

        vm, compute = self.vm_size(spec), self.compute_target(spec)
        name = vm.name if vm is not None else str(self._compute_info(compute).get("size") or "") if compute else ""
        if not name:
            return Price.missing(f"the size of compute {compute!r} is not known")
        return machine_price(PRICES, VM_SIZES.get(name.lower()), name, spot=self.spot(spec) and not spec.on_demand,
                             prices=self.prices())

    def vm_size(self, spec: StepSpec) -> Any:
        """The serverless VM size of the step (None on a compute target)."""
        cfg, settings = self.config, settings_as(spec, AzureMLStepOperatorSettings)
        compute = self.compute_target(spec)
        if compute:
            if settings.job_tier:
                raise StepOperatorConfigError(tier_with_cluster(settings.job_tier, compute))
            if settings.instance_type:
                raise StepOperatorConfigError(f"instance_type={settings.instance_type} with compute target "
                                              f"{compute!r}: a cluster has its own VM size; set compute_target_name"
                                              "=\"\" for serverless compute")
            return None
        try:
            vm = settings.vm_for(spec.resources, cfg.instance_type)
        except ValueError as exc:
            raise StepOperatorConfigError(str(exc)) from None
        logged: set[str] = self.__dict__.setdefault("_vm_logged", set())
        if settings.instance_type is None and vm.name != cfg.instance_type and spec.identity.digest not in logged:
            logged.add(spec.identity.digest)
            self.log.info("VM size for %s: %s, the cheapest that fits the step's resources",
                          spec.task_label or job_name(spec.identity), vm.describe())
        return vm

    def image(self, spec: StepSpec) -> str | None:
        return self.config.azureml_environment or super().image(spec)

    def requirements_cache(self, spec: StepSpec) -> str | None:
        """A read-write mounted output under the artifact store: installed requirements outlive the job."""
        return "${{outputs.requirements_cache}}"

    def _environment(self, spec: StepSpec, resolved: bool) -> Any:
        cfg = self.config
        if cfg.azureml_environment:
            if not resolved:
                return cfg.azureml_environment
            _, name, version = cfg.azureml_environment.split(":", 2)
            return f"{self.workspace_id}/environments/{name}/versions/{version}"
        from azure.ai.ml.entities import Environment

        environment = Environment(image=self.image(spec))  # anonymous: CliV2AnonymousEnvironment, version = its hash
        if not resolved:
            return environment
        return f"{self.workspace_id}/environments/{environment.name}/versions/{environment.version}"

    def _refs(self, spec: StepSpec) -> tuple[dict[str, str], dict[str, str]]:
        """(ref index -> job input URI for refs in the store's container, ref index -> URI to stage)."""
        inputs, staged = {}, {}
        for index, ref in enumerate(spec.refs):
            uri = self.store.job_uri(ref.uri)
            if uri:
                inputs[str(index)] = uri
            else:
                staged[str(index)] = ref.uri
        return inputs, staged

    def build_job(self, spec: StepSpec, *, resolved: bool = False) -> Any:
        """The ``azure.ai.ml`` Command of the step try; ``resolved``: environment and compute as ARM ids (what
        ``jobs.create_or_update`` sends once it resolved them), for the rendered body."""
        from azure.ai.ml import Input, Output, command
        from azure.ai.ml.entities import JobResourceConfiguration, QueueSettings

        cfg, settings = self.config, settings_as(spec, AzureMLStepOperatorSettings)
        environment = self._environment(spec, resolved)
        vm = self.vm_size(spec)
        compute = self.compute_target(spec)
        bundle_uri, output_uri = self.store.job_uri(spec.bundle_uri), self.store.job_uri(spec.output_uri)
        if bundle_uri is None or output_uri is None:
            raise StepOperatorConfigError(f"artifact_store: {spec.bundle_uri!r} is not in the step operator's blob "
                                          f"container {self.store.container!r}")
        step_root = output_uri.rstrip("/").rsplit("/", 2)[0]  # .../<map index>: shared by all tries of the step
        inputs: dict[str, Any] = {"bundle": Input(type="uri_folder", path=bundle_uri, mode="download")}
        ref_inputs, staged = self._refs(spec)
        refs: dict[str, dict[str, str]] = {}
        for index in sorted({*ref_inputs, *staged}, key=int):
            if index in ref_inputs:
                inputs[f"ref_{index}"] = Input(type="uri_file", path=ref_inputs[index], mode="ro_mount")
                refs[index] = {"path": f"${{{{inputs.ref_{index}}}}}"}
            else:
                refs[index] = {"path": f"${{{{inputs.bundle}}}}/{protocol.staged_ref(index)}"}
        outputs = {"output": Output(type="uri_folder", path=output_uri, mode="rw_mount"),
                   # where a step keeps state that must survive a preemption (the next try finds it)
                   "checkpoints": Output(type="uri_folder", path=f"{step_root}/checkpoints", mode="rw_mount"),
                   "requirements_cache": Output(type="uri_folder", mode="rw_mount",
                                                path=self.store.job_uri(str(self.artifact_root() / ".stepops"
                                                                            / "requirements")))}
        exports = {Env.BUNDLE_PATH: "${{inputs.bundle}}", Env.OUTPUT_PATH: "${{outputs.output}}",
                   Env.CHECKPOINT_DIR: "${{outputs.checkpoints}}",
                   Env.REQUIREMENTS_CACHE: str(self.requirements_cache(spec))}
        line = "export " + " ".join(f'{k}="{v}"' for k, v in exports.items())
        if refs:
            line += f" {Env.REFS}={shlex.quote(json.dumps(refs, separators=(',', ':')))}"
        command_line = f'{line}; exec python3 "${{{{inputs.bundle}}}}/{protocol.ENTRY_FILE}"'
        env = {**cfg.environment, **settings.variables, Env.FLAVOR: "azureml", "PYTHONUNBUFFERED": "1"}
        runtime = self.max_runtime(spec)
        resources = JobResourceConfiguration(instance_count=settings.instance_count,
                                             instance_type=vm.name if vm is not None else None,
                                             shm_size=settings.shm_size)
        name = check_name(job_name(spec.identity))
        tags = {**cfg.tags, **settings.tags, **identity_tags(spec.identity)}
        if len(tags) > MAX_TAGS:
            raise StepOperatorConfigError(f"tags: the step operator's and the step's tags with the step's identity "
                                          f"make {len(tags)}; an Azure ML job takes at most {MAX_TAGS}")
        if compute and resolved:
            compute = f"{self.workspace_id}/computes/{compute}"
        job = command(
            name=name, display_name=(spec.task_label or name)[:MAX_DISPLAY_NAME], command=command_line,
            environment=environment, compute=compute, inputs=inputs, outputs=outputs, environment_variables=env,
            experiment_name=settings.experiment_name or cfg.experiment_name or experiment_name(spec.identity.dag_id),
            tags=tags,
            description=f"airflow-stepops step {spec.task_label or name} (try {spec.identity.try_number})",
            timeout=runtime,
            queue_settings=QueueSettings(job_tier=self._job_tier(spec)) if settings.job_tier else None,
        )
        job.resources = resources
        return job

    @staticmethod
    def _job_tier(spec: StepSpec) -> str | None:
        """queueSettings.jobTier of a serverless step: an on-demand attempt of a Spot step runs on the Standard tier,
        the tier of dedicated VMs (tiers Spot, Basic, Standard, Premium:
        https://learn.microsoft.com/en-us/python/api/azure-ai-ml/azure.ai.ml.entities.queuesettings)."""
        tier = settings_as(spec, AzureMLStepOperatorSettings).job_tier
        if tier == "Spot" and spec.on_demand:
            tier = "Standard"
        return tier.lower() if tier else None

    def validate(self, job: Any) -> None:
        """azure-ai-ml's own validation, as ``jobs.create_or_update`` runs it: the Command node's schema
        (marshmallow) and entity checks, then the CommandJob's (command and environment present)."""
        from azure.ai.ml.exceptions import ValidationException
        from marshmallow import ValidationError

        try:
            result = job._validate(raise_error=False)
            if result.passed:
                job._to_job()._validate()
        except (ValidationError, ValidationException) as exc:
            messages = getattr(exc, "messages", None) or str(exc)
            raise StepOperatorConfigError(f"the Azure ML command job is invalid: {messages}") from None
        if not result.passed:
            raise StepOperatorConfigError(f"the Azure ML command job is invalid: {result.error_messages}")

    def build_request(self, spec: StepSpec) -> Any:
        job = self.build_job(spec)
        self.validate(job)
        return job

    def render(self, spec: StepSpec) -> dict[str, Any]:
        from azure.ai.ml.entities._job.to_rest_functions import to_rest_job_object

        self.build_request(spec)
        job = self.build_job(spec, resolved=True)
        self.validate(job)
        body = to_rest_job_object(job).as_dict()
        return dict(json.loads(json.dumps(body, default=str)))

    def _compute_info(self, name: str) -> dict[str, Any]:
        """Size and tier of a compute target (looked up once per hook)."""
        cache: dict[str, dict[str, Any]] = self.__dict__.setdefault("_computes", {})
        if name not in cache:
            from azure.core.exceptions import ResourceNotFoundError

            try:
                found = self.ml_client.compute.get(name)
            except ResourceNotFoundError:
                raise StepOperatorConfigError(f"compute_target_name: workspace {self.config.workspace_name!r} has no "
                                              f"compute {name!r}; leave it empty for serverless compute") from None
            except Exception as exc:
                raise self._api_error(exc, f"read the compute {name!r}") from exc
            cache[name] = {"size": getattr(found, "size", None), "tier": getattr(found, "tier", None),
                           "type": getattr(found, "type", None)}
        return cache[name]

    def _check_compute(self, spec: StepSpec) -> dict[str, Any]:
        """On a compute target: it exists, and its VM size (when the table knows it) has the resources."""
        from airflow_stepops.settings.azureml_vms import VM_SIZES, fits

        compute = self.compute_target(spec)
        if not compute:
            return {}
        info = self._compute_info(compute)
        vm = VM_SIZES.get(str(info.get("size") or "").lower())
        if vm is not None and not spec.resources.empty and not fits(vm, spec.resources):
            raise StepOperatorConfigError(
                f"compute_target_name: {compute!r} runs on {vm.describe()}, which does not have the resources the "
                f"step asks for ({spec.resources.model_dump(exclude_none=True)}); choose another compute target, "
                "or compute_target_name=\"\" to let the step operator choose a serverless VM size")
        return info

    # ---- lifecycle ----------------------------------------------------------------------------
    def _handle(self, job: Any, output_uri: str, try_number: int, spot: bool | None = None) -> JobHandle:
        resources = getattr(job, "resources", None)
        instance_type = getattr(resources, "instance_type", None) if resources is not None else None
        tier = getattr(getattr(job, "queue_settings", None), "job_tier", None)
        tier = str(tier).capitalize() if tier else None
        services = getattr(job, "services", None) or {}
        studio = services.get("Studio") if isinstance(services, dict) else None
        studio_url = getattr(studio, "endpoint", None) or (studio.get("endpoint") if isinstance(studio, dict) else None)
        compute = getattr(job, "compute", None)
        return {"flavor": "azureml", "job_id": job.name, "output_uri": output_uri,
                "conn_id": self.step_operator_conn_id, "try_number": try_number,
                "spot": bool(spot) if spot is not None else tier == "Spot", "job_tier": tier,
                "instance_type": instance_type, "compute": str(compute).rsplit("/", 1)[-1] if compute else None,
                "studio_url": studio_url or getattr(job, "studio_url", None)}

    def _get(self, name: str) -> Any:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            return self.ml_client.jobs.get(name)
        except ResourceNotFoundError:
            return None
        except Exception as exc:
            raise self._api_error(exc, f"get the job {name}") from exc

    def find_job(self, identity: StepIdentity) -> JobHandle | None:
        """Job names are ours to choose: the step try's job is got by its name, and its tag confirms it."""
        name = job_name(identity)
        job = self._get(name)
        if job is None:
            return None
        tag = (job.tags or {}).get(STEP_TAG)
        if tag != identity.digest[:40]:
            raise StepOperatorConfigError(
                f"Azure ML job {name} exists but belongs to another step ({STEP_TAG}={tag!r}, expected "
                f"{identity.digest[:40]!r}); it was not created by this step try, so it is not re-attached")
        compute = getattr(job, "compute", None)
        spot = None
        if compute:
            spot = str(self._compute_info(str(compute).rsplit("/", 1)[-1]).get("tier") or "") == "low_priority"
        handle = self._handle(job, str(identity.prefix(self.artifact_root()) / "output"), identity.try_number,
                              spot=spot or None)
        return handle

    def submit(self, spec: StepSpec) -> JobHandle:
        job = self.prepare(spec)
        self._check_datastore()
        info = self._check_compute(spec)
        stage(spec.bundle_uri, {int(index): spec.refs[int(index)] for index in self._refs(spec)[1]})
        try:
            created = self.ml_client.jobs.create_or_update(job)
        except Exception as exc:
            # The job may exist although the create failed: its reply was lost after Azure ML made it (retries
            # spent), or another worker of this try made it first ("already exists"). Its name tells, and its tag
            # confirms it is this try's: re-attach rather than fail or make a second job.
            existing = self.find_job(spec.identity)
            if existing is not None:
                self.log.info("Azure ML job %s exists although its create failed (%s): re-attaching",
                              existing["job_id"], type(exc).__name__)
                existing["on_demand"] = spec.on_demand
                return with_queue_limit(existing, spec)
            if _error_codes(exc) & QUOTA_CODES:
                raise StepCapacityError(f"{self._api_error(exc, 'create the command job')} (quota exceeded)",
                                        reason="quota_exceeded") from exc
            raise self._api_error(exc, "create the command job") from exc
        low_priority = str(info.get("tier") or "") == "low_priority"
        handle = self._handle(created, spec.output_uri, spec.identity.try_number,
                              spot=True if low_priority else None)
        handle["on_demand"] = spec.on_demand
        self.log.info("Created Azure ML command job %s (%s%s)", created.name,
                      handle["instance_type"] or f"compute {handle['compute']}",
                      ", Spot tier" if handle["job_tier"] == "Spot" else ", low priority" if low_priority else
                      ", on-demand" if spec.on_demand else "")
        return with_queue_limit(handle, spec)

    def get_status(self, handle: JobHandle) -> JobStatus:
        job = self._get(handle["job_id"])
        if job is None:
            return job_state(None, None, handle, {})
        status = str(getattr(job.status, "value", job.status))
        run_error, details = None, {}
        if status in ("Completed", "Failed", "Canceled"):  # why and when it ended: run history (errors heal)
            run = self.ml_client.jobs._runs_operations.get_run(handle["job_id"])
            run_error = getattr(run, "error", None)
            details = {"started_at": epoch(getattr(run, "start_time_utc", None)),
                       "finished_at": epoch(getattr(run, "end_time_utc", None))}
        timeout = getattr(getattr(job, "limits", None), "timeout", None)
        return job_state(status, run_error, handle, details, float(timeout) if timeout else None)

    def cancel(self, handle: JobHandle) -> None:
        from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

        try:
            self.ml_client.jobs.begin_cancel(handle["job_id"])
            self.log.info("Cancelling Azure ML job %s", handle["job_id"])
        except ResourceNotFoundError:
            pass
        except HttpResponseError as exc:  # already finished
            self.log.info("Azure ML job %s not cancelled: %s", handle["job_id"], str(exc).splitlines()[0])

    def read_logs(self, handle: JobHandle, cursor: Any) -> tuple[list[str], Any]:
        from airflow_stepops.hooks.azureml_logs import ENDED, log_url, read_range, take

        cursor = dict(cursor or {})
        details = self.ml_client.jobs._runs_operations.get_run_details(handle["job_id"])  # fresh SAS URL too
        url = log_url(getattr(details, "log_files", None))
        if url is None:  # no output yet
            return [], cursor
        data = read_range(self._http, url, cursor, self.config.api_timeout_seconds)
        return take(data, cursor, str(getattr(details, "status", "")) in ENDED)

    @cached_property
    def _http(self) -> Any:
        """Reads of the log blob, retried like the SDK's calls (the request itself has the timeout)."""
        import requests
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        session = requests.Session()
        retry = Retry(total=self.config.api_max_attempts - 1, backoff_factor=0.5, status_forcelist=(429, 500, 502, 503, 504),
                      allowed_methods=("GET",), raise_on_status=False)
        session.mount("https://", HTTPAdapter(max_retries=retry))
        session.mount("http://", HTTPAdapter(max_retries=retry))
        return session

    def cost_url(self, handle: JobHandle) -> str | None:
        cfg = self.config
        return (f"https://portal.azure.com/#@/resource/subscriptions/{cfg.subscription_id}/resourceGroups/"
                f"{cfg.resource_group}/costanalysis")

    def console_url(self, handle: JobHandle) -> str | None:
        cfg = self.config
        fields = {"job_name": handle["job_id"], "subscription_id": cfg.subscription_id,
                  "resource_group": cfg.resource_group, "workspace_name": cfg.workspace_name}
        if cfg.console_url_template:
            return cfg.console_url_template.format(**fields)
        if handle.get("studio_url"):
            return str(handle["studio_url"])
        return ("https://ml.azure.com/runs/{job_name}?wsid=/subscriptions/{subscription_id}/resourcegroups/"
                "{resource_group}/workspaces/{workspace_name}").format(**fields)



#: Codes of a create refused for the subscription's core quota: "Job submission to AzureML Compute encountered an
#: Exception with status code JobNodeCountExceedsCoreQuota, The specified subscription has a Standard DSv2 family
#: vCPU quota of 2 ..." (github.com/MicrosoftLearning/mslearn-dp100/issues/35). A job that merely finds no free
#: nodes is not refused: it stays Queued (github.com/dotnet/machinelearning-modelbuilder/issues/546), which
#: max_queue_seconds bounds.
QUOTA_CODES = frozenset({"JobNodeCountExceedsCoreQuota"})


def _error_codes(exc: Exception) -> set[str]:
    """Every code of an ARM error answer (root, ``innerError`` chain, ``details``), never its message."""
    response = getattr(exc, "response", None)
    try:
        body = response.json() if response is not None else None
    except Exception:
        body = None
    return _error_of(body)[0] if isinstance(body, dict) else set()
