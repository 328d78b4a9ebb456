"""A local SageMaker whose training jobs run their container command as local processes.

moto's server (one for all services, on 127.0.0.1 and a free port, in a background thread) serves S3,
SageMaker and CloudWatch Logs; boto3 and aiobotocore talk to it unchanged through ``endpoint_url``::

    from airflow_stepops.testing.sagemaker import SageMakerEmulator

    with SageMakerEmulator(stop_grace_period=1) as sm:
        s3, sagemaker = sm.client("s3"), sm.client("sagemaker")   # or env() for AWS_ENDPOINT_URL & co.
        sagemaker.create_training_job(TrainingJobName="train-1", AlgorithmSpecification={
            "TrainingImage": "ignored", "TrainingInputMode": "File",
            "ContainerEntrypoint": ["python3", "/opt/ml/input/data/code/train.py"]}, ...)
        sm.wait_for_job("train-1")

Training jobs (moto only records them; ``_moto_patches.py`` makes them run): a job is created
``InProgress``/``Starting`` (a duplicate name answers ``ResourceInUse``), downloads its S3Prefix
channels to ``/opt/ml/input/data/<channel>/`` and its checkpoints, runs ``ContainerEntrypoint +
ContainerArguments`` with ``Environment`` (``/opt/ml`` rewritten to a per-run directory; ``python3``
is this interpreter, ``python`` is missing; no image is pulled), sends the output to CloudWatch Logs (group
``/aws/sagemaker/TrainingJobs``, stream ``<job>/algo-1-<epoch seconds>``) while it runs, syncs
``/opt/ml/checkpoints`` to ``CheckpointConfig.S3Uri``, and uploads ``/opt/ml/model`` as
``<S3OutputPath>/<job>/output/model.tar.gz``. SecondaryStatus walks ``Starting``, ``Downloading``,
``Training``, ``Uploading``, ``Completed`` (or ``Failed`` with ``AlgorithmError: ..., exit code: N``).
A failed job keeps ``FailureReason`` (the first 1024 characters of ``/opt/ml/output/failure``) and no
model. ``CreateTrainingJob`` refuses names, tags (50 at most, SageMaker's tag pattern) and environments
outside the API reference's limits with ``ValidationException``, which moto itself never checks.
``StopTrainingJob`` (SIGTERM, then SIGKILL after ``stop_grace_period``), ``MaxRuntimeInSeconds`` and a
spot job's ``MaxWaitTimeInSeconds`` end ``Stopped`` with SecondaryStatus ``Stopped``,
``MaxRuntimeExceeded`` or ``MaxWaitTimeExceeded``. ``ListTrainingJobs`` filters and sorts; tags work.
``/opt/ml`` is rewritten in the entrypoint, the arguments and the ``Environment`` values only: a job's
code takes its paths from there (or from its own location), as nothing can mount ``/opt/ml`` here.
The job process gets a minimal environment (not the host's): PATH, HOME, TMPDIR, PYTHONUNBUFFERED,
TRAINING_JOB_NAME/ARN, AWS_REGION and the ``AWS_*`` variables of ``env()`` in place of the role.

Faults: ``sm.inject("spot_interruption", job="train-1", after=2)`` (a spot job goes ``Interrupted`` and
restarts with its checkpoints; others fail), ``"insufficient_capacity"``, ``"failure"`` (``message``),
``"slow_start"`` (``duration``); ``sm.disrupt("train-1")`` interrupts a running job now;
``sm.fail_requests("ThrottlingException", action="DescribeTrainingJob")`` fails API calls;
``sm.lose_replies("CreateTrainingJob")`` serves a call but holds its reply past the client's timeout;
``late_log_every=N`` (or ``sm.configure(late_log_every=N)``) makes every Nth log line reach CloudWatch
Logs ``late_log_delay`` seconds late, after lines stamped later than it.
Inspection: ``describe``, ``jobs``, ``pids``, ``job_dir``, ``log_streams``, ``logs``, ``requests``,
``wait_for_job``, ``wait_for_status``.

Not emulated: images (only ``ContainerEntrypoint`` runs), more than one instance (``algo-1`` runs),
Pipe/FastFile input (downloaded like File), manifest and file-system data sources, metrics,
``UpdateTrainingJob``/``DeleteTrainingJob``, warm pools, retry strategies, IAM (any credentials work).
"""

from airflow_stepops.testing.sagemaker._config import EmulatorConfig
from airflow_stepops.testing.sagemaker._emulator import SageMakerEmulator
from airflow_stepops.testing.sagemaker._faults import CAPACITY_ERROR, INTERNAL_ERROR, Fault, FaultRule
from airflow_stepops.testing.sagemaker._logs import LOG_GROUP
from airflow_stepops.testing.sagemaker._server import ApiFault

__all__ = ["CAPACITY_ERROR", "INTERNAL_ERROR", "LOG_GROUP", "ApiFault", "EmulatorConfig", "Fault", "FaultRule",
           "SageMakerEmulator"]
