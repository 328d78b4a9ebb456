"""The ``sagemaker`` flavor: each step try is one SageMaker Training Job.

Credentials come from the amazon provider's ``AwsBaseHook`` (an ``aws`` connection, default
``aws_default``); boto3 on workers, aiobotocore in the triggerer, both imported inside methods. The
bundle reaches the container as the ``bundle`` input channel (S3 prefix), input artifacts in S3 as
channels of their own, and the output comes back through the job's model artifact
(``/opt/ml/model`` -> ``model.tar.gz``), which the hook unpacks into the step's output prefix; a failed
step's error record comes back in ``FailureReason`` (see ``runtime/entry.py``). The container runs with
the job's IAM role; no credentials of ours are put in the request.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import math
import re
import tarfile
import zlib
from functools import cached_property
from typing import Any, ClassVar

from airflow_stepops.artifacts import store_path
from airflow_stepops.bundle import StepIdentity, stage
from airflow_stepops.exceptions import StepCapacityError, StepOperatorConfigError
from airflow_stepops.hooks.base import (
    JobHandle,
    JobState,
    JobStatus,
    StepOperatorHook,
    StepSpec,
    capacity_failure,
    settings_as,
    with_queue_limit,
)
from airflow_stepops.prices import Price, machine_price
from airflow_stepops.runtime import protocol
from airflow_stepops.runtime.protocol import Env
from airflow_stepops.settings.sagemaker import (
    MAX_ENV_CHARS,
    MAX_ENV_VARS,
    MAX_TAGS,
    SageMakerStepOperatorConfig,
    SageMakerStepOperatorSettings,
    check_instance_type,
)
from airflow_stepops.timestamps import epoch

ML = "/opt/ml"
BUNDLE = f"{ML}/input/data/bundle"
WARM_POOL_CACHE = f"{ML}/sagemaker/warmpoolcache"
DEFAULT_VOLUME_GB = 30
DEFAULT_MAX_RUNTIME = 86400
LOG_GROUP = "/aws/sagemaker/TrainingJobs"
MAX_CHANNELS = 20
TAG_PREFIX = "stepops:"
#: seconds of ListTrainingJobs overlap before the newest modification seen (clock and ordering slack)
LIST_OVERLAP_SECONDS = 30
MAX_LIST_PAGES = 10
#: secondary statuses that mean the capacity went away, not that the step failed
PREEMPTION_STATUSES = ("Interrupted",)
#: FailureReason classes of a job SageMaker could not get instances for ("CapacityError: Unable to provision
#: requested ML compute capacity. Please retry using a different ML instance type.")
CAPACITY_ERROR_CLASSES = ("CapacityError:", "InsufficientCapacityError:")
#: StoppingCondition.MaxPendingTimeInSeconds: min 1800, max 2419200 in botocore's SageMaker service model
#: (https://docs.aws.amazon.com/sagemaker/latest/APIReference/API_StoppingCondition.html)
MAX_PENDING_RANGE = (1800, 2419200)
#: how much earlier than the newest event read a log event may be stamped and still be shown: events
#: reach CloudWatch Logs late and FilterLogEvents sorts by event timestamp, so every read looks back
#: this far and drops the event ids it has shown
LATE_LOG_MS = 120_000
MAX_LOG_PAGES = 20


def job_name(identity: StepIdentity) -> str:
    return identity.job_name(max_length=63, allowed=r"[^a-z0-9-]")


def _tag_value(text: str) -> str:
    """``text`` if SageMaker accepts it as a tag value, else its allowed characters and a short hash
    (run ids may hold ``~``, which the TagValue pattern refuses)."""
    shape = _sagemaker_model().shape_for("TagValue")
    if len(text) <= shape.metadata["max"] and _pattern(shape.metadata["pattern"]).fullmatch(text):
        return text
    allowed = _pattern(shape.metadata["pattern"])
    safe = "".join(c if allowed.fullmatch(c) else "_" for c in text)
    return f"{safe[:shape.metadata['max'] - 9]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def _identity_tags(identity: StepIdentity) -> dict[str, str]:
    return {f"{TAG_PREFIX}dag-id": _tag_value(identity.dag_id), f"{TAG_PREFIX}run-id": _tag_value(identity.run_id),
            f"{TAG_PREFIX}task-id": _tag_value(identity.task_id), f"{TAG_PREFIX}map-index": str(identity.map_index),
            f"{TAG_PREFIX}try-number": str(identity.try_number), f"{TAG_PREFIX}step": identity.digest[:40]}


def _s3_prefix(uri: str) -> str:
    return uri.rstrip("/") + "/"


class SageMakerStepOperatorHook(StepOperatorHook):
    """Runs steps as SageMaker Training Jobs."""

    flavor: ClassVar[str] = "sagemaker"
    #: "SageMaker sends the algorithm the SIGTERM signal, which delays job termination for 120 seconds", on a stop and
    #: at MaxRuntimeInSeconds alike (https://docs.aws.amazon.com/sagemaker/latest/APIReference/API_StopTrainingJob.html,
    #: API_StoppingCondition.html)
    stop_billing_seconds: ClassVar[int] = 120
    default_poll_interval: ClassVar[float] = 15.0
    min_poll_interval: ClassVar[float] = 2.0

    config: SageMakerStepOperatorConfig  # type: ignore[assignment]

    # ---- clients ------------------------------------------------------------------------------
    def _aws_hook(self, client_type: str) -> Any:
        return _aws_hook_class()(aws_conn_id=self.config.aws_conn_id, client_type=client_type,
                                 region_name=self.config.region_name, api_config=self._botocore_config,
                                 resolved=self._aws_conn_resolved)

    @cached_property
    def _aws_conn_resolved(self) -> dict[str, str | None]:
        """The aws connection id once looked up, shared by this step operator's clients (filled by the first)."""
        return {}

    @cached_property
    def _botocore_config(self) -> Any:
        """Timeouts and bounded retries on every call, so a lost reply cannot hang a worker or the
        triggerer. botocore's defaults are 60 s per read and legacy retries; "standard" mode retries
        timeouts and throttling with backoff
        (https://docs.aws.amazon.com/sdkref/latest/guide/feature-retry-behavior.html)."""
        from botocore.config import Config

        return Config(connect_timeout=min(10.0, self.config.api_timeout_seconds),
                      read_timeout=self.config.api_timeout_seconds,
                      retries={"mode": "standard", "total_max_attempts": self.config.api_max_attempts})

    @cached_property
    def sagemaker(self) -> Any:
        from botocore.exceptions import NoRegionError

        try:
            return self._aws_hook("sagemaker").conn
        except NoRegionError:
            raise StepOperatorConfigError(
                f"region_name: step operator {self.step_operator_conn_id!r} has no AWS region; set region_name in "
                f"its extras or in the aws connection {self.config.aws_conn_id!r}") from None

    @cached_property
    def region(self) -> str:
        return str(self.config.region_name or self.sagemaker.meta.region_name)

    def artifact_root(self) -> Any:
        if not self.config.artifact_store:
            raise StepOperatorConfigError(
                f"artifact_store: step operator {self.step_operator_conn_id!r} needs an s3:// artifact store for "
                "bundles and results (SageMaker reads its inputs from S3)")
        return store_path(self.config.artifact_store)

    # ---- the request --------------------------------------------------------------------------
    def default_image(self, spec: StepSpec) -> str:
        """The PyTorch training Deep Learning Container of the workers' Python (SageMaker pulls only from ECR)."""
        from airflow_stepops.images import sagemaker_image
        from airflow_stepops.settings.sagemaker_instances import INSTANCE_TYPES

        machine = INSTANCE_TYPES.get(self.instance_type(spec))
        try:
            return sagemaker_image(self.region, gpu=bool(machine and machine.gpus))
        except ValueError as exc:
            raise StepOperatorConfigError(str(exc)) from None

    def requirements_cache(self, spec: StepSpec) -> str | None:
        """SageMaker keeps a directory between the jobs of a warm pool (``keep_alive_period_in_seconds``): "The
        location of the persistent cache is /opt/ml/sagemaker/warmpoolcache"
        (https://docs.aws.amazon.com/sagemaker/latest/dg/train-warm-pools.html); nothing without one."""
        if settings_as(spec, SageMakerStepOperatorSettings).keep_alive_period_in_seconds:
            return f"{WARM_POOL_CACHE}/stepops-requirements"
        return None

    def instance_type(self, spec: StepSpec) -> str:
        """The step's ``instance_type``; else the operator's default when it has what ResourceSettings ask
        for; else the cheapest type of the table that has it."""
        from airflow_stepops.settings.sagemaker_instances import INSTANCE_TYPES, choose_instance, fits

        settings, default = settings_as(spec, SageMakerStepOperatorSettings), self.config.instance_type
        try:
            if settings.instance_type:
                check_instance_type(settings.instance_type, "instance_type", against_api=True)
                known = INSTANCE_TYPES.get(settings.instance_type)
                if known is not None and not fits(known, spec.resources):
                    raise ValueError(f"instance_type: {known.describe()} does not have the resources the step asks "
                                     f"for ({spec.resources.model_dump(exclude_none=True)})")
                return settings.instance_type
            if default and (spec.resources.empty or (default in INSTANCE_TYPES
                                                     and fits(INSTANCE_TYPES[default], spec.resources))):
                check_instance_type(default, "instance_type", against_api=True)
                return default
            picked = choose_instance(spec.resources)
        except ValueError as exc:
            raise StepOperatorConfigError(str(exc)) from None
        self.log.info("Instance type for %s: %s, the cheapest that fits the step's resources",
                      spec.task_label or job_name(spec.identity), picked.describe())
        return picked.name

    def _channels_and_refs(self, spec: StepSpec) -> tuple[list[dict[str, Any]], protocol.Refs]:
        settings = settings_as(spec, SageMakerStepOperatorSettings)
        channels = [_channel("bundle", _s3_prefix(spec.bundle_uri))]
        refs: protocol.Refs = {}
        free = MAX_CHANNELS - 1 - len(settings.input_channels)
        for index, ref in enumerate(spec.refs):
            if ref.uri.startswith("s3://") and free > 0:
                channels.append(_channel(f"ref{index}", ref.uri))
                refs[str(index)] = {"path": f"{ML}/input/data/ref{index}/{ref.uri.rsplit('/', 1)[-1]}"}
                free -= 1
            else:  # not in S3, or channels used up: staged into the bundle
                refs[str(index)] = {"path": f"{BUNDLE}/{protocol.staged_ref(index)}"}
        channels += [_channel(name, _s3_prefix(uri)) for name, uri in sorted(settings.input_channels.items())]
        return channels, refs

    def build_request(self, spec: StepSpec) -> dict[str, Any]:
        settings = settings_as(spec, SageMakerStepOperatorSettings)
        cfg = self.config
        channels, refs = self._channels_and_refs(spec)
        prefix = spec.output_uri.rsplit("/", 1)[0]
        runtime = self.max_runtime(spec)
        stopping: dict[str, Any] = {"MaxRuntimeInSeconds": runtime}
        if spec.max_queue_seconds is not None and MAX_PENDING_RANGE[0] <= spec.max_queue_seconds <= MAX_PENDING_RANGE[1]:
            # SageMaker's own queue limit where the value is one it allows; otherwise the trigger enforces it
            stopping["MaxPendingTimeInSeconds"] = math.ceil(spec.max_queue_seconds)
        # on-demand: no managed spot, and no MaxWaitTimeInSeconds (it is only valid with managed spot training:
        # https://docs.aws.amazon.com/sagemaker/latest/APIReference/API_StoppingCondition.html)
        spot = self.spot(spec) and not spec.on_demand
        if spot:
            stopping["MaxWaitTimeInSeconds"] = max(settings.max_wait_time_in_seconds or 2 * runtime, runtime)
        volume = settings.volume_size_in_gb or (math.ceil(spec.resources.disk_bytes / 10**9)
                                                if spec.resources.disk_bytes else DEFAULT_VOLUME_GB)
        resource_config: dict[str, Any] = {"InstanceType": self.instance_type(spec),
                                           "InstanceCount": settings.instance_count, "VolumeSizeInGB": volume}
        if settings.keep_alive_period_in_seconds is not None:
            resource_config["KeepAlivePeriodInSeconds"] = settings.keep_alive_period_in_seconds
        if cfg.kms_key_id:
            resource_config["VolumeKmsKeyId"] = cfg.kms_key_id
        env = {**cfg.environment, **settings.environment, Env.FLAVOR: "sagemaker", "PYTHONUNBUFFERED": "1",
               Env.BUNDLE_PATH: BUNDLE, Env.OUTPUT_PATH: f"{ML}/model", Env.FAILURE_FILE: f"{ML}/output/failure",
               # where a step keeps state that must survive a spot interruption (synced to S3 by SageMaker)
               Env.CHECKPOINT_DIR: f"{ML}/checkpoints"}
        cache = self.requirements_cache(spec)
        if cache:
            env[Env.REQUIREMENTS_CACHE] = cache
        refs_json = json.dumps(refs)
        if len(refs_json) <= MAX_ENV_CHARS:
            env[Env.REFS] = refs_json
        else:
            env[Env.REFS_FILE] = f"{BUNDLE}/{protocol.REFS_FILE}"
        if len(env) > MAX_ENV_VARS:
            raise StepOperatorConfigError(f"environment: SageMaker allows {MAX_ENV_VARS} variables, this step has "
                                          f"{len(env)}")
        identity = _identity_tags(spec.identity)
        tags = {**cfg.tags, **settings.tags, **identity}
        if len(tags) > MAX_TAGS:
            raise StepOperatorConfigError(
                f"tags: SageMaker allows {MAX_TAGS} tags a job and {len(identity)} are the step's identity; the "
                f"step operator's and the step's tags together are {len(tags) - len(identity)}")
        output: dict[str, Any] = {"S3OutputPath": f"{prefix}/sagemaker"}
        if cfg.kms_key_id:
            output["KmsKeyId"] = cfg.kms_key_id
        request: dict[str, Any] = {
            "TrainingJobName": job_name(spec.identity),
            "RoleArn": cfg.role,
            "AlgorithmSpecification": {
                "TrainingImage": self.image(spec), "TrainingInputMode": "File",
                "ContainerEntrypoint": ["python3", f"{BUNDLE}/{protocol.ENTRY_FILE}"],
            },
            "InputDataConfig": channels,
            "OutputDataConfig": output,
            "ResourceConfig": resource_config,
            "StoppingCondition": stopping,
            "EnableManagedSpotTraining": spot,
            "CheckpointConfig": {"S3Uri": f"{prefix.rsplit('/', 1)[0]}/checkpoints", "LocalPath": f"{ML}/checkpoints"},
            "Environment": env,
            "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
            **settings.training_job_overrides,
        }
        if cfg.subnets:
            request["VpcConfig"] = {"Subnets": list(cfg.subnets), "SecurityGroupIds": list(cfg.security_group_ids)}
        validate_request(request)
        return request

    def spot(self, spec: StepSpec) -> bool:
        return settings_as(spec, SageMakerStepOperatorSettings).use_spot_instances

    def max_runtime(self, spec: StepSpec) -> int:
        return spec.backstop(settings_as(spec, SageMakerStepOperatorSettings).max_runtime_in_seconds
                             or DEFAULT_MAX_RUNTIME) or DEFAULT_MAX_RUNTIME

    def price(self, spec: StepSpec) -> Price:
        """The instance type's on-demand rate, spot or not: managed spot training bills that rate for
        ``BillableTimeInSeconds`` per instance, which leaves out the interrupted and waiting time ("Multiply
        BillableTimeInSeconds by the number of instances (InstanceCount)", savings "(1 - BillableTimeInSeconds /
        TrainingTimeInSeconds) * 100": https://docs.aws.amazon.com/sagemaker/latest/APIReference/
        API_DescribeTrainingJob.html)."""
        from airflow_stepops.settings.sagemaker_instances import INSTANCE_TYPES, PRICES

        name = self.instance_type(spec)
        spot = self.spot(spec) and not spec.on_demand
        return machine_price(PRICES, INSTANCE_TYPES.get(name), name, spot=spot, prices=self.prices(),
                             count=settings_as(spec, SageMakerStepOperatorSettings).instance_count,
                             spot_billing=" (billed at the on-demand rate for BillableTimeInSeconds)" if spot else "")

    # ---- lifecycle ----------------------------------------------------------------------------
    def _handle(self, name: str, output_uri: str, try_number: int, spot: bool, instance_type: str) -> JobHandle:
        return {"flavor": "sagemaker", "job_id": name, "region": self.region, "output_uri": output_uri,
                "conn_id": self.step_operator_conn_id, "try_number": try_number, "spot": spot,
                "instance_type": instance_type}

    def _describe(self, name: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            return dict(self.sagemaker.describe_training_job(TrainingJobName=name))
        except ClientError as exc:
            if _not_found(exc):
                return None
            raise self._client_error(exc, f"describe training job {name}") or exc

    def _client_error(self, exc: Any, action: str) -> StepOperatorConfigError | None:
        code = exc.response.get("Error", {}).get("Code", "")
        message = exc.response.get("Error", {}).get("Message", "")
        if code == "ResourceLimitExceeded":
            # the account's service quota for the instance type ("The account-level service limit 'ml.p3.2xlarge for
            # training job usage' is 0 Instances", aws/sagemaker-python-sdk#35; the error is listed for
            # CreateTrainingJob: https://docs.aws.amazon.com/sagemaker/latest/APIReference/API_CreateTrainingJob.html)
            return StepCapacityError(f"SageMaker refused to {action}: quota exceeded: {code}: {message}",
                                     reason="quota_exceeded")
        if code in ("AccessDeniedException", "UnrecognizedClientException", "InvalidSignatureException",
                    "ExpiredTokenException", "ValidationException"):
            return StepOperatorConfigError(f"SageMaker refused to {action} ({self.config.credentials_source()}): "
                                           f"{code}: {message}")
        return None

    def find_job(self, identity: StepIdentity) -> JobHandle | None:
        job = self._describe(job_name(identity))
        if job is None:
            return None
        step = {t["Key"]: t["Value"] for t in self._tags(job)}.get(f"{TAG_PREFIX}step")
        if step != identity.digest[:40]:
            raise StepOperatorConfigError(f"training job {job['TrainingJobName']} exists but was not created for "
                                          f"this step try (its {TAG_PREFIX}step tag is {step!r})")
        prefix = identity.prefix(self.artifact_root())
        return self._handle(job["TrainingJobName"], str(prefix / "output"), identity.try_number,
                            bool(job.get("EnableManagedSpotTraining")),
                            str((job.get("ResourceConfig") or {}).get("InstanceType")))

    def _tags(self, job: dict[str, Any]) -> list[dict[str, str]]:
        """Every tag of the job; an error is raised, never taken for "no tags" (that would skip the
        identity check)."""
        from botocore.exceptions import ClientError

        try:
            pages = self.sagemaker.get_paginator("list_tags").paginate(ResourceArn=job["TrainingJobArn"])
            return [tag for page in pages for tag in page.get("Tags", [])]
        except ClientError as exc:
            raise self._client_error(exc, f"list the tags of training job {job['TrainingJobName']}") or exc

    def submit(self, spec: StepSpec) -> JobHandle:
        from botocore.exceptions import ClientError

        request = self.prepare(spec)
        _, refs = self._channels_and_refs(spec)  # inputs not in S3 channels are staged into the bundle
        stage(spec.bundle_uri, {i: ref for i, ref in enumerate(spec.refs) if refs[str(i)]["path"].startswith(BUNDLE)},
              refs if Env.REFS_FILE in request["Environment"] else None)
        try:
            self.sagemaker.create_training_job(**request)
        except Exception as exc:
            # a reply lost after SageMaker created the job (a timeout, or a retry answered ResourceInUse):
            # the job is known by its deterministic name and must carry this try's identity tags
            existing = self.find_job(spec.identity)
            if existing is None:
                raise (self._client_error(exc, "create the training job") if isinstance(exc, ClientError)
                       else None) or exc
            self.log.info("Training job %s already exists (%s): re-attaching", request["TrainingJobName"],
                          type(exc).__name__)
            existing["on_demand"] = spec.on_demand
            return with_queue_limit(existing, spec)
        self.log.info("Created SageMaker training job %s (%s x %s%s)", request["TrainingJobName"],
                      request["ResourceConfig"]["InstanceCount"], request["ResourceConfig"]["InstanceType"],
                      ", spot" if request["EnableManagedSpotTraining"] else "")
        handle = self._handle(request["TrainingJobName"], spec.output_uri, spec.identity.try_number,
                              request["EnableManagedSpotTraining"], request["ResourceConfig"]["InstanceType"])
        handle["on_demand"] = spec.on_demand
        return with_queue_limit(handle, spec)

    def get_status(self, handle: JobHandle) -> JobStatus:
        return job_status(self._describe(handle["job_id"]), handle)

    def cancel(self, handle: JobHandle) -> None:
        from botocore.exceptions import ClientError

        try:
            self.sagemaker.stop_training_job(TrainingJobName=handle["job_id"])
            self.log.info("Stopping SageMaker training job %s", handle["job_id"])
        except ClientError as exc:
            if not _not_found(exc) and exc.response.get("Error", {}).get("Code") != "ValidationException":
                raise

    def collect_output(self, handle: JobHandle) -> None:
        """Unpack the job's model.tar.gz (the container's /opt/ml/model) into the step's output, or the
        error record a failed step left in FailureReason."""
        output = store_path(handle["output_uri"])
        if any((output / name).exists() for name in protocol.OUTCOME_FILES):
            return
        job = self._describe(handle["job_id"])
        model = ((job or {}).get("ModelArtifacts") or {}).get("S3ModelArtifacts")
        if not model:
            error = failure_record((job or {}).get("FailureReason") or "")
            if error is not None and (job or {}).get("TrainingJobStatus") == "Failed":
                (output / protocol.ERROR_FILE).write_text(json.dumps(error))
            return
        archive = store_path(model).read_bytes()
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile() and "/" not in m.name.lstrip("./")),
                             key=lambda m: m.name.lstrip("./") in protocol.OUTCOME_FILES)
            for member in members:
                source = tar.extractfile(member)
                assert source is not None
                (output / member.name.lstrip("./")).write_bytes(source.read())

    def console_url(self, handle: JobHandle) -> str | None:
        return self.config.console_region_url.format(region=handle.get("region") or self.region,
                                                     name=handle["job_id"])

    def cost_url(self, handle: JobHandle) -> str | None:
        return "https://console.aws.amazon.com/cost-management/home#/cost-explorer"

    # ---- async (triggerer) --------------------------------------------------------------------
    async def aget_statuses(self, handles: list[JobHandle]) -> list[JobStatus | BaseException]:
        """SageMaker has no batch describe: one ``ListTrainingJobs`` of the jobs modified since the last
        round tells which steps changed, and only those are described again, so a round costs one
        call (plus one per changed job) whatever the number of waiting steps."""
        import asyncio
        from datetime import timedelta

        cache: dict[str, JobStatus] = self.__dict__.setdefault("_status_cache", {})
        modified: dict[str, Any] = self.__dict__.setdefault("_modified_at", {})  # job -> LastModifiedTime seen
        hook = self._aws_hook("sagemaker")
        async with await hook.get_async_conn() as client:
            changed: set[str] | None = None
            since = self.__dict__.get("_modified_since")
            if since is not None:
                changed = set()
                kwargs: dict[str, Any] = {"LastModifiedTimeAfter": since - timedelta(seconds=LIST_OVERLAP_SECONDS),
                                          "MaxResults": 100}
                for _ in range(MAX_LIST_PAGES):
                    page = await client.list_training_jobs(**kwargs)
                    for summary in page.get("TrainingJobSummaries", []):
                        name, when = summary["TrainingJobName"], summary["LastModifiedTime"]
                        known = cache.get(name)
                        if name not in modified or when > modified[name] or known is None or \
                                summary.get("SecondaryStatus") != known.details.get("secondary_status"):
                            changed.add(name)
                        since = max(since, when)
                    if not page.get("NextToken"):
                        break
                    kwargs["NextToken"] = page["NextToken"]
                else:
                    changed = None  # too many changes to page through: describe everything

            async def one(handle: JobHandle) -> JobStatus:
                from botocore.exceptions import ClientError

                try:
                    job = await client.describe_training_job(TrainingJobName=handle["job_id"])
                except ClientError as exc:
                    if _not_found(exc):
                        return job_status(None, handle)
                    raise self._client_error(exc, f"describe training job {handle['job_id']}") or exc
                nonlocal since
                if job.get("LastModifiedTime") is not None:
                    modified[handle["job_id"]] = job["LastModifiedTime"]
                    since = job["LastModifiedTime"] if since is None else max(since, job["LastModifiedTime"])
                return job_status(dict(job), handle)

            stale = [h for h in handles if changed is None or h["job_id"] in changed or h["job_id"] not in cache]
            fresh = dict(zip((h["job_id"] for h in stale),
                             await asyncio.gather(*(one(h) for h in stale), return_exceptions=True)))
        self.__dict__["_modified_since"] = since
        wanted = {h["job_id"] for h in handles}
        for name in list(cache):
            if name not in wanted:
                del cache[name]
                modified.pop(name, None)
        out: list[JobStatus | BaseException] = []
        for handle in handles:
            result = fresh.get(handle["job_id"], cache.get(handle["job_id"]))
            if isinstance(result, JobStatus):
                cache[handle["job_id"]] = result
            out.append(result if result is not None else RuntimeError(f"no status for {handle['job_id']}"))
        return out

    async def acancel(self, handle: JobHandle) -> None:
        from botocore.exceptions import ClientError

        async with await self._aws_hook("sagemaker").get_async_conn() as client:
            try:
                await client.stop_training_job(TrainingJobName=handle["job_id"])
                self.log.info("Stopping SageMaker training job %s", handle["job_id"])
            except ClientError as exc:
                if not _not_found(exc) and exc.response.get("Error", {}).get("Code") != "ValidationException":
                    raise

    async def aread_logs(self, handle: JobHandle, cursor: Any) -> tuple[list[str], Any]:
        from botocore.exceptions import ClientError

        request = _log_request(handle, cursor)
        events: list[dict[str, Any]] = []
        async with await self._aws_hook("logs").get_async_conn() as logs:
            try:
                for _ in range(MAX_LOG_PAGES):
                    page = await logs.filter_log_events(**request)
                    events += page.get("events", [])
                    if not page.get("nextToken"):
                        break
                    request["nextToken"] = page["nextToken"]
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "ResourceNotFoundException":  # no log group yet
                    raise
        return _new_lines(events, cursor)


@functools.cache
def _aws_hook_class() -> type:
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

    class StepOpsAwsHook(AwsBaseHook):
        """``AwsBaseHook`` whose clients get the step operator's timeouts and retries under the options
        the aws connection sets itself (``config_kwargs``), merged when a client is made: the connection
        is then read where clients are made (a worker thread for aiobotocore), not on the event loop."""

        def __init__(self, *args: Any, api_config: Any, resolved: dict[str, str | None], **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.api_config = api_config
            self.resolved = resolved

        @property
        def config(self) -> Any:
            return self.api_config.merge(super().config)

        @cached_property
        def conn_config(self) -> Any:
            """The connection looked up once per step operator, and only when it exists: AwsBaseHook warns
            "Unable to find AWS Connection ID" for every client made without it."""
            if "aws_conn_id" not in self.resolved:
                self.resolved["aws_conn_id"] = _existing_aws_conn(self.aws_conn_id)
            self.aws_conn_id = self.resolved["aws_conn_id"]
            return super().conn_config

    return StepOpsAwsHook


_ANNOUNCED: set[str] = set()


def _existing_aws_conn(conn_id: str | None) -> str | None:
    """``conn_id`` if that connection exists; else None, which makes AwsBaseHook use boto3's default
    credential chain (said once per process, at info level)."""
    from airflow_stepops._compat import AirflowNotFoundException
    from airflow_stepops.connections import get_connection

    if not conn_id:
        return None
    try:
        get_connection(conn_id)
    except AirflowNotFoundException:
        if conn_id not in _ANNOUNCED:
            _ANNOUNCED.add(conn_id)
            import logging

            logging.getLogger(__name__).info(
                "No aws connection %r: SageMaker and S3 calls use the default AWS credential chain "
                "(environment, ~/.aws, instance role)", conn_id)
        return None
    return conn_id


def _log_request(handle: JobHandle, cursor: Any) -> dict[str, Any]:
    """FilterLogEvents of all the job's streams (one per instance and spot restart) from ``LATE_LOG_MS``
    before the newest event shown. Its events are "sorted by event timestamp, the timestamp when the
    event was ingested by CloudWatch Logs, and the ID of the PutLogEvents request"
    (https://docs.aws.amazon.com/AmazonCloudWatchLogs/latest/APIReference/API_FilterLogEvents.html), so
    an event ingested late sorts before events already shown: neither a resumed token nor the newest
    timestamp would ever reach it."""
    newest = int((cursor or {}).get("newest", 0)) if isinstance(cursor, dict) else 0
    return {"logGroupName": LOG_GROUP, "logStreamNamePrefix": handle["job_id"] + "/",
            "startTime": max(0, newest - LATE_LOG_MS)}


def _new_lines(events: list[dict[str, Any]], cursor: Any) -> tuple[list[str], dict[str, Any]]:
    """The messages of ``events`` not shown before (by ``eventId``, unique per event:
    https://docs.aws.amazon.com/AmazonCloudWatchLogs/latest/APIReference/API_FilteredLogEvent.html),
    and the cursor: the newest timestamp and the ids shown within ``LATE_LOG_MS`` of it."""
    cursor = cursor if isinstance(cursor, dict) and "seen" in cursor else {"newest": 0, "seen": {}}
    seen: dict[str, int] = dict(cursor["seen"])
    fresh = sorted((e for e in events if e["eventId"] not in seen),
                   key=lambda e: (e["timestamp"], e.get("ingestionTime", 0)))
    seen.update((e["eventId"], e["timestamp"]) for e in fresh)
    newest = max([cursor["newest"], *seen.values()])
    seen = {k: t for k, t in seen.items() if t >= newest - LATE_LOG_MS}
    return [e["message"].rstrip("\n") for e in fresh], {"newest": newest, "seen": seen}


def failure_record(reason: str) -> dict[str, Any] | None:
    """The error record ``entry.py`` put in the failure file, if FailureReason holds it whole."""
    found = re.search(re.escape(protocol.FAILURE_MARKER) + r"([A-Za-z0-9+/=]+)", reason)
    if found is None:
        return None
    try:
        record = json.loads(zlib.decompress(base64.b64decode(found.group(1), validate=True)))
    except (ValueError, zlib.error):
        return None  # cut short: SageMaker keeps 1024 characters
    return record if isinstance(record, dict) and isinstance(record.get("type"), str) else None


def _channel(name: str, uri: str) -> dict[str, Any]:
    return {"ChannelName": name, "InputMode": "File", "DataSource": {"S3DataSource": {
        "S3DataType": "S3Prefix", "S3Uri": uri, "S3DataDistributionType": "FullyReplicated"}}}


def _not_found(exc: Any) -> bool:
    error = exc.response.get("Error", {})
    text = str(error.get("Message", "")).lower()
    return error.get("Code") in ("ResourceNotFound", "ResourceNotFoundException") or (
        error.get("Code") == "ValidationException" and ("not found" in text or "could not find" in text))


@functools.cache
def _sagemaker_model() -> Any:
    import botocore.session

    return botocore.session.get_session().get_service_model("sagemaker")


def validate_request(request: dict[str, Any]) -> None:
    """Check the request against botocore's SageMaker service model: types, required members and
    minimums as boto3 does before sending, then what botocore's validator skips (``max``, ``pattern``,
    ``enum``: https://github.com/boto/botocore/blob/develop/botocore/validate.py checks ``min`` only),
    which SageMaker refuses with a ValidationException."""
    from botocore.validate import ParamValidator

    shape = _sagemaker_model().operation_model("CreateTrainingJob").input_shape
    report = ParamValidator().validate(request, shape)
    errors = [report.generate_report()] if report.has_errors() else []
    errors += _constraint_errors(request, shape, "")
    if errors:
        raise StepOperatorConfigError("the CreateTrainingJob request is invalid:\n" + "\n".join(errors))


def _constraint_errors(value: Any, shape: Any, path: str) -> list[str]:
    meta, kind = shape.metadata, shape.type_name
    if kind == "structure" and isinstance(value, dict):
        return [e for name, member in shape.members.items() if name in value
                for e in _constraint_errors(value[name], member, f"{path}.{name}".lstrip("."))]
    errors: list[str] = []
    if kind in ("list", "map", "string") and isinstance(value, (list, dict, str)) and len(value) > meta.get(
            "max", math.inf):
        errors.append(f"{path}: at most {meta['max']} {'characters' if kind == 'string' else 'entries'}, got "
                      f"{len(value)}")
    if kind in ("integer", "long", "float", "double") and isinstance(value, (int, float)) and value > meta.get(
            "max", math.inf):
        errors.append(f"{path}: at most {meta['max']}, got {value}")
    if kind == "string" and isinstance(value, str):
        if "enum" in shape.metadata and value not in shape.enum:
            errors.append(f"{path}: {value!r} is not one of {', '.join(shape.enum)}")
        if "pattern" in meta and not _pattern(meta["pattern"]).fullmatch(value):
            errors.append(f"{path}: {value!r} does not match the pattern {meta['pattern']}")
    if kind == "list" and isinstance(value, list):
        errors += [e for i, item in enumerate(value) for e in _constraint_errors(item, shape.member, f"{path}[{i}]")]
    if kind == "map" and isinstance(value, dict):
        for key, item in value.items():
            errors += _constraint_errors(key, shape.key, f"{path} key {key!r}")
            errors += _constraint_errors(item, shape.value, f"{path}[{key!r}]")
    return errors


@functools.cache
def _pattern(pattern: str) -> re.Pattern[str]:
    """An AWS pattern (Java syntax; the service matches the whole value) as a Python regex: the Unicode
    classes ``\\p{L}``, ``\\p{N}``, ``\\p{Z}`` (inside a character class, as in TagKey) become ranges."""
    return re.compile(re.sub(r"\\p\{(\w)\}", lambda m: _category_ranges(m.group(1)), pattern))


@functools.cache
def _category_ranges(category: str) -> str:
    import sys
    import unicodedata

    ranges: list[list[int]] = []
    for code in range(sys.maxunicode + 1):
        if unicodedata.category(chr(code)).startswith(category):
            if ranges and ranges[-1][1] == code - 1:
                ranges[-1][1] = code
            else:
                ranges.append([code, code])
    return "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in ranges)


def job_status(job: dict[str, Any] | None, handle: JobHandle) -> JobStatus:
    """``TrainingJobStatus`` and ``SecondaryStatus`` -> JobStatus."""
    name = handle["job_id"]
    if job is None:
        return JobStatus(JobState.FAILED, f"training job {name} does not exist", {"reason": "job_missing"})
    status, secondary = job.get("TrainingJobStatus"), job.get("SecondaryStatus") or ""
    details = {"started_at": epoch(job.get("TrainingStartTime")), "finished_at": epoch(job.get("TrainingEndTime")),
               "instance_type": (job.get("ResourceConfig") or {}).get("InstanceType"),
               "spot": bool(job.get("EnableManagedSpotTraining")), "secondary_status": secondary,
               "billable_seconds": job.get("BillableTimeInSeconds")}
    transitions = job.get("SecondaryStatusTransitions") or []
    message = (transitions[-1].get("StatusMessage") if transitions else "") or ""
    if status == "Completed":
        return JobStatus(JobState.SUCCEEDED, message, details)
    if status == "Failed":
        reason = (job.get("FailureReason") or message).split(protocol.FAILURE_MARKER, 1)[0].rstrip()
        # FailureReason starts with SageMaker's error class ("CapacityError: Unable to provision ...",
        # "AlgorithmError: <the step's failure file>"): only that class is read, never the text after it,
        # which may be the step's own output
        # (CapacityError: github.com/DIAGNijmegen/rse-grand-challenge/issues/2631, aws/sagemaker-pytorch-training-
        # toolkit#171): SageMaker could not provision the instances, so nothing of the step ran
        if reason.startswith(CAPACITY_ERROR_CLASSES):
            return capacity_failure(reason, "insufficient_capacity", details)
        return JobStatus(JobState.FAILED, reason, details)
    if status == "Stopped":
        if _pending_past_limit(job):
            return capacity_failure(f"the job waited for capacity past StoppingCondition.MaxPendingTimeInSeconds "
                                    f"({job['StoppingCondition']['MaxPendingTimeInSeconds']} s) and SageMaker stopped "
                                    f"it", "queue_timeout", details)
        if secondary == "MaxRuntimeExceeded":
            return JobStatus(JobState.FAILED, f"the job ran past MaxRuntimeInSeconds and SageMaker stopped it: "
                             f"{message}", {**details, "reason": "timed_out"})
        if secondary == "MaxWaitTimeExceeded":
            interrupted = any(t.get("Status") in PREEMPTION_STATUSES for t in transitions)
            if interrupted:
                return JobStatus(JobState.PREEMPTED, f"spot interruptions did not let the job finish within "
                                 f"MaxWaitTimeInSeconds: {message}", {**details, "reason": "preempted"})
            return JobStatus(JobState.FAILED, f"the job ran past MaxWaitTimeInSeconds without being interrupted "
                             f"and SageMaker stopped it: {message}", {**details, "reason": "timed_out"})
        return JobStatus(JobState.CANCELLED, message or "stopped", details)
    if status == "Stopping":
        return JobStatus(JobState.RUNNING, f"stopping: {message}", details)
    if secondary in ("Starting", "Pending", "LaunchingMLInstances", "PreparingTrainingStack", "Downloading",
                     "DownloadingTrainingImage", "Restarting"):
        return JobStatus(JobState.QUEUED, f"{secondary}: {message}".rstrip(": "), details)
    return JobStatus(JobState.RUNNING, f"{secondary}: {message}".rstrip(": "), details)




def _pending_past_limit(job: dict[str, Any]) -> bool:
    """Whether a stopped job never started training and was stopped after pending its whole
    ``MaxPendingTimeInSeconds`` ("the maximum length of time ... that a training or compilation job can be pending
    before it is stopped", https://docs.aws.amazon.com/sagemaker/latest/APIReference/API_StoppingCondition.html).
    SageMaker names no secondary status for it, so the timestamps tell."""
    limit = (job.get("StoppingCondition") or {}).get("MaxPendingTimeInSeconds")
    created, ended = epoch(job.get("CreationTime")), epoch(job.get("TrainingEndTime") or job.get("LastModifiedTime"))
    if not limit or job.get("TrainingStartTime") or created is None or ended is None:
        return False
    return ended - created >= float(limit)
