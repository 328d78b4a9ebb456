"""``SageMakerEmulator``: moto's server for S3, SageMaker and CloudWatch Logs, with training jobs that run."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from airflow_stepops.testing._images import write_python_shims
from airflow_stepops.testing._kit import Emulator, add_fault, configured
from airflow_stepops.testing.sagemaker import _moto_patches
from airflow_stepops.testing.sagemaker._config import EmulatorConfig
from airflow_stepops.testing.sagemaker._faults import RUNNING_KINDS, Fault, FaultRule
from airflow_stepops.testing.sagemaker._jobs import JSON, TERMINAL, TrainingJob
from airflow_stepops.testing.sagemaker._logs import LOG_GROUP
from airflow_stepops.testing.sagemaker._runner import JobRunner, RunContext
from airflow_stepops.testing.sagemaker._server import INTERNAL_AGENT, ApiFault, MotoServer
from airflow_stepops.testing.sagemaker._warmpool import WarmPools


class SageMakerEmulator(Emulator):
    """S3, SageMaker and CloudWatch Logs on 127.0.0.1 whose training jobs run as local processes.

    Use it as a context manager (or ``start()`` / ``stop()``); point boto3 or aiobotocore at
    ``endpoint_url`` (``client(service)`` builds one, ``env()`` gives the ``AWS_*`` variables). Settings
    are the fields of ``EmulatorConfig`` (``stop_grace_period=1``, ``region="eu-west-1"``, ...).

    moto keeps its state per process, so one emulator runs at a time in a process.
    """

    STATES: ClassVar[dict[str, str]] = {"Completed": "succeeded", "Failed": "failed", "Stopped": "cancelled"}
    KINDS: ClassVar[dict[str, str]] = {"preemption": "spot_interruption"}
    _active: ClassVar[SageMakerEmulator | None] = None
    _active_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, config: EmulatorConfig | None = None, *, port: int = 0, **settings: Any) -> None:
        self.config = configured(config or EmulatorConfig(), settings)
        self._wanted_port = port
        self.port = 0
        self._server: MotoServer | None = None
        self._lock = threading.Lock()
        self._runners: dict[str, JobRunner] = {}
        self._rules: list[FaultRule] = []
        self._ctx: RunContext | None = None

    # ----- lifecycle --------------------------------------------------------------------------------

    def start(self) -> SageMakerEmulator:
        with SageMakerEmulator._active_lock:
            if SageMakerEmulator._active is not None:
                raise RuntimeError("a SageMaker emulator already runs in this process (moto's state is per process)")
            SageMakerEmulator._active = self
        return super().start()

    def _start(self) -> None:
        _moto_patches.apply()
        if self.config.reset_moto:
            from moto.moto_api._internal.models import moto_api_backend

            moto_api_backend.reset()
        root = self._open_workdir(self.config.job_root, "sagemaker")
        self._server = MotoServer(self._wanted_port)
        self._server.start()
        self.port = self._server.get_host_and_port()[1]
        shims = root / "bin"
        write_python_shims(shims)
        self._ctx = RunContext(self.config, self.client("s3", internal=True), self.client("logs", internal=True),
                               root, shims, self.env(), WarmPools(root / "warm-pools"))
        _moto_patches.set_listener(self)

    def stop(self) -> None:
        if SageMakerEmulator._active is self:  # moto's one emulator of this process
            super().stop()

    def _teardown(self) -> None:
        _moto_patches.set_listener(None)
        self._each_runner("shutdown")
        if self._server is not None:
            try:
                self._server.stop()
            except Exception:
                pass
            self._server = None
        self._close_workdir()
        with SageMakerEmulator._active_lock:
            if SageMakerEmulator._active is self:
                SageMakerEmulator._active = None

    def configure(self, **settings: Any) -> EmulatorConfig:
        """Change settings (fields of ``EmulatorConfig``) for the jobs created from now on; the old ones."""
        old, self.config = self.config, configured(self.config, settings)
        if self._ctx is not None:
            self._ctx = replace(self._ctx, config=self.config)
        return old

    # ----- moto's calls (request threads) -------------------------------------------------------

    def job_created(self, job: TrainingJob) -> None:
        assert self._ctx is not None
        with self._lock:
            # a spot interruption waiting for new jobs goes to managed spot jobs only (on-demand instances are not
            # reclaimed: https://docs.aws.amazon.com/sagemaker/latest/dg/model-managed-spot-training.html); one
            # given to a job by name strikes it all the same (an on-demand job fails with InternalServerError)
            faults = [rule.fault for rule in self._rules
                      if (job.spot or rule.fault.kind != "spot_interruption" or rule.job == job.name)
                      and rule.take(job.name)]
            runner = JobRunner(job, faults, self._ctx)
            self._runners[job.name] = runner
        runner.start()

    def job_stop_requested(self, job: TrainingJob) -> None:
        self._wake(job.name)

    # ----- clients ----------------------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def region(self) -> str:
        return self.config.region

    def client(self, service: str, *, internal: bool = False, **kwargs: Any) -> Any:
        """A boto3 client for ``service`` (``s3``, ``sagemaker``, ``logs``, ...) with dummy credentials."""
        import boto3
        from botocore.config import Config

        config = Config(retries={"max_attempts": 5, "mode": "standard"},
                        user_agent_extra=INTERNAL_AGENT if internal else None)
        options: dict[str, Any] = {"endpoint_url": self.endpoint_url, "region_name": self.region,
                                   "aws_access_key_id": self.config.access_key_id,
                                   "aws_secret_access_key": self.config.secret_access_key, "config": config}
        options.update(kwargs)
        return boto3.session.Session().client(service, **options)

    def env(self) -> dict[str, str]:
        """Environment variables that point the AWS SDKs (and Airflow's AWS hooks) at the emulator."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": self.config.access_key_id,
                "AWS_SECRET_ACCESS_KEY": self.config.secret_access_key, "AWS_DEFAULT_REGION": self.region}

    def airflow_connection(self) -> str:
        """An Airflow ``aws`` connection (JSON, for ``AIRFLOW_CONN_<ID>``) whose extra names the endpoint."""
        return json.dumps({"conn_type": "aws", "login": self.config.access_key_id,
                           "password": self.config.secret_access_key,
                           "extra": {"endpoint_url": self.endpoint_url, "region_name": self.region}})

    # ----- faults -----------------------------------------------------------------------------------

    def inject(self, kind: Fault | str, job: str | None = None, after: float = 0.0, *, job_prefix: str | None = None,
               count: int | None = 1, **fields: Any) -> FaultRule:
        """Give a fault (a ``Fault``, or its kind and ``fields``; ``preemption`` is ``spot_interruption``) to the
        next ``count`` new jobs matching (None: every one; a ``spot_interruption`` for jobs not named goes to managed
        spot jobs only, as on-demand instances are not reclaimed). A ``spot_interruption`` or ``failure`` for a job
        that exists strikes it ``after`` seconds from now (or once it trains, when it does not yet)."""
        chosen = self._fault(Fault, kind, after, **fields)
        if job is not None and chosen.kind in RUNNING_KINDS and job in self._runners:
            self._runner(job).disrupt(chosen)
            return FaultRule.struck(chosen, job)
        rule = FaultRule(chosen, job, count, job_prefix=job_prefix)
        with self._lock:
            self._rules.append(rule)
        return rule

    def fail_requests(self, code: str = "ThrottlingException", *, status: int = 400, service: str | None = None,
                      action: str | None = None, count: int | None = 1, message: str | None = None) -> ApiFault:
        """Answer the next ``count`` matching API requests with the error ``code`` (see ``ApiFault``)."""
        return add_fault(self._gateway(), ApiFault(code, status, service, action, count, message or "Rate exceeded"))

    def lose_replies(self, action: str, *, service: str = "sagemaker", count: int | None = 1,
                     hold: float = 30.0) -> ApiFault:
        """Serve the next ``count`` ``action`` requests but hold their replies ``hold`` seconds, as if lost
        (a CreateTrainingJob creates its job all the same)."""
        return add_fault(self._gateway(), ApiFault("", 200, service, action, count, "", hold=hold))

    def clear_faults(self) -> None:
        with self._lock:
            self._rules.clear()
        gateway = self._gateway()
        with gateway.lock:
            gateway.faults.clear()

    # ----- inspection -------------------------------------------------------------------------------

    def _gateway(self) -> Any:
        return self._running(self._server).gateway

    def _runner(self, name: str) -> JobRunner:
        with self._lock:
            runner = self._runners.get(name)
        if runner is None:
            raise KeyError(f"no training job {name!r}")
        return runner

    def requests(self, service: str | None = None, action: str | None = None, *,
                 internal: bool = False) -> list[dict[str, Any]]:
        """The API requests served (service, action, method, path, query, status, time), oldest first;
        the emulator's own S3 and log traffic only with ``internal=True``."""
        gateway = self._gateway()
        with gateway.lock:
            records = [dict(r) for r in gateway.records]
        return [r for r in records if (internal or not r["internal"]) and (service is None or r["service"] == service)
                and (action is None or r["action"] == action)]

    def describe(self, name: str) -> JSON:
        """The job as DescribeTrainingJob shows it (datetimes, not the wire's epoch numbers)."""
        return self._runner(name).job.describe()

    job = describe

    @staticmethod
    def job_id(job: JSON) -> str:
        return job["TrainingJobName"]

    @property
    def jobs(self) -> list[JSON]:
        """Every training job, oldest first, as ``describe()`` shows it."""
        with self._lock:
            runners = list(self._runners.values())
        return [r.job.describe() for r in runners]

    def status(self, name: str) -> str:
        """TrainingJobStatus."""
        return self.describe(name)["TrainingJobStatus"]

    def history(self, name: str) -> list[str]:
        """The SecondaryStatus transitions, then the TrainingJobStatus."""
        described = self.describe(name)
        return [t["Status"] for t in described["SecondaryStatusTransitions"]] + [described["TrainingJobStatus"]]

    def error(self, name: str) -> str:
        return self.describe(name).get("FailureReason", "")

    def pids(self, name: str) -> list[int]:
        """The running training process of the job (its process group leader), empty when none runs."""
        return self._runner(name).pids()

    def job_dir(self, name: str) -> Path:
        """The directory standing in for ``/opt/ml`` in the job's latest run."""
        runner = self._runner(name)
        if not runner.run_dirs:
            raise LookupError(f"training job {name!r} has not started a run")
        return runner.run_dirs[-1] / "opt" / "ml"

    def log_streams(self, name: str) -> list[str]:
        """The job's CloudWatch log streams (group ``/aws/sagemaker/TrainingJobs``), one per run."""
        return list(self._runner(name).streams)

    def logs(self, name: str) -> list[str]:
        """Every log line of the job so far, in the order CloudWatch Logs holds them."""
        assert self._ctx is not None
        messages: list[str] = []
        for stream in self.log_streams(name):
            token = None
            while True:
                kwargs: dict[str, Any] = {"logGroupName": LOG_GROUP, "logStreamName": stream, "startFromHead": True}
                if token:
                    kwargs["nextToken"] = token
                page = self._ctx.logs.get_log_events(**kwargs)
                messages += [e["message"] for e in page["events"]]
                if not page["events"] or page.get("nextForwardToken") == token:
                    break
                token = page.get("nextForwardToken")
        return messages

    def wait_for_job(self, name: str, timeout: float = 30.0) -> JSON:
        """Block until the job is Completed, Failed or Stopped; returns ``describe()`` (TimeoutError otherwise)."""
        return self.wait_for_state(name, TERMINAL, timeout)

    #: block until the job has entered a SecondaryStatus (now or earlier); AssertionError if it ends first
    wait_for_status = Emulator.wait_for_state
