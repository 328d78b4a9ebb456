"""SageMaker settings, instance choice and the CreateTrainingJob request: checked before anything is sent."""

from __future__ import annotations

import re
import sys

import pytest
from pydantic import ValidationError

from airflow_stepops.exceptions import StepOperatorConfigError
from airflow_stepops.resources import ResourceSettings
from airflow_stepops.runtime.protocol import ENTRY_FILE, Env
from airflow_stepops.settings.sagemaker import SageMakerStepOperatorConfig, SageMakerStepOperatorSettings
from airflow_stepops.settings.sagemaker_instances import choose_instance

from ..flavorjobs import declare

ROLE = "arn:aws:iam::123456789012:role/stepops-training"
KEY = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"


@pytest.mark.parametrize(("resources", "expected"), [
    (ResourceSettings(), "ml.t3.medium"),
    (ResourceSettings(cpu_count=8, memory="32GB"), "ml.m5.2xlarge"),
    (ResourceSettings(cpu_count=8, memory="60GiB"), "ml.r5.2xlarge"),
    (ResourceSettings(gpu_count=1), "ml.g4dn.xlarge"),
    (ResourceSettings(gpu_count=1, gpu_type="A10G"), "ml.g5.xlarge"),
    (ResourceSettings(gpu_count=4, gpu_type="V100"), "ml.p3.8xlarge"),
    (ResourceSettings(gpu_count=8, gpu_type="A100"), "ml.p4d.24xlarge"),
    (ResourceSettings(gpu_count=8, gpu_type="A100-80GB"), "ml.p4de.24xlarge"),
    (ResourceSettings(cpu_count=8, memory="32GB", gpu_count=0), "ml.m5.2xlarge"),
])
def test_cheapest_instance_that_fits(resources, expected):
    assert choose_instance(resources).name == expected


def test_no_instance_fits_lists_the_nearest():
    with pytest.raises(ValueError, match=r"no SageMaker training instance type fits; nearest: ml\.p5\.48xlarge"):
        choose_instance(ResourceSettings(gpu_count=16, gpu_type="H100"))


@pytest.mark.parametrize(("settings", "message"), [
    ({"instance_type": "ml.p9.mega"}, None),  # well-formed names are checked against the API before submit
    ({"instance_type": "p3.2xlarge"}, r"instance_type: 'p3.2xlarge' is not a SageMaker instance type"),
    ({"use_spot_instances": True, "max_runtime_in_seconds": 3600, "max_wait_time_in_seconds": 1800},
     r"max_wait_time_in_seconds=1800 must be >= max_runtime_in_seconds=3600: .*set max_wait_time_in_seconds to at "
     r"least 3600"),
    ({"volume_size_in_gb": 0}, r"volume_size_in_gb: Input should be greater than or equal to 1"),
    ({"environment": {"A": "x" * 513}}, r"at most 512 characters per value"),
    ({"training_job_overrides": {"RoleArn": "x"}}, r"RoleArn are set by the step operator"),
    ({"input_channels": {"bundle": "s3://b/p"}}, r"'bundle' is not an allowed channel name"),
])
def test_bad_sagemaker_settings_fail_at_parse_time(settings, message):
    if message is None:
        declare("sagemaker", settings={"step_operator.sagemaker": settings})
        return
    with pytest.raises(StepOperatorConfigError, match=message):
        declare("sagemaker", settings={"step_operator.sagemaker": settings})


def test_resources_no_instance_can_satisfy_fail_at_parse_time():
    with pytest.raises(StepOperatorConfigError, match="no SageMaker training instance type fits"):
        declare("sagemaker", settings={"resources": ResourceSettings(gpu_count=2, gpu_type="K80"),
                                    "step_operator.sagemaker": SageMakerStepOperatorSettings()})
    with pytest.raises(StepOperatorConfigError, match="volume_size_in_gb=10 is smaller than resources.disk_size"):
        declare("sagemaker", settings={"resources": ResourceSettings(disk_size="50GB"),
                                    "step_operator.sagemaker": SageMakerStepOperatorSettings(volume_size_in_gb=10)})


@pytest.mark.parametrize(("extras", "message"), [
    ({}, r"role\s+Field required"),
    ({"role": "stepops-training"}, r"role: 'stepops-training' is not an IAM role ARN"),
    ({"role": ROLE, "region_name": "Frankfurt"}, r"region_name: 'Frankfurt' is not an AWS region name"),
    ({"role": ROLE, "artifact_store": "gs://bucket/x"}, r"expected s3://bucket/prefix"),
    ({"role": ROLE, "subnets": ["subnet-1"]}, r"subnets and security_group_ids: give both"),
    ({"role": ROLE, "tags": {"aws:owner": "x"}}, r"tags\['aws:owner'\]"),
    ({"role": ROLE, "kms_key_id": "my key"}, r"kms_key_id: 'my key' does not match ResourceConfig.VolumeKmsKeyId's "
     r"pattern '\[a-zA-Z0-9:/_-\]\*'"),
    ({"role": ROLE, "kms_key_id": "k" * 2049}, r"at most 2048 characters"),
    ({"role": ROLE, "kms_key_id": "alias/training"}, r"is not a KMS key id .* takes no alias for the volume key"),
    ({"role": ROLE, "kms_key_id": "arn:aws:kms:eu-west-1:key/1234abcd-12ab-34cd-56ef-1234567890ab"},
     r"is not a KMS key id"),
    ({"role": ROLE, "tags": {f"t{i}": "v" for i in range(45)}}, r"tags: at most 44 tags \(SageMaker allows 50 and 6 "),
])
def test_bad_connection_extras_are_refused(extras, message):
    with pytest.raises(ValidationError, match=message):
        SageMakerStepOperatorConfig(**extras)


@pytest.mark.parametrize("key", [KEY, "1234abcd-12ab-34cd-56ef-1234567890ab", "mrk-1234abcd12ab34cd56ef1234567890ab",
                                 "arn:aws-us-gov:kms:us-gov-west-1:123456789012:key/mrk-1234abcd12ab34cd56ef1234567890ab"])
def test_kms_key_forms_sagemaker_documents_are_accepted(key):
    assert SageMakerStepOperatorConfig(role=ROLE, kms_key_id=key).kms_key_id == key


def _hook(**extras):
    from airflow_stepops.hooks.sagemaker import SageMakerStepOperatorHook

    config = SageMakerStepOperatorConfig(role=ROLE, region_name="eu-west-1", image="123.dkr.ecr/train:1",
                                         artifact_store="s3://stepops-artifacts/steps", **extras)
    return SageMakerStepOperatorHook(step_operator_conn_id="sm", config=config)


def _spec(hook, resources=None, settings=None, refs=(), timeout=None):
    from airflow_stepops.artifacts import store_path
    from airflow_stepops.bundle import StepIdentity
    from airflow_stepops.hooks.base import StepSpec

    identity = StepIdentity("train_dag", "manual__2026-11-24T00:00:00+00:00", "train", -1, 2)
    prefix = identity.prefix(store_path(hook.config.artifact_store))  # artifact_root() would check the bucket
    return StepSpec(identity=identity, bundle_uri=str(prefix / "bundle"), output_uri=str(prefix / "output"),
                    resources=resources or ResourceSettings(), settings=settings or SageMakerStepOperatorSettings(),
                    refs=list(refs), task_label="train_dag.train", timeout_seconds=timeout)


def test_the_request_is_valid_for_botocore_and_maps_everything():
    from airflow_stepops.artifacts import ArtifactRef

    hook = _hook(subnets=["subnet-1"], security_group_ids=["sg-1"], kms_key_id=KEY, tags={"team": "ml"})
    ref = ArtifactRef(uri="s3://stepops-artifacts/steps/other/output/return_value.pkl", type="x", size=1, sha256="a")
    request = hook.render(_spec(hook, ResourceSettings(cpu_count=8, memory="32GB", gpu_count=1, disk_size="100GB"),
                                SageMakerStepOperatorSettings(use_spot_instances=True, max_runtime_in_seconds=3600,
                                                              max_wait_time_in_seconds=7200),
                                refs=[ref], timeout=1800))
    assert request["ResourceConfig"] == {"InstanceType": "ml.g4dn.2xlarge", "InstanceCount": 1, "VolumeSizeInGB": 100,
                                         "VolumeKmsKeyId": KEY}
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 1860, "MaxWaitTimeInSeconds": 7200}
    assert request["EnableManagedSpotTraining"] is True
    assert request["CheckpointConfig"]["S3Uri"].endswith("/train/-1/checkpoints")  # shared by every try
    assert [c["ChannelName"] for c in request["InputDataConfig"]] == ["bundle", "ref0"]
    assert request["AlgorithmSpecification"]["ContainerEntrypoint"] == [
        "python3", f"/opt/ml/input/data/bundle/{ENTRY_FILE}"]
    assert "AWS_ACCESS_KEY_ID" not in request["Environment"] and len(request["TrainingJobName"]) <= 63
    assert {"Key": "stepops:try-number", "Value": "2"} in request["Tags"] and request["VpcConfig"]["Subnets"]


@pytest.mark.parametrize(("settings", "stopping"), [
    # ZenML's "Configure Timeouts": a wait without spot is unused by SageMaker, so it is dropped (with a warning)
    ({"max_runtime_in_seconds": 3600, "max_wait_time_in_seconds": 7200}, {"MaxRuntimeInSeconds": 3600}),
    # ZenML's spot example: the wait alone also bounds the runtime (SageMaker wants wait >= runtime)
    ({"use_spot_instances": True, "max_wait_time_in_seconds": 3600},
     {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 3600}),
    ({"use_spot_instances": True, "max_runtime_in_seconds": 7200, "max_wait_time_in_seconds": 86400},
     {"MaxRuntimeInSeconds": 7200, "MaxWaitTimeInSeconds": 86400}),
])
def test_zenml_timeouts_mean_what_zenml_means(settings, stopping, recwarn):
    hook = _hook()
    request = hook.render(_spec(hook, settings=SageMakerStepOperatorSettings(**settings)))
    assert request["StoppingCondition"] == stopping
    warned = [str(w.message) for w in recwarn if "max_wait_time_in_seconds" in str(w.message)]
    assert warned == ([] if settings.get("use_spot_instances") else [
        "max_wait_time_in_seconds=7200 is ignored: SageMaker only uses it with use_spot_instances=True (managed spot "
        "training); set use_spot_instances=True to run on spot, or drop max_wait_time_in_seconds"])


def test_a_warm_pool_keeps_installed_requirements_and_is_not_for_spot():
    hook = _hook()
    request = hook.render(_spec(hook, settings=SageMakerStepOperatorSettings(keep_alive_period_in_seconds=600)))
    assert request["ResourceConfig"]["KeepAlivePeriodInSeconds"] == 600
    assert request["Environment"][Env.REQUIREMENTS_CACHE].startswith("/opt/ml/sagemaker/warmpoolcache/")
    assert Env.REQUIREMENTS_CACHE not in hook.render(_spec(hook))["Environment"]
    with pytest.raises(ValueError, match="keep_alive_period_in_seconds: SageMaker keeps no warm pool for managed spot"):
        SageMakerStepOperatorSettings(keep_alive_period_in_seconds=600, use_spot_instances=True)
    with pytest.raises(ValueError, match="keep_alive_period_in_seconds"):
        SageMakerStepOperatorSettings(keep_alive_period_in_seconds=3601)  # AWS's maximum is an hour


def test_unknown_instance_type_is_refused_before_submitting():
    hook = _hook()
    with pytest.raises(StepOperatorConfigError, match=r"unknown SageMaker training instance type 'ml.p9.mega'"):
        hook.render(_spec(hook, settings=SageMakerStepOperatorSettings(instance_type="ml.p9.mega")))
    from airflow_stepops.hooks.sagemaker import SageMakerStepOperatorHook

    bare = SageMakerStepOperatorHook(step_operator_conn_id="sm", config=SageMakerStepOperatorConfig(  # no image
        role=ROLE, artifact_store="s3://b/p", region_name="eu-south-1"))
    python = f"py{sys.version_info[0]}{sys.version_info[1]}"
    gpu = bare.render(_spec(bare, settings=SageMakerStepOperatorSettings(instance_type="ml.g5.xlarge")))
    assert re.fullmatch(rf"692866216735\.dkr\.ecr\.eu-south-1\.amazonaws\.com/pytorch-training:[\d.]+-gpu-{python}-"
                        r"cu\d+-ubuntu[\d.]+-sagemaker", gpu["AlgorithmSpecification"]["TrainingImage"]), gpu
    cpu = bare.render(_spec(bare, settings=SageMakerStepOperatorSettings(instance_type="ml.m5.xlarge")))
    assert f"-cpu-{python}-" in cpu["AlgorithmSpecification"]["TrainingImage"]


def test_max_wait_exceeded_is_preemption_only_after_an_interruption():
    from airflow_stepops.hooks.base import JobState
    from airflow_stepops.hooks.sagemaker import job_status

    handle = {"job_id": "j"}
    base = {"TrainingJobStatus": "Stopped", "SecondaryStatus": "MaxWaitTimeExceeded"}
    plain = job_status({**base, "SecondaryStatusTransitions": [{"Status": "Training"}]}, handle)
    assert plain.state is JobState.FAILED and plain.details["reason"] == "timed_out"
    spot = job_status({**base, "SecondaryStatusTransitions": [{"Status": "Interrupted"}]}, handle)
    assert spot.state is JobState.PREEMPTED


def test_the_parse_time_tag_check_is_the_models_pattern():
    """settings' tag_text_ok encodes the TagKey/TagValue pattern of botocore's model without loading it at parse
    time: the two agree on every character class the pattern names and on its neighbours."""
    from airflow_stepops.hooks.sagemaker import _constraint_errors, _sagemaker_model
    from airflow_stepops.settings.sagemaker import tag_text_ok

    shape = _sagemaker_model().shape_for("TagValue")
    samples = [chr(c) for c in range(32, 0x2100)] + ["é", "チーム", "٣", "\u2003", "a~b", "x y", "🙂", "\u00a0", "\t"]
    differing = [s for s in samples if tag_text_ok(s) != (not _constraint_errors(s, shape, "tag"))]
    assert not differing, differing[:20]


def test_max_queue_seconds_is_max_pending_time_where_sagemaker_allows_the_value():
    """StoppingCondition.MaxPendingTimeInSeconds takes 1800..2419200 (botocore's model): other values are left to
    the trigger, never sent."""
    hook = _hook()
    for value, sent in ((600, None), (1800.5, 1801), (7200, 7200), (2419201, None)):
        spec = _spec(hook)
        spec.max_queue_seconds = value
        assert hook.render(spec)["StoppingCondition"].get("MaxPendingTimeInSeconds") == sent, value


def test_a_job_stopped_after_pending_its_max_pending_time_is_a_queue_timeout():
    from datetime import datetime, timedelta, timezone

    from airflow_stepops.hooks.base import JobState
    from airflow_stepops.hooks.sagemaker import job_status

    created = datetime(2026, 12, 1, tzinfo=timezone.utc)
    job = {"TrainingJobStatus": "Stopped", "SecondaryStatus": "Stopped", "CreationTime": created,
           "LastModifiedTime": created + timedelta(seconds=1801),
           "StoppingCondition": {"MaxRuntimeInSeconds": 60, "MaxPendingTimeInSeconds": 1800}}
    status = job_status(job, {"job_id": "j"})
    assert status.state is JobState.FAILED and status.details["reason"] == "queue_timeout", status
    ran = job_status({**job, "TrainingStartTime": created + timedelta(seconds=5)}, {"job_id": "j"})
    assert ran.state is JobState.CANCELLED  # it had its instances: a stop of ours
    failed = job_status({"TrainingJobStatus": "Failed", "FailureReason": "CapacityError: Unable to provision "
                         "requested ML compute capacity."}, {"job_id": "j"})
    assert failed.state is JobState.FAILED and failed.details["reason"] == "insufficient_capacity"
