"""``JobRunner``: one thread per custom job, doing what Vertex AI's training service does with it.

States: JOB_STATE_QUEUED (``queue_seconds``) -> JOB_STATE_PENDING (``pending_seconds``; the ``/gcs``
inputs are copied in) -> JOB_STATE_RUNNING (``startTime``, set once the process exists) ->
JOB_STATE_SUCCEEDED / JOB_STATE_FAILED (``endTime``, ``error``); a cancel goes JOB_STATE_CANCELLING ->
JOB_STATE_CANCELLED. Whatever ends a started process, the ``/gcs`` files are uploaded before the end state.

Only replica 0 of worker pool 0 runs: ``containerSpec.command + containerSpec.args`` as a local process
group (``python3`` is this interpreter and ``python`` is missing, see ``testing._images``; no image is pulled; ``$(VAR)`` is expanded from the
env as Vertex does) in ``<workdir>/jobs/<id>/`` with ``home/`` as HOME and cwd, ``tmp/`` as TMPDIR and
``gcs/`` standing in for ``/gcs`` (see ``_mount``). Its stdout and stderr lines become log entries as
they are read. The process gets a minimal environment: PATH, HOME, TMPDIR, PYTHONUNBUFFERED=1, LANG,
Vertex's CLOUD_ML_JOB_ID / CLOUD_ML_PROJECT_ID / CLOUD_ML_REGION / CLUSTER_SPEC (and AIP_MODEL_DIR,
AIP_CHECKPOINT_DIR, AIP_TENSORBOARD_LOG_DIR with a ``baseOutputDirectory``), the emulator's GCS
variables in place of the job's service account, then the job's own ``env``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow_stepops.testing._images import IMAGE_PYTHONS, python_for, shims_for
from airflow_stepops.testing._kit import JobThread, spawn, stop_group
from airflow_stepops.testing.vertex import _faults as F
from airflow_stepops.testing.vertex._errors import job_error
from airflow_stepops.testing.vertex._gcs import FakeGcsServer
from airflow_stepops.testing.vertex._jobs import Job
from airflow_stepops.testing.vertex._logging import REPLICA, SERVICE, LogStore
from airflow_stepops.testing.vertex._mount import GcsMount
from airflow_stepops.testing.vertex._time import Clock

logger = logging.getLogger(__name__)

_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)s$")


@dataclass
class RunContext:
    """What every runner shares: settings, the emulator's services, paths and the base environment."""

    project: str
    project_number: str
    location: str
    stop_grace_period: float
    queue_seconds: float
    pending_seconds: float
    gcs: FakeGcsServer
    logs: LogStore
    clock: Clock
    jobs_root: Path
    shims: Path
    base_env: dict[str, str] = field(default_factory=dict)


#: Vertex restarts a replica that exits non-zero up to five times, then retries the whole job up to three
#: times, unless scheduling.disableRetries is set
#: (https://cloud.google.com/vertex-ai/docs/training/understanding-training-service, "Restart workers during
#: the training job"; https://cloud.google.com/vertex-ai/docs/reference/rest/v1/CustomJobSpec#Scheduling)
WORKER_RESTARTS = 5
JOB_RETRIES = 3
RESTART = "restart"  # an Outcome state: the replica is started again, the job goes on


@dataclass
class Outcome:
    """How the replica's run ended: the job's final state and ``error`` (None for success), or RESTART."""

    state: str
    error: dict[str, Any] | None = None
    exit_code: int | None = None


def parse_duration(text: str | None) -> float | None:
    """Seconds of a proto Duration in JSON (``"3600s"``, ``"1.5s"``)."""
    if not text:
        return None
    found = _DURATION.match(text)
    return float(found.group(1)) if found else None


class JobRunner(JobThread):
    """Runs one custom job on its own thread; see the module docstring."""

    def __init__(self, job: Job, ctx: RunContext, faults: list[F.Fault]) -> None:
        self.job, self.ctx = job, ctx
        self.faults = list(faults)
        self.dir = ctx.jobs_root / job.id
        self.uploaded: list[str] = []
        self.downloaded: list[str] = []
        self._lock = threading.Lock()
        self.running_since: float | None = None
        super().__init__(f"vertex-job-{job.id}")

    # ----- control (other threads) ----------------------------------------------------------------

    def strike(self, fault: F.Fault) -> None:
        """Give a live job a fault (its ``after`` counts from when it started RUNNING)."""
        with self._lock:
            self.faults.append(fault)
        self._wake.set()

    def _faults(self, *kinds: str) -> list[F.Fault]:
        with self._lock:
            return [f for f in self.faults if f.kind in kinds]

    # ----- the job ------------------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            outcome = self._run()
        except Exception as exc:
            logger.exception("the Vertex emulator failed running custom job %s", self.job.id)
            outcome = Outcome("JOB_STATE_FAILED", job_error("INTERNAL", f"The Vertex AI emulator failed: {exc}"))
        finally:
            self._kill()
        if outcome is None:
            return  # shut down: the job keeps the state it had
        try:
            self._end(outcome)
        except Exception as exc:
            logger.exception("the Vertex emulator failed ending custom job %s", self.job.id)
            self.job.finish("JOB_STATE_FAILED", self.ctx.clock.now(),
                            job_error("INTERNAL", f"The Vertex AI emulator failed: {exc}"))

    def _log(self, text: str, severity: str = "INFO") -> None:
        self.ctx.logs.write(self.job.id, text, severity=severity, task=SERVICE)

    def _stopping(self) -> str | None:
        return super()._stopping() or ("cancel" if self.job.cancel_requested.is_set() else None)

    def _interrupted(self, why: str) -> Outcome | None:
        return None if why == "shutdown" else Outcome("JOB_STATE_CANCELLED", job_error("CANCELLED", F.CANCELED))

    def _run(self) -> Outcome | None:
        ctx, job = self.ctx, self.job
        why = self._queue()
        if why is not None:
            return self._interrupted(why)
        if not job.advance("JOB_STATE_PENDING", ctx.clock.now()):
            return self._interrupted("cancel")
        self._log("Waiting for job to be provisioned.")
        pending_since = time.monotonic()
        for sub in ("home", "tmp"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        mount = GcsMount(ctx.gcs, self.dir / "gcs")
        command = self._command(mount)
        if not isinstance(command, str) and not self._faults("stockout"):  # no VM, no mount
            try:
                self.downloaded = mount.download(command[2])
            except Exception as exc:
                return Outcome("JOB_STATE_FAILED", job_error("INTERNAL", f"Could not mount /gcs: {exc}"))
        why = self._pause(ctx.pending_seconds - (time.monotonic() - pending_since))
        if why is not None:
            return self._interrupted(why)
        stockouts = self._faults("stockout")
        if stockouts:
            why = self._pause(stockouts[0].after)
            if why is not None:
                return self._interrupted(why)
            return Outcome("JOB_STATE_FAILED", job_error("RESOURCE_EXHAUSTED",
                                                         F.STOCKOUT.format(location=ctx.location)))
        if isinstance(command, str):
            return Outcome("JOB_STATE_FAILED", job_error("INVALID_ARGUMENT", command))
        self._log("Waiting for training program to start.")
        retries = not (self.job.spec().get("scheduling") or {}).get("disableRetries")
        restarts = attempts = 0
        while True:
            outcome = self._train(command[0], command[1])
            if outcome is None:
                return None
            self.uploaded, errors = mount.upload_changes()  # also after a failure, cancel or preemption
            for error in errors:
                self._log(f"Could not write to Cloud Storage: {error}", "ERROR")
            if outcome.state == RESTART:
                self._log(f"Worker {REPLICA} was restarted on another VM (VM maintenance).")
            elif outcome.exit_code and retries and restarts < WORKER_RESTARTS:
                restarts += 1
                self._log(f"Worker {REPLICA} exited with status {outcome.exit_code}; restarting it "
                          f"({restarts} of {WORKER_RESTARTS}).", "WARNING")
            elif outcome.exit_code and retries and attempts < JOB_RETRIES:
                attempts, restarts = attempts + 1, 0
                self._log(f"Retrying the job ({attempts} of {JOB_RETRIES}).", "WARNING")
            else:
                return outcome

    def _queue(self) -> str | None:
        """JOB_STATE_QUEUED for ``queue_seconds`` plus any ``slow_start`` (also one given meanwhile)."""
        began = time.monotonic()
        while True:
            left = began + self.ctx.queue_seconds + sum(f.duration for f in self._faults("slow_start")) \
                - time.monotonic()
            if left <= 0:
                return None
            why = self._pause(min(left, self.TICK))
            if why is not None:
                return why

    def _command(self, mount: GcsMount) -> tuple[list[str], dict[str, str], list[str]] | str:
        """argv, environment and the texts naming ``/gcs`` paths; or why the job cannot run here."""
        spec = self.job.spec()
        pool = (spec.get("workerPoolSpecs") or [{}])[0]
        container = pool.get("containerSpec")
        if container is None:
            return ("The Vertex AI emulator runs containerSpec.command (+ args) of worker pool 0 as a local "
                    "process; python_package_spec is not emulated.")
        command = list(container.get("command") or [])
        if not command:
            return ("The Vertex AI emulator pulls no image: it runs containerSpec.command (+ args) as a local "
                    f"process, and this job has no command (image {container.get('imageUri')!r}).")
        job_env = {e["name"]: e.get("value", "") for e in container.get("env") or [] if e.get("name")}
        raw = command + list(container.get("args") or [])
        texts = raw + list(job_env.values())
        ctx = self.ctx
        env = {
            "PATH": f"{shims_for(container.get('imageUri'), ctx.shims)}{os.pathsep}{os.environ.get('PATH', os.defpath)}",
            "HOME": str(self.dir / "home"), "TMPDIR": str(self.dir / "tmp"), "PYTHONUNBUFFERED": "1",
            "LANG": "C.UTF-8", "CLOUD_ML_JOB_ID": self.job.id, "CLOUD_ML_PROJECT_ID": ctx.project,
            "CLOUD_ML_REGION": ctx.location,
            "CLUSTER_SPEC": json.dumps({"cluster": {"workerpool0": [f"{REPLICA}:2222"]}, "environment": "cloud",
                                        "task": {"type": "workerpool0", "index": 0}, "job": json.dumps(spec)}),
        }
        base = ((spec.get("baseOutputDirectory") or {}).get("outputUriPrefix") or "").rstrip("/")
        if base:
            env.update(AIP_MODEL_DIR=f"{base}/model/", AIP_CHECKPOINT_DIR=f"{base}/checkpoints/",
                       AIP_TENSORBOARD_LOG_DIR=f"{base}/logs/")
        env.update(ctx.base_env)
        env.update({k: mount.rewrite(v) for k, v in job_env.items()})
        argv = [mount.rewrite(_expand(a, env)) for a in raw]
        if os.path.basename(argv[0]) in IMAGE_PYTHONS:  # other names resolve on PATH: the image's shims
            argv[0] = python_for(container.get("imageUri"))
        return argv, env, texts

    def _train(self, argv: list[str], env: dict[str, str]) -> Outcome | None:
        """One run of the replica's process."""
        ctx, job = self.ctx, self.job
        started = time.monotonic()
        try:
            proc = spawn(argv, cwd=self.dir / "home", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as exc:  # the container starts, its entrypoint does not
            job.advance("JOB_STATE_RUNNING", ctx.clock.now(), start=True)
            ctx.logs.write(job.id, f'exec: "{argv[0]}": {exc.strerror or exc}', severity="ERROR")
            return self._exited(127)
        with self._lock:
            self.proc = proc
        # RUNNING once the process exists (pid() answers); a cancel that came first is seen by the loop below
        if self.running_since is None:
            job.advance("JOB_STATE_RUNNING", ctx.clock.now(), start=True)
            self.running_since = time.monotonic()  # scheduling.timeout counts from here, across restarts
        readers = [threading.Thread(target=self._read, args=(stream, severity), daemon=True,
                                    name=f"vertex-job-{job.id}-{severity.lower()}")
                   for stream, severity in ((proc.stdout, "INFO"), (proc.stderr, "ERROR"))]
        for reader in readers:
            reader.start()
        timeout = parse_duration((job.spec().get("scheduling") or {}).get("timeout"))
        spot = (job.spec().get("scheduling") or {}).get("strategy") == "SPOT"
        outcome: Outcome | None = None
        shutdown = False
        while True:
            elapsed = time.monotonic() - started
            code = proc.poll()
            strike = next((f for f in self._faults(*F.RUNNING_KINDS) if elapsed >= f.after and not f.on_exit), None)
            if code is not None:
                outcome = self._exited(code if code >= 0 else 128 - code)
                strike = next(iter(f for f in self._faults("restart") if f.on_exit), None)
                if strike is not None:
                    outcome = self._struck(strike, spot)
            elif self._shutdown:
                shutdown = True
            elif job.cancel_requested.is_set():
                outcome = Outcome("JOB_STATE_CANCELLED", job_error("CANCELLED", F.CANCELED))
            elif timeout is not None and time.monotonic() - (self.running_since or started) >= timeout:
                # Vertex cancels a job still running after scheduling.timeout, as AI Platform Training did
                # ("If the training job is still running after this duration, AI Platform Training cancels
                # it", https://cloud.google.com/ai-platform/training/docs/reference/rest/v1/projects.jobs
                # #Scheduling); a CustomJob past its (default 7-day) timeout ends JOB_STATE_CANCELLED
                # (github.com/tensorflow/tfx/issues/6223); a cancelled CustomJob has error.code 1 (CANCELLED),
                # https://cloud.google.com/vertex-ai/docs/reference/rest/v1/projects.locations.customJobs/cancel
                outcome = Outcome("JOB_STATE_CANCELLED", job_error("CANCELLED", F.CANCELED))
            elif strike is not None:
                outcome = self._struck(strike, spot)
            else:
                self._wake.wait(self.TICK)
                self._wake.clear()
                continue
            break
        if outcome is not None and outcome.state not in ("JOB_STATE_CANCELLED", RESTART):
            failure = next(iter(self._faults("failure")), None)
            if failure is not None and code is not None:  # the fault's failure wins over the process's end
                outcome = self._struck(failure, spot)
        stop_group(proc, 0.0 if shutdown else (ctx.stop_grace_period if code is None else 0.0))
        for reader in readers:
            reader.join(5)
        return None if shutdown else outcome

    def _exited(self, exit_code: int) -> Outcome:
        if exit_code == 0:
            return Outcome("JOB_STATE_SUCCEEDED")
        message = F.NON_ZERO_EXIT.format(exit_code=exit_code, project_number=self.ctx.project_number,
                                         job_id=self.job.id)
        return Outcome("JOB_STATE_FAILED", job_error("INVALID_ARGUMENT", message), exit_code)

    def _struck(self, fault: F.Fault, spot: bool) -> Outcome:
        if fault.kind == "restart":  # once
            with self._lock:
                self.faults.remove(fault)
            return Outcome(RESTART)
        if fault.kind == "preemption":
            if spot:
                return Outcome("JOB_STATE_FAILED", job_error("RESOURCE_EXHAUSTED",
                                                             F.PREEMPTED.format(location=self.ctx.location)))
            return Outcome("JOB_STATE_FAILED", job_error("INTERNAL", fault.message or F.INTERNAL))
        error = {"code": fault.code if fault.code is not None else 13, "message": fault.message or F.INTERNAL}
        return Outcome("JOB_STATE_FAILED", error)

    def _read(self, stream: Any, severity: str) -> None:
        with stream:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                if line.strip():
                    self.ctx.logs.write(self.job.id, line, severity=severity)

    def _end(self, outcome: Outcome) -> None:
        job = self.job
        if outcome.state == "JOB_STATE_SUCCEEDED" and job.cancel_requested.is_set():
            outcome = Outcome("JOB_STATE_CANCELLED", job_error("CANCELLED", F.CANCELED))
        if outcome.error is not None and outcome.state == "JOB_STATE_FAILED":
            self._log(outcome.error["message"], "ERROR")
        self._log({"JOB_STATE_SUCCEEDED": "Job completed successfully.", "JOB_STATE_FAILED": "Job failed.",
                   "JOB_STATE_CANCELLED": "Job was cancelled."}.get(outcome.state, outcome.state),
                  "ERROR" if outcome.state == "JOB_STATE_FAILED" else "INFO")
        job.finish(outcome.state, self.ctx.clock.now(), outcome.error)


def _expand(text: str, env: dict[str, str]) -> str:
    """``$(VAR)`` from the environment (unknown ones stay), ``$$`` as ``$``: Vertex's substitution."""
    return _VAR.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)
