"""Settings and configuration of the ``sagemaker`` flavor (steps as SageMaker Training Jobs).

Field names follow ZenML's ``SageMakerStepOperatorSettings`` where they exist (``instance_type``,
``max_runtime_in_seconds``, ``use_spot_instances``, ``max_wait_time_in_seconds``,
``volume_size_in_gb``, ``keep_alive_period_in_seconds``) and the ``CreateTrainingJob`` API beyond.
"""

from __future__ import annotations

import functools
import re
import unicodedata
import warnings
from typing import Any, ClassVar

from pydantic import BaseModel, Field, field_validator, model_validator

from airflow_stepops.settings.base import BaseStepOperatorConfig, ContainerStepSettings, EnvVars, checked_by, matches

ROLE_ARN = re.compile(r"^arn:aws[a-z\-]*:iam::\d{12}:role/?[a-zA-Z_0-9+=,.@\-_/]+$")
INSTANCE_NAME = re.compile(r"^ml\.[a-z0-9-]+\.[a-z0-9]+$")
REGION = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]*)?-[a-z]+-\d$")
#: the KMS key forms both fields that kms_key_id fills accept (ResourceConfig.VolumeKmsKeyId takes no alias,
#: per its documentation in botocore's model): a key id (multi-Region: mrk-...) or a key ARN
KMS_KEY = re.compile(r"^(arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:key/)?([0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}|"
                     r"mrk-[0-9a-f]{32})$")
#: CreateTrainingJob limits (botocore's service model)
MAX_ENV_VARS = 100
MAX_ENV_CHARS = 512
MAX_TAGS = 50
#: tags the step operator puts on every job (``stepops:dag-id`` ... ``stepops:step``); users get the rest
IDENTITY_TAGS = 6
MAX_USER_TAGS = MAX_TAGS - IDENTITY_TAGS
#: fields this flavor sets itself; a pass-through may not replace them
OWNED_REQUEST_FIELDS = ("TrainingJobName", "AlgorithmSpecification", "RoleArn", "InputDataConfig",
                        "OutputDataConfig", "ResourceConfig", "StoppingCondition", "EnableManagedSpotTraining",
                        "CheckpointConfig", "Environment")


def check_tags(tags: dict[str, str], field: str) -> dict[str, str]:
    if len(tags) > MAX_USER_TAGS:
        raise ValueError(f"{field}: at most {MAX_USER_TAGS} tags (SageMaker allows {MAX_TAGS} and {IDENTITY_TAGS} "
                         f"are the step's identity), got {len(tags)}")
    for key, value in tags.items():
        if not 1 <= len(key) <= 128 or len(value) > 256 or key.lower().startswith("aws:"):
            raise ValueError(f"{field}[{key!r}]: tag keys are 1-128 characters and not 'aws:...', values at most "
                             "256 characters")
    for text in (t for item in tags.items() for t in item):
        if not tag_text_ok(str(text)):
            raise ValueError(f"{field}: {text!r} has a character SageMaker refuses in tags; keys and values hold "
                             "letters, digits, spaces and _ . : / = + - @")
    return tags


def tag_text_ok(text: str) -> bool:
    """The model's TagKey/TagValue pattern ``[\\p{L}\\p{Z}\\p{N}_.:/=+\\-@]*``, which SageMaker enforces and
    botocore's validator skips; checked without loading the model at parse time (a test holds the two equal)."""
    return all(ch in "_.:/=+-@" or unicodedata.category(ch)[0] in "LZN" for ch in text)


def check_sagemaker_environment(env: dict[str, str], field: str) -> dict[str, str]:
    """SageMaker's own limits, after ``check_environment`` (the field's type)."""
    for key, value in env.items():
        if not re.match(r"^[a-zA-Z_][a-zA-Z0-9_]*$", key) or len(key) > MAX_ENV_CHARS:
            raise ValueError(f"{field}: {key!r} is not a valid SageMaker environment variable name "
                             "(letters, digits and '_', at most 512 characters)")
        if len(value) > MAX_ENV_CHARS:
            raise ValueError(f"{field}[{key!r}]: SageMaker allows at most {MAX_ENV_CHARS} characters per value "
                             f"(got {len(value)}); pass large data as an argument or artifact")
    return env


class _SageMakerChecks(BaseModel):
    """Checks shared by the step settings and the step operator's defaults (same field names)."""

    @field_validator("instance_type", check_fields=False)
    @classmethod
    def _instance(cls, value: str | None) -> str | None:
        if value is not None:
            check_instance_type(value, "instance_type")
        return value

    _tags = checked_by(check_tags, "tags")

    _sm_env = checked_by(check_sagemaker_environment, "environment")


class SageMakerStepOperatorSettings(ContainerStepSettings, _SageMakerChecks):
    """Per-step options of the sagemaker flavor."""

    flavor: ClassVar[str] = "sagemaker"

    instance_type: str | None = Field(
        default=None, description="e.g. ml.p3.2xlarge; default: the cheapest type that fits ResourceSettings.")
    instance_count: int = Field(default=1, ge=1, le=100, description="Instances of the training cluster.")
    volume_size_in_gb: int | None = Field(
        default=None, ge=1, le=16384, description="Storage volume (default: ResourceSettings.disk_size, else 30).")
    use_spot_instances: bool = Field(default=False, description="Managed spot training (checkpoints survive).")
    max_wait_time_in_seconds: int | None = Field(
        default=None, gt=0, description="With spot: longest total wait + run time (>= max_runtime_in_seconds, "
        "which it also sets when not given); without spot it is unused (a warning) and dropped.")
    keep_alive_period_in_seconds: int | None = Field(
        default=None, ge=0, le=3600, description="Warm pool: keep the instance, and the requirements installed on it, "
        "this long for the next job with the same instance settings (not with spot).")
    tags: dict[str, str] = Field(default_factory=dict, description="Tags of the training job.")
    input_channels: dict[str, str] = Field(
        default_factory=dict, description="Extra input channels: name -> s3:// prefix, mounted at "
        "/opt/ml/input/data/<name>.")
    training_job_overrides: dict[str, Any] = Field(
        default_factory=dict, description="Other CreateTrainingJob fields, passed through (e.g. "
        "{'RetryStrategy': {'MaximumRetryAttempts': 1}}).")

    @field_validator("input_channels")
    @classmethod
    def _channels(cls, value: dict[str, str]) -> dict[str, str]:
        for name, uri in value.items():
            if not re.match(r"^[A-Za-z0-9\.\-_]+$", name) or len(name) > 64 or name in ("bundle", "checkpoints") \
                    or name.startswith("ref"):
                raise ValueError(f"input_channels: {name!r} is not an allowed channel name (letters, digits, '.', "
                                 "'-', '_'; 'bundle', 'checkpoints' and 'ref*' are the step's own)")
            if not uri.startswith("s3://"):
                raise ValueError(f"input_channels[{name!r}]: expected an s3:// prefix, got {uri!r}")
        return value

    @field_validator("training_job_overrides")
    @classmethod
    def _overrides(cls, value: dict[str, Any]) -> dict[str, Any]:
        owned = sorted(set(value) & set(OWNED_REQUEST_FIELDS))
        if owned:
            raise ValueError(f"training_job_overrides: {', '.join(owned)} are set by the step operator; use the "
                             "settings fields instead")
        return value

    @model_validator(mode="after")
    def _warm_pool(self) -> SageMakerStepOperatorSettings:
        """"You can't use warm pools with ... Spot Instances"
        (https://docs.aws.amazon.com/sagemaker/latest/dg/train-warm-pools.html)."""
        if self.keep_alive_period_in_seconds and self.use_spot_instances:
            raise ValueError("keep_alive_period_in_seconds: SageMaker keeps no warm pool for managed spot training; "
                             "drop keep_alive_period_in_seconds or use_spot_instances")
        return self

    @model_validator(mode="after")
    def _spot(self) -> SageMakerStepOperatorSettings:
        """ZenML's examples give a wait without spot, and a spot wait without a runtime. SageMaker requires
        MaxWaitTimeInSeconds >= MaxRuntimeInSeconds and uses it only for managed spot training
        (https://docs.aws.amazon.com/sagemaker/latest/APIReference/API_StoppingCondition.html), so a wait
        alone bounds the runtime too, and a wait without spot is dropped with a warning."""
        wait, runtime = self.max_wait_time_in_seconds, self.max_runtime_in_seconds
        if wait is None:
            return self
        if not self.use_spot_instances:
            warnings.warn(f"max_wait_time_in_seconds={wait} is ignored: SageMaker only uses it with "
                          "use_spot_instances=True (managed spot training); set use_spot_instances=True to run on "
                          "spot, or drop max_wait_time_in_seconds", UserWarning, stacklevel=2)
            self.__dict__["max_wait_time_in_seconds"] = None  # frozen model: set once, while validating
        elif runtime is None:
            self.__dict__["max_runtime_in_seconds"] = wait
        elif wait < runtime:
            raise ValueError(f"max_wait_time_in_seconds={wait} must be >= max_runtime_in_seconds={runtime}: SageMaker "
                             f"counts the spot wait and the training time together; set max_wait_time_in_seconds to "
                             f"at least {runtime}")
        return self

    def check_resources(self, resources: Any) -> None:
        if self.instance_type is None:
            from airflow_stepops.settings.sagemaker_instances import choose_instance

            choose_instance(resources)
        if self.volume_size_in_gb is not None and resources.disk_bytes and \
                self.volume_size_in_gb * 10**9 < resources.disk_bytes:
            raise ValueError(f"volume_size_in_gb={self.volume_size_in_gb} is smaller than resources.disk_size="
                             f"{resources.disk_size}")


@functools.cache
def _request_shape(*path: str) -> dict[str, Any]:
    """A CreateTrainingJob member's shape in botocore's service model (read, not imported with the SDK)."""
    from botocore.loaders import create_loader

    shapes = create_loader().load_service_model("sagemaker", "service-2")["shapes"]
    shape = shapes["CreateTrainingJobRequest"]
    for name in path:
        shape = shapes[shape["members"][name]["shape"]]
    return dict(shape)


def check_kms_key(value: str, field: str) -> str:
    """The pattern and length botocore's model gives both request fields, then the documented forms."""
    for path in (("ResourceConfig", "VolumeKmsKeyId"), ("OutputDataConfig", "KmsKeyId")):
        shape = _request_shape(*path)
        if not (shape.get("min", 0) <= len(value) <= shape.get("max", len(value))) or \
                not re.fullmatch(shape.get("pattern", ".*"), value):
            raise ValueError(f"{field}: {value!r} does not match {'.'.join(path)}'s pattern {shape.get('pattern')!r} "
                             f"(at most {shape.get('max')} characters) in SageMaker's API; give a KMS key id such as "
                             "1234abcd-12ab-34cd-56ef-1234567890ab or its ARN")
    if not KMS_KEY.match(value):
        raise ValueError(f"{field}: {value!r} is not a KMS key id (1234abcd-12ab-34cd-56ef-1234567890ab, or mrk-<32 hex> "
                         "for a multi-Region key) or key ARN (arn:aws:kms:<region>:<account>:key/<key id>); SageMaker "
                         "takes no alias for the volume key (ResourceConfig.VolumeKmsKeyId)")
    return value


def check_instance_type(value: str, field: str, *, against_api: bool = False) -> None:
    """At parse time the built-in table or the ``ml.<family>.<size>`` form (no AWS SDK is imported while
    DAGs are parsed); before submitting, ``against_api`` checks botocore's list of training types."""
    from airflow_stepops.settings.sagemaker_instances import INSTANCE_TYPES

    if value in INSTANCE_TYPES:
        return
    if not INSTANCE_NAME.match(value):
        raise ValueError(f"{field}: {value!r} is not a SageMaker instance type (ml.<family>.<size>, e.g. "
                         "ml.g5.xlarge)")
    if not against_api:
        return
    import botocore.session

    allowed = botocore.session.get_session().get_service_model("sagemaker").shape_for("TrainingInstanceType").enum
    if value not in allowed:
        family = value.split(".")[1]
        close = sorted(t for t in allowed if t.split(".")[1] == family)[:8] or sorted(INSTANCE_TYPES)[:8]
        raise ValueError(f"{field}: unknown SageMaker training instance type {value!r}; e.g. {', '.join(close)}")


class SageMakerStepOperatorConfig(BaseStepOperatorConfig, _SageMakerChecks):
    """Connection extras of a ``stepops_sagemaker`` step operator."""

    flavor: ClassVar[str] = "sagemaker"

    aws_conn_id: str = Field(
        title="AWS connection id",
        default="aws_default", description="Amazon provider connection with the credentials.")
    region_name: str | None = Field(
        title="Region", default=None, description="AWS region (default: the aws connection's).")
    role: str = Field(
        title="Execution role ARN", description="IAM role ARN the training job runs as (its own identity for S3).")
    image: str | None = Field(
        title="Training image", default=None, description="Training image URI in ECR, with the workers' Python "
        "(default: the PyTorch training Deep Learning Container of that Python).")
    instance_type: str | None = Field(
        title="Default instance type", default=None, description="Default instance type of this step operator.")
    subnets: list[str] = Field(
        title="VPC subnets", default_factory=list, description="VPC subnets of the training job.")
    security_group_ids: list[str] = Field(
        title="VPC security groups", default_factory=list, description="VPC security groups.")
    kms_key_id: str | None = Field(title="KMS key", default=None, description="KMS key for the volume and the output.")
    tags: dict[str, str] = Field(default_factory=dict, description="Tags of every training job.")
    environment: EnvVars = Field(
        title="Environment variables", default_factory=dict, description="Environment of every step (no secrets).")
    api_timeout_seconds: float = Field(title="API call timeout (s)",
                                       default=60.0, gt=0, le=900, description="Connect and read timeout of each "
                                       "AWS API call (a lost reply must not hang a worker).")
    api_max_attempts: int = Field(title="API call attempts",
                                  default=5, ge=1, le=20, description="Attempts of each AWS API call, the first "
                                  "included (botocore's standard retry mode).")
    console_region_url: str = Field(title="Console URL template",
                                    default="https://{region}.console.aws.amazon.com/sagemaker/home?region={region}"
                                    "#/jobs/{name}", description="Console link template.")

    _role = matches("role", ROLE_ARN, "an IAM role ARN (arn:aws:iam::<12-digit account>:role/<name>)")

    @field_validator("kms_key_id")
    @classmethod
    def _kms(cls, value: str | None) -> str | None:
        return value if value is None else check_kms_key(value, "kms_key_id")

    _region = matches("region_name", REGION, "an AWS region name (e.g. us-east-1)")

    @field_validator("artifact_store")
    @classmethod
    def _s3_store(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("s3://"):
            raise ValueError(f"artifact_store: SageMaker reads and writes S3; expected s3://bucket/prefix, got {value!r}")
        return value

    @model_validator(mode="after")
    def _vpc(self) -> SageMakerStepOperatorConfig:
        if bool(self.subnets) != bool(self.security_group_ids):
            raise ValueError("subnets and security_group_ids: give both (a VPC configuration) or neither")
        return self

    def credentials_source(self) -> str:
        return f"aws connection {self.aws_conn_id!r}" + (f", region {self.region_name}" if self.region_name else "")
