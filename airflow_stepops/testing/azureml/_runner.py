"""``JobRunner``: one thread per command job, doing what Azure ML's compute and common runtime do.

Per job a directory ``<workdir>/jobs/<name>/`` holds ``inputs/<input>/``, ``outputs/<output>/``,
``wd/`` (the working directory), ``home/``, ``tmp/`` and ``user_logs/std_log.txt``. The runner waits
``queue_seconds`` in ``Queued``, downloads the inputs from Azurite in ``Preparing`` (and waits
``prepare_seconds``), runs ``bash -c <command>`` in ``Running`` with ``${{inputs.x}}`` /
``${{outputs.x}}`` replaced by those directories (or the file, for ``uri_file``; the value, for
literals), uploads the outputs in ``Finalizing`` (also after a failure) and ends ``Completed``,
``Failed`` or ``Canceled``. ``python3`` on the job's ``PATH`` is this interpreter; ``python`` is missing (``testing._images``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from airflow_stepops.testing._images import shims_for
from airflow_stepops.testing._kit import JobThread, signal_group, spawn, stop_group
from airflow_stepops.testing.azureml._config import EmulatorConfig
from airflow_stepops.testing.azureml._faults import (
    JSON,
    NODE_LOST_ERROR,
    PREEMPTION_ERROR,
    RUNNING_KINDS,
    Fault,
    data_error,
    user_process_error,
)
from airflow_stepops.testing.azureml._jobs import STD_LOG, Job
from airflow_stepops.testing.azureml._logs import ARTIFACT_PREFIX, JobLog
from airflow_stepops.testing.azureml._transfer import BlobLocation, DataError, Storage
from airflow_stepops.testing.azureml._validate import OPTIONAL_PART, PLACEHOLDER, parse_timeout

logger = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What every runner shares: settings, Azurite, paths and the variables every job process gets."""

    config: EmulatorConfig
    storage: Storage
    root: Path
    shims: Path
    artifact_container: str
    base_env: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    """How the user process (or the job before it) ended: ``exited`` (``exit_code``), ``canceled`` (also
    by ``limits.timeout``), ``struck`` (a fault; ``error``), ``failed`` (``error``) or ``shutdown``."""

    kind: str
    exit_code: int | None = None
    error: JSON | None = None
    tail: list[str] = field(default_factory=list)




def resolve_command(command: str, paths: dict[str, dict[str, str]]) -> str:
    """Replace ``${{inputs.x}}``/``${{outputs.x}}`` by local paths (or values); keep a ``$[[...]]`` part,
    unwrapped, only when every input and output it names is given (Azure ML's optional-input syntax)."""
    def given(text: str) -> bool:
        return all(ref in paths[kind] for kind, ref in PLACEHOLDER.findall(text))

    command = OPTIONAL_PART.sub(lambda m: m.group(1) if given(m.group(1)) else "", command)
    return PLACEHOLDER.sub(lambda m: paths[m.group(1)][m.group(2)], command)


class JobRunner(JobThread):
    """Runs one job on its own thread; see the module docstring."""

    def __init__(self, job: Job, faults: list[Fault], ctx: RunContext, image: str | None = None) -> None:
        self.job, self.ctx, self.config = job, ctx, ctx.config
        self.image = image  # what python3 on the job's PATH is (testing._images)
        self.faults = list(faults)
        self.dir = ctx.root / job.name
        self.log: JobLog | None = None
        self._began: float | None = None  # when the user process started
        super().__init__(f"azureml-job-{job.name}")

    # ----- control (other threads) ------------------------------------------------------------------

    def strike(self, fault: Fault) -> None:
        """A ``preemption`` or ``failure`` given to the job after it was created: ``after`` seconds from now
        when it already runs, else ``after`` seconds into ``Running``."""
        began = self._began
        if began is not None:
            fault = replace(fault, after=time.monotonic() - began + fault.after)
        self.faults.append(fault)
        self._wake.set()

    def log_lines(self) -> list[str]:
        return self.log.lines() if self.log is not None else []

    # ----- the job ----------------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            outcome = self._run()
            self._finish(outcome)
        except Exception as exc:
            logger.exception("the Azure ML emulator failed running job %s", self.job.name)
            self.job.transition("Failed", error={"code": "SystemError", "message": f"The emulator failed: {exc}"})
        finally:
            self._kill()
            if self.log is not None:
                with contextlib.suppress(Exception):
                    self.log.close()

    def _stopping(self) -> str | None:
        return super()._stopping() or ("canceled" if self.job.cancel_requested else None)

    def _run(self) -> Outcome:
        job = self.job
        job.transition("Queued")
        queued = self.config.queue_seconds + sum(f.duration for f in self.faults if f.kind == "slow_start")
        reason = self._pause(queued)
        if reason:
            return Outcome(reason)
        job.transition("Preparing")
        paths = self._prepare()
        try:
            self._download_inputs(paths)
        except DataError as exc:
            return Outcome("failed", error=data_error(f"Failed to prepare the job's inputs: {exc}"))
        reason = self._pause(self.config.prepare_seconds)
        if reason:
            return Outcome(reason)
        self.log = JobLog(self.dir / STD_LOG, self.ctx.storage,
                          BlobLocation(self.ctx.artifact_container,
                                       f"{ARTIFACT_PREFIX.format(name=job.name)}/{STD_LOG}"),
                          self.config.log_flush_interval, self._log_published)
        self.log.start()
        if not job.transition("Running"):
            return Outcome("canceled")
        return self._execute(paths)

    def _log_published(self, url: str) -> None:
        with self.job.lock:
            self.job.log_url = url

    # ----- preparing ---------------------------------------------------------------------------------

    def _prepare(self) -> dict[str, dict[str, str]]:
        """Make the job's directories; the local path (or value) of every input and output."""
        request = self.job.request
        for sub in ("wd", "home", "tmp", "inputs", "outputs", "user_logs"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        paths: dict[str, dict[str, str]] = {"inputs": {}, "outputs": {}}
        for name, spec in (request.get("inputs") or {}).items():
            if spec["jobInputType"] == "literal":
                paths["inputs"][name] = spec["value"]
            else:
                paths["inputs"][name] = str(self.dir / "inputs" / name)
        for name, spec in (request.get("outputs") or {}).items():
            folder = self.dir / "outputs" / name
            folder.mkdir(parents=True, exist_ok=True)
            if spec["jobOutputType"] == "uri_file":
                base = spec["uri"].rstrip("/").rsplit("/", 1)[-1] or name
                paths["outputs"][name] = str(folder / base)
            else:
                paths["outputs"][name] = str(folder)
        return paths

    def _download_inputs(self, paths: dict[str, dict[str, str]]) -> None:
        storage = self.ctx.storage
        for name, spec in (self.job.request.get("inputs") or {}).items():
            if spec["jobInputType"] == "literal":
                continue
            location = storage.locate(spec["uri"])
            dest = self.dir / "inputs" / name
            if spec["jobInputType"] == "uri_file":
                paths["inputs"][name] = str(storage.download_file(location, dest))
            else:
                storage.download_folder(location, dest)
        for name, spec in (self.job.request.get("outputs") or {}).items():
            # a read-write mount shows what already is at its path (e.g. an earlier try's checkpoints)
            if spec.get("jobOutputType") == "uri_folder" and spec.get("mode", "ReadWriteMount") == "ReadWriteMount":
                try:
                    storage.download_folder(storage.locate(spec["uri"]), self.dir / "outputs" / name)
                except Exception:
                    logger.debug("nothing to show in output %s of job %s", name, self.job.name, exc_info=True)

    # ----- running -----------------------------------------------------------------------------------

    def _command(self, paths: dict[str, dict[str, str]]) -> tuple[str, dict[str, str]]:
        request, job, config = self.job.request, self.job, self.config
        command = resolve_command(request["command"], paths)
        sub, rg, ws = config.subscription_id, config.resource_group, config.workspace_name
        env = {
            "PATH": f"{shims_for(self.image, self.ctx.shims)}{os.pathsep}{os.environ.get('PATH', '/usr/local/bin:/usr/bin:/bin')}",
            "HOME": str(self.dir / "home"), "TMPDIR": str(self.dir / "tmp"), "PYTHONUNBUFFERED": "1",
            "LANG": "C.UTF-8",
            "AZUREML_RUN_ID": job.name, "AZUREML_ROOT_RUN_ID": job.name,
            "AZUREML_ARM_SUBSCRIPTION": sub, "AZUREML_ARM_RESOURCEGROUP": rg, "AZUREML_ARM_WORKSPACE_NAME": ws,
            "AZUREML_ARM_PROJECT_NAME": request.get("experimentName", "Default"),
            "AZUREML_EXPERIMENT_NAME": request.get("experimentName", "Default"),
            "AZUREML_CR_EXECUTION_WORKING_DIR_PATH": str(self.dir / "wd"),
            "AZUREML_NODE_COUNT": str((request.get("resources") or {}).get("instanceCount", 1)),
            **self.ctx.base_env,
        }
        for name, value in paths["inputs"].items():
            env[f"AZURE_ML_INPUT_{name}"] = value
        for name, value in paths["outputs"].items():
            env[f"AZURE_ML_OUTPUT_{name}"] = value
        env.update(config.env)
        env.update(request.get("environmentVariables") or {})
        return command, env

    def _execute(self, paths: dict[str, dict[str, str]]) -> Outcome:
        command, env = self._command(paths)
        limits = self.job.request.get("limits") or {}
        timeout = parse_timeout(limits["timeout"]) if limits.get("timeout") is not None else None
        assert self.log is not None
        self.proc = spawn(["bash", "-c", command], cwd=self.dir / "wd", env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        reader = threading.Thread(target=_read, args=(self.proc, self.log), daemon=True)
        reader.start()
        began = self._began = time.monotonic()
        outcome: Outcome | None = None
        while outcome is None:
            strike = next((f for f in self.faults if f.kind in RUNNING_KINDS), None)
            code = self.proc.poll()
            elapsed = time.monotonic() - began
            if code is not None:
                outcome = Outcome("exited", exit_code=code)
            elif self._shutdown:
                return Outcome("shutdown")
            elif self.job.cancel_requested:
                self._terminate()
                outcome = Outcome("canceled")
            elif timeout is not None and elapsed >= timeout:
                # "the max run duration ..., after which the job will be cancelled" (CommandJobLimits,
                # https://learn.microsoft.com/en-us/rest/api/azureml/jobs/create-or-update#commandjoblimits)
                self.job.transition("CancelRequested")
                self._terminate()
                outcome = Outcome("canceled")
            elif strike is not None and elapsed >= strike.after:
                self._terminate()
                outcome = Outcome("struck", error=self._strike_error(strike))
            else:
                self._wake.wait(self.TICK)
                self._wake.clear()
        signal_group(self.proc.pid, signal.SIGKILL)  # what the process left behind goes with the node
        reader.join(5)
        if outcome.kind == "exited" and strike is not None and strike.kind == "failure":
            outcome = Outcome("struck", error=strike.failure_error())  # ended sooner: fails all the same
        outcome.tail = self.log.lines()[-50:]
        return outcome

    def _strike_error(self, fault: Fault) -> JSON:
        if fault.kind == "failure":
            return fault.failure_error()
        return dict(PREEMPTION_ERROR if self.job.spot else NODE_LOST_ERROR)

    def _terminate(self) -> None:
        """SIGTERM to the process group, SIGKILL when ``stop_grace_period`` passes without it ending."""
        assert self.proc is not None
        stop_group(self.proc, self.config.stop_grace_period, abort=lambda: self._shutdown)

    # ----- the end ------------------------------------------------------------------------------------

    def _finish(self, outcome: Outcome) -> None:
        job = self.job
        if outcome.kind == "shutdown":
            return
        if outcome.kind == "canceled" or (job.cancel_requested and outcome.kind != "failed"):
            if self.log is not None:
                self.log.close()
            job.transition("Canceled")
            return
        if outcome.kind == "failed":  # before the process ran: nothing to upload
            job.transition("Failed", error=outcome.error)
            return
        job.transition("Finalizing")
        upload_error = self._upload_outputs()
        if self.log is not None:
            self.log.close()
        if job.cancel_requested:
            job.transition("Canceled")
        elif outcome.kind == "exited" and outcome.exit_code == 0:
            if upload_error:
                job.transition("Failed", error=data_error(f"Failed to upload the job's outputs: {upload_error}"))
            else:
                job.transition("Completed")
        elif outcome.kind == "exited":
            with job.lock:
                job.exit_code = outcome.exit_code
            job.transition("Failed", error=user_process_error(job.request["command"], outcome.exit_code or 0,
                                                              outcome.tail))
        else:
            job.transition("Failed", error=outcome.error)

    def _upload_outputs(self) -> str | None:
        """Upload every output; the first problem, if any (the rest are still tried)."""
        problem = None
        storage = self.ctx.storage
        for name, spec in (self.job.request.get("outputs") or {}).items():
            folder = self.dir / "outputs" / name
            try:
                location = storage.locate(spec["uri"])
                if spec["jobOutputType"] == "uri_file":
                    files = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
                    if files:
                        storage.upload_file(files[0], location)
                else:
                    storage.upload_folder(folder, location)
            except Exception as exc:
                logger.warning("could not upload output %s of job %s", name, self.job.name, exc_info=True)
                problem = problem or f"output {name}: {exc}"
        return problem


def _read(proc: subprocess.Popen[bytes], log: JobLog) -> None:
    assert proc.stdout is not None
    with proc.stdout:
        while chunk := os.read(proc.stdout.fileno(), 65536):
            log.add(chunk)
