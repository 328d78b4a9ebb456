"""The SageMaker emulator, driven through boto3 (and aiobotocore) only, as a step operator would drive it."""

from __future__ import annotations

import asyncio
import io
import os
import re
import tarfile
import time
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from airflow_stepops.testing.sagemaker import CAPACITY_ERROR, INTERNAL_ERROR, LOG_GROUP, Fault, SageMakerEmulator

from ..emulated import emulator_process, eventually

BUCKET = "stepops-emulator-tests"

#: one script for every case; MODE picks the behaviour, paths come in through the (rewritten) environment
TRAIN_PY = r'''
import json, os, signal, sys, time

mode = os.environ.get("MODE", "ok")
model_dir, ckpt_dir = os.environ["MODEL_DIR"], os.environ.get("CKPT_DIR", "")
print("host env leaked:", "STEPOPS_HOST_ONLY" in os.environ)
print("hyperparameters:", json.dumps(json.load(open(os.environ["CONFIG_DIR"] + "/hyperparameters.json"))))
data = os.environ["DATA_DIR"]
for channel in sorted(os.listdir(data)):
    for root, _, files in sorted(os.walk(os.path.join(data, channel))):
        for name in sorted(files):
            print("input:", os.path.relpath(os.path.join(root, name), data))

def on_term(signum, frame):
    with open(os.path.join(model_dir, "partial.txt"), "w") as f:
        f.write("saved on SIGTERM")
    print("got SIGTERM, saved a partial model")
    sys.exit(0)

if mode == "ok":
    for epoch in range(4):
        print(f"epoch {epoch} loss={1.0 / (epoch + 1):.3f}")
        time.sleep(0.4)
    os.makedirs(os.path.join(model_dir, "sub"), exist_ok=True)
    with open(os.path.join(model_dir, "model.txt"), "w") as f:
        f.write("weights")
    with open(os.path.join(model_dir, "sub", "extra.txt"), "w") as f:
        f.write("extra")
    print("training done")
elif mode == "fail":
    print("loading data")
    print("bad things happened", file=sys.stderr)
    sys.exit(1)
elif mode == "long_failure":
    os.makedirs(os.path.join(os.path.dirname(model_dir), "output", "data"), exist_ok=True)
    for path in (os.path.join(model_dir, "model.txt"), os.path.join(os.path.dirname(model_dir), "output", "data", "x")):
        with open(path, "w") as f:
            f.write("kept only if the job succeeds")
    with open(os.path.join(os.path.dirname(model_dir), "output", "failure"), "w") as f:
        f.write("HEAD" + "x" * 2000 + "TAIL")
    sys.exit(2)
elif mode == "sleep":
    signal.signal(signal.SIGTERM, on_term)
    print("sleeping")
    time.sleep(60)
elif mode == "resume":
    state = os.path.join(ckpt_dir, "state.txt")
    if os.path.exists(state):
        epoch = int(open(state).read())
        print(f"resumed from checkpoint epoch {epoch}")
        with open(os.path.join(model_dir, "model.txt"), "w") as f:
            f.write(f"trained from epoch {epoch}")
    else:
        with open(state, "w") as f:
            f.write("7")
        print("checkpoint saved")
        time.sleep(60)
'''


@pytest.fixture(scope="module")
def sm(sm_emulator: SageMakerEmulator) -> SageMakerEmulator:
    """The session's emulator (one per process: moto's state is per process), with this module's bucket."""
    s3 = sm_emulator.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key="code/train.py", Body=TRAIN_PY.encode())
    s3.put_object(Bucket=BUCKET, Key="datasets/train/a.csv", Body=b"x,y\n1,2\n")
    s3.put_object(Bucket=BUCKET, Key="datasets/train/nested/b.csv", Body=b"x,y\n3,4\n")
    return sm_emulator


@pytest.fixture(scope="module")
def sagemaker(sm):
    return sm.client("sagemaker")


@pytest.fixture(scope="module")
def logs(sm):
    return sm.client("logs")


def job_request(name: str, mode: str, *, spot: bool = False, max_runtime: int = 60, max_wait: int | None = None,
                checkpoints: bool = False) -> dict:
    request = {
        "TrainingJobName": name,
        "AlgorithmSpecification": {"TrainingImage": "123456789012.dkr.ecr.us-east-1.amazonaws.com/train:latest",
                                   "TrainingInputMode": "File",
                                   "ContainerEntrypoint": ["python3", "/opt/ml/input/data/code/train.py"]},
        "RoleArn": "arn:aws:iam::123456789012:role/SageMakerRole",
        "InputDataConfig": [
            {"ChannelName": "code", "DataSource": {"S3DataSource": {
                "S3DataType": "S3Prefix", "S3Uri": f"s3://{BUCKET}/code", "S3DataDistributionType": "FullyReplicated"}}},
            {"ChannelName": "train", "DataSource": {"S3DataSource": {
                "S3DataType": "S3Prefix", "S3Uri": f"s3://{BUCKET}/datasets/train/"}}},
        ],
        "OutputDataConfig": {"S3OutputPath": f"s3://{BUCKET}/output/"},
        "ResourceConfig": {"InstanceType": "ml.m5.large", "InstanceCount": 1, "VolumeSizeInGB": 10},
        "StoppingCondition": {"MaxRuntimeInSeconds": max_runtime},
        "HyperParameters": {"epochs": "4", "lr": "0.1"},
        "Environment": {"MODE": mode, "MODEL_DIR": "/opt/ml/model", "CKPT_DIR": "/opt/ml/checkpoints",
                        "CONFIG_DIR": "/opt/ml/input/config", "DATA_DIR": "/opt/ml/input/data"},
        "Tags": [{"Key": "team", "Value": "ml"}],
    }
    if spot:
        request["EnableManagedSpotTraining"] = True
        request["StoppingCondition"]["MaxWaitTimeInSeconds"] = max_wait or max_runtime
    if checkpoints:
        request["CheckpointConfig"] = {"S3Uri": f"s3://{BUCKET}/checkpoints/{name}"}
    return request


def describe(sagemaker, name: str) -> dict:
    return sagemaker.describe_training_job(TrainingJobName=name)


def wait_done(sagemaker, name: str, timeout: float = 30.0) -> dict:
    return eventually(lambda: (d := describe(sagemaker, name))["TrainingJobStatus"] in ("Completed", "Failed", "Stopped")
                      and d, timeout, f"{name} to finish")


def log_lines(logs, name: str) -> list[str]:
    """Every line of the job, through FilterLogEvents over the job's streams."""
    events, token = [], None
    while True:
        kwargs = {"logGroupName": LOG_GROUP, "logStreamNamePrefix": f"{name}/"}
        if token:
            kwargs["nextToken"] = token
        try:
            page = logs.filter_log_events(**kwargs)
        except logs.exceptions.ResourceNotFoundException:
            return []
        events += page["events"]
        token = page.get("nextToken")
        if not token:
            return [e["message"] for e in events]


def log_streams(logs, name: str) -> list[dict]:
    try:
        return logs.describe_log_streams(logGroupName=LOG_GROUP, logStreamNamePrefix=f"{name}/")["logStreams"]
    except logs.exceptions.ResourceNotFoundException:  # no job has logged yet: no log group
        return []


def statuses(described: dict) -> list[str]:
    return [t["Status"] for t in described["SecondaryStatusTransitions"]]


def model_members(sm, described: dict) -> dict[str, bytes]:
    uri = described["ModelArtifacts"]["S3ModelArtifacts"]
    bucket, _, key = uri[5:].partition("/")
    body = sm.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        return {m.name: (tar.extractfile(m).read() if m.isfile() else b"") for m in tar.getmembers()}


def test_job_walks_statuses_streams_logs_and_uploads_the_model(sm, sagemaker, logs, monkeypatch):
    monkeypatch.setenv("STEPOPS_HOST_ONLY", "1")
    arn = sagemaker.create_training_job(**job_request("emu-walk", "ok"))["TrainingJobArn"]
    assert arn == "arn:aws:sagemaker:us-east-1:123456789012:training-job/emu-walk"
    first = describe(sagemaker, "emu-walk")
    assert first["TrainingJobStatus"] == "InProgress"
    assert first["SecondaryStatus"] in ("Starting", "Downloading", "Training")

    # lines reach CloudWatch Logs while the job still trains
    streams = eventually(lambda: log_streams(logs, "emu-walk"), what="the log stream")
    assert re.fullmatch(r"emu-walk/algo-1-\d{10}", streams[0]["logStreamName"])
    stream = streams[0]["logStreamName"]
    eventually(lambda: any(e["message"].startswith("epoch 0") for e in logs.get_log_events(
        logGroupName=LOG_GROUP, logStreamName=stream, startFromHead=True)["events"]), what="epoch 0 in the logs")
    running = describe(sagemaker, "emu-walk")
    assert (running["TrainingJobStatus"], running["SecondaryStatus"]) == ("InProgress", "Training")
    assert sm.pids("emu-walk")

    done = wait_done(sagemaker, "emu-walk")
    assert (done["TrainingJobStatus"], done["SecondaryStatus"]) == ("Completed", "Completed")
    assert statuses(done) == ["Starting", "Downloading", "Training", "Uploading", "Completed"]
    assert all(t["StartTime"] <= t["EndTime"] and t["StatusMessage"] for t in done["SecondaryStatusTransitions"])
    assert done["CreationTime"] <= done["TrainingStartTime"] < done["TrainingEndTime"]
    assert done["TrainingTimeInSeconds"] >= 1 and done["BillableTimeInSeconds"] >= 1
    assert done["Environment"]["MODE"] == "ok" and "FailureReason" not in done
    assert done["ModelArtifacts"]["S3ModelArtifacts"] == f"s3://{BUCKET}/output/emu-walk/output/model.tar.gz"
    assert model_members(sm, done) == {"model.txt": b"weights", "sub": b"", "sub/extra.txt": b"extra"}

    lines = log_lines(logs, "emu-walk")
    assert lines[:2] == ["host env leaked: False", 'hyperparameters: {"epochs": "4", "lr": "0.1"}']
    assert [line for line in lines if line.startswith("input:")] == [
        "input: code/train.py", "input: train/a.csv", "input: train/nested/b.csv"]
    assert [line.split()[1] for line in lines if line.startswith("epoch")] == ["0", "1", "2", "3"]
    assert lines[-1] == "training done"
    events = logs.get_log_events(logGroupName=LOG_GROUP, logStreamName=stream, startFromHead=True)["events"]
    assert [e["timestamp"] for e in events] == sorted(e["timestamp"] for e in events)

    ml = sm.job_dir("emu-walk")
    assert (ml / "input/config/resourceconfig.json").is_file() and (ml / "model/model.txt").is_file()
    assert not sm.pids("emu-walk")

    # the API around it
    with pytest.raises(ClientError) as duplicate:
        sagemaker.create_training_job(**job_request("emu-walk", "ok"))
    assert duplicate.value.response["Error"]["Code"] == "ResourceInUse"
    assert "must be unique" in duplicate.value.response["Error"]["Message"]
    summaries = sagemaker.list_training_jobs(NameContains="emu-wal", StatusEquals="Completed")["TrainingJobSummaries"]
    assert [(s["TrainingJobName"], s["TrainingJobStatus"]) for s in summaries] == [("emu-walk", "Completed")]
    assert sagemaker.list_training_jobs(NameContains="emu-walk", StatusEquals="Failed")["TrainingJobSummaries"] == []
    assert sagemaker.list_tags(ResourceArn=arn)["Tags"] == [{"Key": "team", "Value": "ml"}]
    with pytest.raises(ClientError) as stop_done:
        sagemaker.stop_training_job(TrainingJobName="emu-walk")
    assert stop_done.value.response["Error"]["Code"] == "ValidationException"
    assert "in status Completed" in stop_done.value.response["Error"]["Message"]


def test_non_zero_exit_fails_with_an_algorithm_error(sagemaker, logs):
    sagemaker.create_training_job(**job_request("emu-exit-1", "fail"))
    done = wait_done(sagemaker, "emu-exit-1")
    assert (done["TrainingJobStatus"], done["SecondaryStatus"]) == ("Failed", "Failed")
    assert statuses(done) == ["Starting", "Downloading", "Training", "Failed"]
    reason = done["FailureReason"]
    assert reason.startswith("AlgorithmError: ") and reason.endswith(", exit code: 1")
    assert "bad things happened" in reason
    assert "ModelArtifacts" not in done
    lines = log_lines(logs, "emu-exit-1")
    assert "bad things happened" in lines
    assert "training done" not in lines  # FilterLogEvents keeps to the job's streams (logStreamNamePrefix)


def test_stop_training_job_terminates_the_process_and_keeps_what_it_saved(sm, sagemaker, logs):
    sagemaker.create_training_job(**job_request("emu-stop-me", "sleep"))
    eventually(lambda: "sleeping" in log_lines(logs, "emu-stop-me"), what="the job to sleep")
    [pid] = sm.pids("emu-stop-me")
    sagemaker.stop_training_job(TrainingJobName="emu-stop-me")
    stopping = describe(sagemaker, "emu-stop-me")
    assert stopping["TrainingJobStatus"] in ("Stopping", "Stopped")
    done = wait_done(sagemaker, "emu-stop-me")
    assert (done["TrainingJobStatus"], done["SecondaryStatus"]) == ("Stopped", "Stopped")
    assert statuses(done) == ["Starting", "Downloading", "Training", "Stopping", "Uploading", "Stopped"]
    assert not sm.pids("emu-stop-me")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert model_members(sm, done) == {"partial.txt": b"saved on SIGTERM"}
    assert "got SIGTERM, saved a partial model" in log_lines(logs, "emu-stop-me")
    with pytest.raises(ClientError) as again:
        sagemaker.stop_training_job(TrainingJobName="emu-stop-me")
    assert "in status Stopped" in again.value.response["Error"]["Message"]


def test_max_runtime_stops_the_job(sagemaker):
    started = time.monotonic()
    sagemaker.create_training_job(**job_request("emu-too-long", "sleep", max_runtime=1))
    done = wait_done(sagemaker, "emu-too-long")
    assert (done["TrainingJobStatus"], done["SecondaryStatus"]) == ("Stopped", "MaxRuntimeExceeded")
    assert statuses(done)[-3:] == ["Stopping", "Uploading", "MaxRuntimeExceeded"]
    assert time.monotonic() - started < 10


def test_spot_interruption_restarts_from_the_checkpoint(sm, sagemaker, logs):
    sagemaker.create_training_job(**job_request("emu-spot", "resume", spot=True, max_wait=120, checkpoints=True))
    eventually(lambda: "checkpoint saved" in log_lines(logs, "emu-spot"), what="the first checkpoint")
    s3 = sm.client("s3")
    eventually(lambda: s3.list_objects_v2(Bucket=BUCKET, Prefix="checkpoints/emu-spot/").get("KeyCount"),
               what="the checkpoint synced to S3 while the job runs")
    sm.inject("spot_interruption", "emu-spot")
    done = wait_done(sagemaker, "emu-spot")
    assert (done["TrainingJobStatus"], done["SecondaryStatus"]) == ("Completed", "Completed"), done.get("FailureReason")
    assert statuses(done) == ["Starting", "Downloading", "Training", "Interrupted", "Starting", "Downloading",
                              "Training", "Uploading", "Completed"]
    assert "resumed from checkpoint epoch 7" in log_lines(logs, "emu-spot")
    assert len(sm.log_streams("emu-spot")) == 2  # a new instance, a new stream
    assert model_members(sm, done) == {"model.txt": b"trained from epoch 7"}
    checkpoint = s3.get_object(Bucket=BUCKET, Key="checkpoints/emu-spot/state.txt")["Body"].read()
    assert checkpoint == b"7"
    assert done["BillableTimeInSeconds"] <= done["TrainingTimeInSeconds"]


def test_interruption_of_an_on_demand_job_fails_it(sm, sagemaker):
    sm.inject("spot_interruption", job="emu-on-demand", after=1.0)
    sagemaker.create_training_job(**job_request("emu-on-demand", "sleep"))
    sm.wait_for_status("emu-on-demand", "Training")
    done = sm.wait_for_job("emu-on-demand")
    assert (done["TrainingJobStatus"], done["FailureReason"]) == ("Failed", INTERNAL_ERROR)
    assert "sleeping" in sm.logs("emu-on-demand")


def test_insufficient_capacity_fails_while_starting(sm, sagemaker):
    sm.inject(Fault("insufficient_capacity"), job="emu-no-capacity")
    sagemaker.create_training_job(**job_request("emu-no-capacity", "ok"))
    done = wait_done(sagemaker, "emu-no-capacity")
    assert (done["TrainingJobStatus"], done["SecondaryStatus"]) == ("Failed", "Failed")
    assert done["FailureReason"] == CAPACITY_ERROR
    assert statuses(done) == ["Starting", "Failed"]
    assert "TrainingStartTime" not in done and sm.log_streams("emu-no-capacity") == []


def test_failure_fault_and_slow_start_past_the_spot_wait_time(sm, sagemaker):
    sm.inject("failure", job="emu-broken", message="ClientError: the emulated disk is full")
    sm.inject("slow_start", job="emu-slow-spot", duration=30)
    sagemaker.create_training_job(**job_request("emu-broken", "ok"))
    sagemaker.create_training_job(**job_request("emu-slow-spot", "ok", spot=True, max_runtime=1, max_wait=2))
    time.sleep(0.5)
    assert describe(sagemaker, "emu-slow-spot")["SecondaryStatus"] == "Starting"
    broken = wait_done(sagemaker, "emu-broken")
    assert (broken["TrainingJobStatus"], broken["FailureReason"]) == ("Failed", "ClientError: the emulated disk is full")
    slow = wait_done(sagemaker, "emu-slow-spot")
    assert (slow["TrainingJobStatus"], slow["SecondaryStatus"]) == ("Stopped", "MaxWaitTimeExceeded")
    assert statuses(slow) == ["Starting", "MaxWaitTimeExceeded"]


def test_a_failed_job_keeps_the_head_of_the_failure_file_only(sm, sagemaker):
    sagemaker.create_training_job(**job_request("emu-long-failure", "long_failure"))
    done = wait_done(sagemaker, "emu-long-failure")
    reason = done["FailureReason"]
    assert reason.startswith("AlgorithmError: HEADxxx") and len(reason) == 1024 and "TAIL" not in reason
    kept = sm.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="output/emu-long-failure/").get("Contents", [])
    assert "ModelArtifacts" not in done and kept == []  # neither model.tar.gz nor output.tar.gz


def test_create_refuses_what_the_api_reference_refuses(sm, sagemaker):
    """boto3 checks neither patterns nor maximums; SageMaker answers ValidationException, so does the emulator."""
    refused = {"emu-refused-tilde": {"Tags": [{"Key": "run", "Value": "manual__2026~1"}]},
               "emu-refused-51-tags": {"Tags": [{"Key": f"k{i}", "Value": "v"} for i in range(51)]},
               "emu-refused-env": {"Environment": {"BAD-KEY": "x"}},
               # (botocore checks the minimum, 1800, itself; the maximum is the service's)
               "emu-refused-pending": {"StoppingCondition": {"MaxRuntimeInSeconds": 60,
                                                             "MaxPendingTimeInSeconds": 2419201}},
               "emu_refused_name": {}}
    for name, change in refused.items():
        with pytest.raises(ClientError) as error:
            sagemaker.create_training_job(**{**job_request(name, "ok"), **change})
        assert error.value.response["Error"]["Code"] == "ValidationException", name
        assert "failed to satisfy constraint" in error.value.response["Error"]["Message"], name
    assert not {j["TrainingJobName"] for j in sm.jobs} & set(refused)
    sagemaker.create_training_job(**{**job_request("emu-unicode-tags", "ok"),
                                     "Tags": [{"Key": "équipe ml", "Value": "données 1:2/3=4+5-6@7_8"}]})
    assert wait_done(sagemaker, "emu-unicode-tags")["TrainingJobStatus"] == "Completed"


def test_api_errors_and_validation(sm, sagemaker):
    with pytest.raises(ClientError) as missing:
        sagemaker.describe_training_job(TrainingJobName="never-created")
    assert missing.value.response["Error"] == {"Code": "ValidationException",
                                               "Message": "Requested resource not found."}
    request = job_request("emu-spot-without-wait", "ok", spot=True)
    del request["StoppingCondition"]["MaxWaitTimeInSeconds"]
    with pytest.raises(ClientError) as invalid:
        sagemaker.create_training_job(**request)
    assert "MaxWaitTimeInSeconds" in invalid.value.response["Error"]["Message"]

    sm.fail_requests("ThrottlingException", action="ListTrainingJobs", count=1)
    sagemaker.list_training_jobs()  # boto3 retries the throttled call
    assert [r["status"] for r in sm.requests("sagemaker", "ListTrainingJobs")][-2:] == [400, 200]
    pages = sagemaker.get_paginator("list_training_jobs").paginate(PaginationConfig={"PageSize": 2})
    names = [s["TrainingJobName"] for page in pages for s in page["TrainingJobSummaries"]]
    assert len(names) == len(set(names)) == len(sm.jobs)


def test_aiobotocore_drives_a_job(sm):
    aiobotocore_session = pytest.importorskip("aiobotocore.session")

    async def scenario() -> tuple[dict, list[str], bytes]:
        session = aiobotocore_session.get_session()
        options = {"endpoint_url": sm.endpoint_url, "region_name": sm.region, "aws_access_key_id": "testing",
                   "aws_secret_access_key": "testing"}
        async with session.create_client("sagemaker", **options) as sagemaker, \
                session.create_client("logs", **options) as logs, session.create_client("s3", **options) as s3:
            await sagemaker.create_training_job(**job_request("emu-async", "ok"))
            while (described := await sagemaker.describe_training_job(TrainingJobName="emu-async"))[
                    "TrainingJobStatus"] == "InProgress":
                await asyncio.sleep(0.2)
            streams = (await logs.describe_log_streams(logGroupName=LOG_GROUP, logStreamNamePrefix="emu-async/"))
            events = await logs.get_log_events(logGroupName=LOG_GROUP, startFromHead=True,
                                               logStreamName=streams["logStreams"][0]["logStreamName"])
            obj = await s3.get_object(Bucket=BUCKET, Key="output/emu-async/output/model.tar.gz")
            async with obj["Body"] as body:
                data = await body.read()
        return described, [e["message"] for e in events["events"]], data

    described, lines, data = asyncio.run(scenario())
    assert described["TrainingJobStatus"] == "Completed"
    assert lines[-1] == "training done"
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert "model.txt" in tar.getnames()


def test_runs_as_a_process(tmp_path: Path):
    import boto3

    with emulator_process("sagemaker", tmp_path / "sagemaker.env") as env:
        assert env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
        client = boto3.client("sagemaker", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        assert client.list_training_jobs()["TrainingJobSummaries"] == []
