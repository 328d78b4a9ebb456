"""``JobRunner``: one thread per training job, doing what SageMaker's instances and agent do.

For each run (a spot job that is interrupted gets another, on a "fresh instance") the runner makes a
directory tree standing in for the instance's filesystem, ``<job_root>/<job>/run-<n>/`` with
``opt/ml`` (``input/config/*.json``, ``input/data/<channel>/``, ``model/``, ``output/``,
``checkpoints/``), ``root/`` (HOME) and ``tmp/``; downloads the S3Prefix channels and the checkpoints;
then runs ``ContainerEntrypoint + ContainerArguments`` as a local process group with ``/opt/ml``
rewritten to the run's directory and ``python3`` meaning this interpreter (no ``python``, as in a python3-only image) (no image is
pulled). Output goes to CloudWatch Logs; when the process ends the model directory becomes
``<S3OutputPath>/<job>/output/model.tar.gz``.

Status walk: ``Starting`` -> ``Downloading`` -> ``Training`` -> ``Uploading`` -> ``Completed``; on a
non-zero exit ``Failed`` (``AlgorithmError: <the output's last lines or /opt/ml/output/failure>, exit
code: N``); StopTrainingJob, MaxRuntimeInSeconds and MaxWaitTimeInSeconds end as TrainingJobStatus
``Stopped`` with SecondaryStatus ``Stopped``, ``MaxRuntimeExceeded`` and ``MaxWaitTimeExceeded`` (the
statuses SageMaker lists under ``Stopped``), after ``Stopping`` and ``Uploading`` what the process saved.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow_stepops.testing._images import IMAGE_PYTHONS, python_for, shims_for
from airflow_stepops.testing._kit import JobThread, signal_group, spawn, stop_group
from airflow_stepops.testing.sagemaker import _warmpool as warmpool
from airflow_stepops.testing.sagemaker._config import EmulatorConfig
from airflow_stepops.testing.sagemaker._faults import INTERNAL_ERROR, Fault
from airflow_stepops.testing.sagemaker._jobs import MESSAGES, TERMINAL, TrainingJob
from airflow_stepops.testing.sagemaker._logs import LogShipper, stream_name
from airflow_stepops.testing.sagemaker._transfer import (
    DataError,
    DirectorySync,
    download_prefix,
    join_s3,
    tarball,
    upload_file,
)
from airflow_stepops.testing.sagemaker._warmpool import WarmPools

logger = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What every runner shares: settings, the emulator's own clients, paths and the job base env."""

    config: EmulatorConfig
    s3: Any
    logs: Any
    root: Path
    shims: Path
    aws_env: dict[str, str]
    pools: WarmPools


@dataclass
class Outcome:
    """How a run (or the whole job) ended.

    kind: ``exited`` (``exit_code``), ``stopped``, ``max_runtime``, ``max_wait``, ``interrupted``,
    ``failed`` (``reason`` is the FailureReason) or ``shutdown`` (the emulator is stopping).
    """

    kind: str
    exit_code: int | None = None
    reason: str | None = None
    trained: bool = False
    tail: list[str] = field(default_factory=list)


def _rewriter(mapping: list[tuple[str, str]]) -> Callable[[str], str]:
    """Replace container paths by their host directories, whole path components only, in one pass."""
    pairs = sorted(((c.rstrip("/") or "/", h) for c, h in mapping), key=lambda p: -len(p[0]))
    table = dict(pairs)
    pattern = re.compile(r"(?<![\w.\-/])(" + "|".join(re.escape(c) for c, _ in pairs) + r")(?=/|$|[^\w.\-])")
    return lambda text: pattern.sub(lambda m: table[m.group(1)], text)


class JobRunner(JobThread):
    """Runs one training job on its own thread; see the module docstring for what it does."""

    def __init__(self, job: TrainingJob, faults: list[Fault], ctx: RunContext) -> None:
        self.job, self.ctx, self.config = job, ctx, ctx.config
        self.faults = list(faults)
        self.run_dirs: list[Path] = []
        self.streams: list[str] = []
        self._lock = threading.Lock()
        self._disruptions: list[tuple[float, Fault]] = []
        self._runtime_used = 0.0
        self._billable = 0.0
        self._checkpoints: DirectorySync | None = None
        self._created = time.monotonic()
        max_wait = job.max_wait
        self._wait_deadline = self._created + max_wait if max_wait is not None else None
        max_pending = job.max_pending
        self._pending_deadline = self._created + max_pending if max_pending is not None else None
        self._pool: Path | None = None  # the warm pool cache of this job's instance
        super().__init__(f"sagemaker-job-{job.name}")

    # ----- control (other threads) ----------------------------------------------------------------

    def disrupt(self, fault: Fault) -> None:
        """Strike the job ``fault.after`` seconds from now, or once it trains when it does not yet."""
        if self.job.training_job_status in TERMINAL:
            raise ValueError(f"training job {self.job.name} is already over ({self.job.training_job_status})")
        with self._lock:
            self._disruptions.append((time.monotonic() + fault.after, fault))
        self._wake.set()

    # ----- the job --------------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._pool = self.ctx.pools.acquire(self.job.request)
            outcome = self._run()
            self._release_pool()  # the pool waits for the next job once this one is over, before it says so
        except Exception as exc:
            logger.exception("the SageMaker emulator failed running training job %s", self.job.name)
            outcome = Outcome("failed", reason=f"InternalServerError: the emulator failed: {exc}")
        try:
            self._finish(outcome)
        except Exception as exc:
            logger.exception("the SageMaker emulator failed finishing training job %s", self.job.name)
            self.job.finish("Failed", "Failed", MESSAGES["failed"],
                            failure_reason=f"InternalServerError: the emulator failed: {exc}")
        finally:
            self._kill()
            self._release_pool()

    def _release_pool(self) -> None:
        self.ctx.pools.release(self.job.request, self._pool)
        self._pool = None

    def _stopping(self) -> str | None:
        if self._shutdown:
            return "shutdown"
        if self.job.stop_requested:
            return "stopped"
        if self._wait_deadline is not None and time.monotonic() >= self._wait_deadline:
            return "max_wait"
        if self._pending_deadline is not None and self.job.training_start_time is None and \
                time.monotonic() >= self._pending_deadline:
            return "max_pending"  # still waiting for its instances: SageMaker stops it
        return None

    def _run(self) -> Outcome:
        job, config = self.job, self.config
        job.transition("Starting", MESSAGES["launching"])
        for fault in self.faults:
            if fault.kind == "insufficient_capacity":
                return Outcome("failed", reason=fault.reason)
        delay = sum(f.duration for f in self.faults if f.kind == "slow_start") + config.phase_delay
        reason = self._pause(delay)
        if reason is not None:
            return Outcome(reason)
        interruptions = [f for f in self.faults if f.kind == "spot_interruption"]
        failure = next((f for f in self.faults if f.kind == "failure"), None)
        attempt = 0
        while True:
            attempt += 1
            reason = self._stopping()
            if reason is not None:
                return Outcome(reason)  # no process ran on this instance: nothing to upload
            job.transition("Starting", MESSAGES["preparing" if attempt == 1 else "restarting"])
            base = self._prepare(attempt)
            ml = base / "opt" / "ml"
            job.mark_training_started()
            began = time.monotonic()
            job.transition("Downloading", MESSAGES["downloading"])
            try:
                self._download_inputs(ml)
            except DataError as exc:
                self._billable += time.monotonic() - began
                return Outcome("failed", reason=f"ClientError: {exc}")
            reason = self._pause(config.phase_delay)
            if reason is not None:
                return Outcome(reason)  # no process ran on this instance: nothing to upload
            job.transition("Training", MESSAGES["image"])
            started = time.time()
            if self.streams and int(started) <= int(self.streams[-1].rsplit("-", 1)[1]):
                started = int(self.streams[-1].rsplit("-", 1)[1]) + 1.0  # a new instance, a new stream
            shipper = LogShipper(self.ctx.logs, stream_name(job.name, started), config.late_log_every,
                                 config.late_log_delay)
            shipper.create()
            self.streams.append(shipper.stream)
            job.transition("Training", MESSAGES["training"])
            strike = interruptions.pop(0) if interruptions else None
            outcome = self._train(base, ml, shipper, strike, failure)
            self._billable += time.monotonic() - began
            if outcome.kind != "interrupted":
                return outcome
            if not job.spot:
                return Outcome("failed", reason=INTERNAL_ERROR, trained=True)
            job.transition("Interrupted", MESSAGES["interrupted"])
            reason = self._pause(config.spot_restart_delay)
            if reason is not None:
                return Outcome(reason)  # the interrupted instance is gone, and no new one runs yet

    # ----- one run --------------------------------------------------------------------------------

    def _prepare(self, attempt: int) -> Path:
        """A fresh instance filesystem: ``opt/ml`` with SageMaker's config files, ``root``, ``tmp``."""
        request = self.job.request
        base = self.ctx.root / self.job.name / f"run-{attempt}"
        ml = base / "opt" / "ml"
        for sub in ("input/config", "input/data", "model", "output/data", "code"):
            (ml / sub).mkdir(parents=True, exist_ok=True)
        (base / "root").mkdir(exist_ok=True)
        (base / "tmp").mkdir(exist_ok=True)
        self._checkpoint_dir(base).mkdir(parents=True, exist_ok=True)
        self.run_dirs.append(base)
        resources = request.get("ResourceConfig") or {}
        instance_type = resources.get("InstanceType") or "ml.m5.large"
        hosts = [f"algo-{i + 1}" for i in range(int(resources.get("InstanceCount") or 1))]
        configs: dict[str, Any] = {
            "hyperparameters.json": request.get("HyperParameters") or {},
            "resourceconfig.json": {
                "current_host": "algo-1", "current_instance_type": instance_type,
                "current_group_name": "homogeneousCluster", "hosts": hosts, "network_interface_name": "eth0",
                "instance_groups": [{"instance_group_name": "homogeneousCluster", "instance_type": instance_type,
                                     "hosts": hosts}]},
            "inputdataconfig.json": {
                ch["ChannelName"]: {"TrainingInputMode": ch.get("InputMode") or (request.get(
                    "AlgorithmSpecification") or {}).get("TrainingInputMode", "File"),
                    "S3DistributionType": ((ch.get("DataSource") or {}).get("S3DataSource") or {}).get(
                        "S3DistributionType", "FullyReplicated"),
                    "RecordWrapperType": ch.get("RecordWrapperType", "None"),
                    **({"ContentType": ch["ContentType"]} if ch.get("ContentType") else {})}
                for ch in request.get("InputDataConfig") or []},
            "trainingjobconfig.json": {k: v for k, v in request.items() if k != "Tags"},
        }
        if request.get("CheckpointConfig"):
            configs["checkpointconfig.json"] = {"LocalPath": "/opt/ml/checkpoints", **request["CheckpointConfig"]}
        for name, body in configs.items():
            (ml / "input" / "config" / name).write_text(json.dumps(body, indent=2, default=str))
        return base

    def _checkpoint_dir(self, base: Path) -> Path:
        local = (self.job.request.get("CheckpointConfig") or {}).get("LocalPath") or "/opt/ml/checkpoints"
        return base / local.strip("/")

    def _download_inputs(self, ml: Path) -> None:
        region = self.job.arn.split(":")[3]
        for channel in self.job.request.get("InputDataConfig") or []:
            name = channel["ChannelName"]
            source = (channel.get("DataSource") or {}).get("S3DataSource")
            if source is None:
                raise DataError(f"channel {name}: the emulator downloads S3DataSource channels only")
            data_type = source.get("S3DataType", "S3Prefix")
            if data_type != "S3Prefix":
                raise DataError(f"channel {name}: S3DataType {data_type} is not emulated (S3Prefix only)")
            download_prefix(self.ctx.s3, source["S3Uri"], ml / "input" / "data" / name, required=True,
                            region=region)
        checkpoint = self.job.request.get("CheckpointConfig") or {}
        self._checkpoints = None
        if checkpoint.get("S3Uri"):
            local = self._checkpoint_dir(ml.parent.parent)
            download_prefix(self.ctx.s3, checkpoint["S3Uri"], local, required=False, region=region)
            self._checkpoints = DirectorySync(self.ctx.s3, local, checkpoint["S3Uri"])
            self._checkpoints.mark_current()

    def _command(self, base: Path, ml: Path) -> tuple[list[str], dict[str, str]] | str:
        """argv and environment of the training process, or why there is none."""
        request = self.job.request
        spec = request.get("AlgorithmSpecification") or {}
        entrypoint = list(spec.get("ContainerEntrypoint") or [])
        if not entrypoint:
            return ("ClientError: the SageMaker emulator pulls no image; it runs "
                    "AlgorithmSpecification.ContainerEntrypoint (+ ContainerArguments) as a local process, "
                    f"and this job has no ContainerEntrypoint (TrainingImage {spec.get('TrainingImage')!r})")
        mapping = [("/opt/ml", str(ml))]
        local = (request.get("CheckpointConfig") or {}).get("LocalPath")
        if local and not local.startswith("/opt/ml"):
            mapping.append((local, str(self._checkpoint_dir(base))))
        if self._pool is not None:
            mapping.append((warmpool.CACHE, str(self._pool)))
        rewrite = _rewriter(mapping)
        argv = [rewrite(str(part)) for part in entrypoint + list(spec.get("ContainerArguments") or [])]
        image = spec.get("TrainingImage")
        if os.path.basename(argv[0]) in IMAGE_PYTHONS:  # other names resolve on PATH: the image's shims
            argv[0] = python_for(image)
        region = self.job.arn.split(":")[3]
        # a minimal base, not the host's environment: PATH (python shims first), HOME and TMPDIR of the run,
        # unbuffered Python output (as SageMaker's framework images set it, so logs flow while training),
        # what SageMaker itself sets, and credentials for the emulator standing in for the execution role
        env = {"PATH": f"{shims_for(image, self.ctx.shims)}{os.pathsep}{os.environ.get('PATH', os.defpath)}", "LANG": "C.UTF-8",
               "HOME": str(base / "root"), "TMPDIR": str(base / "tmp"), "PYTHONUNBUFFERED": "1",
               **self.ctx.aws_env, "TRAINING_JOB_NAME": self.job.name, "TRAINING_JOB_ARN": self.job.arn,
               "AWS_REGION": region, "AWS_DEFAULT_REGION": region, **self.config.env}
        if self._pool is not None:
            env[warmpool.ENV] = str(self._pool)
        env.update({str(k): rewrite(str(v)) for k, v in (request.get("Environment") or {}).items()})
        return argv, env

    def _train(self, base: Path, ml: Path, shipper: LogShipper, strike: Fault | None,
               failure: Fault | None) -> Outcome:
        job, config = self.job, self.config
        command = self._command(base, ml)
        if isinstance(command, str):
            return Outcome("failed", reason=command)
        argv, env = command
        tail: deque[str] = deque(maxlen=20)
        started = time.monotonic()
        try:
            proc = spawn(argv, cwd=base, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        except OSError as exc:
            line = f'exec: "{argv[0]}": {exc.strerror or exc}'
            shipper.add(line)
            shipper.flush(final=True)
            return Outcome("exited", exit_code=127, trained=True, tail=[line])
        with self._lock:
            self.proc = proc
        reader = threading.Thread(target=_read, args=(proc, shipper, tail), name=f"{job.name}-output", daemon=True)
        reader.start()
        budget = job.max_runtime - self._runtime_used
        next_flush = started + config.log_flush_interval
        next_sync = started + config.checkpoint_sync_interval
        outcome: Outcome | None = None
        while outcome is None:
            now = time.monotonic()
            code = proc.poll()
            with self._lock:
                due = next((d for d in self._disruptions if d[0] <= now), None)
                if due is not None:
                    self._disruptions.remove(due)
            disruption = due[1] if due is not None else None
            if code is not None:
                outcome = Outcome("exited", exit_code=code if code >= 0 else 128 - code)
            elif self._shutdown:
                outcome = Outcome("shutdown")
            elif job.stop_requested:
                outcome = Outcome("stopped")
            elif now - started >= budget:
                outcome = Outcome("max_runtime")
            elif self._wait_deadline is not None and now >= self._wait_deadline:
                outcome = Outcome("max_wait")
            elif disruption is not None:
                outcome = Outcome("interrupted") if disruption.kind == "spot_interruption" else Outcome(
                    "failed", reason=disruption.reason)
            elif strike is not None and now - started >= strike.after:
                outcome = Outcome("interrupted")
            elif failure is not None and now - started >= failure.after:
                outcome = Outcome("failed", reason=failure.reason)
            else:
                if now >= next_flush:
                    shipper.flush()
                    next_flush = now + config.log_flush_interval
                if self._checkpoints is not None and now >= next_sync:
                    self._checkpoints.sync()
                    next_sync = time.monotonic() + config.checkpoint_sync_interval
                self._wake.wait(self.TICK)
                self._wake.clear()
        self._runtime_used += time.monotonic() - started
        if outcome.kind in ("max_runtime", "max_wait"):
            job.transition("Stopping", MESSAGES["stopping"], status="Stopping")
        if outcome.kind != "exited":
            stop_group(proc, 0.0 if outcome.kind == "shutdown" else config.stop_grace_period)
        signal_group(proc.pid, signal.SIGKILL)  # the container is gone: so is everything it started
        reader.join(5)
        shipper.flush(final=True)
        if outcome.kind == "shutdown":
            return outcome
        if failure is not None and outcome.kind == "exited":
            outcome = Outcome("failed", reason=failure.reason)
        if self._checkpoints is not None:
            self._checkpoints.sync()
        outcome.trained, outcome.tail = True, list(tail)
        return outcome

    # ----- the end --------------------------------------------------------------------------------

    def _finish(self, outcome: Outcome) -> None:
        job = self.job
        kind = outcome.kind
        if kind == "shutdown":
            return
        if kind == "exited" and outcome.exit_code == 0 and job.stop_requested:
            kind = "stopped"  # StopTrainingJob arrived as the process ended: SageMaker reports Stopped
        stopped = {"stopped": ("Stopped", MESSAGES["stopped"]),
                   "max_runtime": ("MaxRuntimeExceeded", MESSAGES["max_runtime"]),
                   "max_wait": ("MaxWaitTimeExceeded", MESSAGES["max_wait"]),
                   "max_pending": ("Stopped", MESSAGES["max_pending"])}
        ml = self.run_dirs[-1] / "opt" / "ml" if self.run_dirs else None
        billable = self._billable
        if (kind == "exited" and outcome.exit_code == 0) or (kind in stopped and outcome.trained):
            job.transition("Uploading", MESSAGES["uploading"])
            try:
                assert ml is not None
                model = self._upload_outputs(ml)
            except Exception as exc:  # e.g. the output bucket does not exist
                job.finish("Failed", "Failed", MESSAGES["failed"], billable_seconds=billable,
                           failure_reason=f"ClientError: could not upload the model artifacts: {_brief(exc)}")
                return
            if kind == "exited" and not job.stop_requested:
                job.finish("Completed", "Completed", MESSAGES["completed"], model_artifacts=model,
                           billable_seconds=billable)
            else:
                secondary, message = stopped.get(kind, stopped["stopped"])
                job.finish("Stopped", secondary, message, model_artifacts=model, billable_seconds=billable)
        elif kind in stopped:
            secondary, message = stopped[kind]
            job.finish("Stopped", secondary, message, billable_seconds=billable)
        elif kind == "exited":
            # of a failed job SageMaker documents only FailureReason; nothing else is kept here, so no
            # hook comes to rely on an upload the service does not promise
            reason = self._algorithm_error(ml, outcome)
            job.finish("Failed", "Failed", MESSAGES["failed"], failure_reason=reason, billable_seconds=billable)
        else:
            job.finish("Failed", "Failed", MESSAGES["failed"], failure_reason=outcome.reason or INTERNAL_ERROR,
                       billable_seconds=billable)

    def _output_uri(self) -> str:
        return join_s3(self.job.request["OutputDataConfig"]["S3OutputPath"], self.job.name, "output")

    def _upload_outputs(self, ml: Path) -> str:
        """``model/`` as ``model.tar.gz`` (and ``output/data/`` as ``output.tar.gz``); the model's URI."""
        uri = join_s3(self._output_uri(), "model.tar.gz")
        upload_file(self.ctx.s3, tarball(ml / "model", ml.parent.parent / "model.tar.gz"), uri)
        data = ml / "output" / "data"
        if data.is_dir() and any(data.iterdir()):
            upload_file(self.ctx.s3, tarball(data, ml.parent.parent / "output.tar.gz"),
                        join_s3(self._output_uri(), "output.tar.gz"))
        return uri

    @staticmethod
    def _algorithm_error(ml: Path | None, outcome: Outcome) -> str:
        """SageMaker's FailureReason for a failed algorithm: "SageMaker returns the first 1024 characters
        from [/opt/ml/output/failure] as FailureReason"
        (https://docs.aws.amazon.com/sagemaker/latest/dg/your-algorithms-training-algo-output.html), else
        the last lines of the output; the API field holds 1024 characters at most, so a long text loses
        its end (and the exit code)."""
        detail = ""
        failure_file = ml / "output" / "failure" if ml is not None else None
        if failure_file is not None and failure_file.is_file():
            detail = failure_file.read_text(errors="replace")[:1024].strip()
        if not detail:
            detail = "\n".join(line for line in outcome.tail[-5:])
        return f"AlgorithmError: {detail}, exit code: {outcome.exit_code}"[:1024]


def _brief(exc: Exception) -> str:
    """``Code: Message`` of the S3 error behind ``exc`` (boto3's transfer errors wrap it in a sentence)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:
        return f"{response['Error'].get('Code')}: {response['Error'].get('Message')}"
    found = re.search(r"An error occurred \((\w+)\) when calling the \w+ operation: (.*)", str(exc))
    return f"{found.group(1)}: {found.group(2)}" if found else str(exc)


def _read(proc: subprocess.Popen[bytes], shipper: LogShipper, tail: deque[str]) -> None:
    assert proc.stdout is not None
    with proc.stdout:
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            shipper.add(line)
            tail.append(line)
