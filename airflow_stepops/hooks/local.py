"""The ``local`` flavor: each step is a detached process on the worker host, supervised by
``runtime/local_launcher.py``. Re-attach finds a job by its deterministic directory."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

from airflow_stepops.artifacts import local_path, store_path
from airflow_stepops.bundle import StepIdentity
from airflow_stepops.exceptions import StepFailedError, StepOperatorConfigError
from airflow_stepops.hooks.base import JobHandle, JobState, JobStatus, StepOperatorHook, StepSpec, with_queue_limit
from airflow_stepops.prices import Price, resource_price
from airflow_stepops.runtime import local_launcher, protocol
from airflow_stepops.runtime.protocol import Env
from airflow_stepops.settings.local import LocalStepOperatorConfig, LocalStepOperatorSettings

LAUNCHER = os.path.abspath(local_launcher.__file__)
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                   "VECLIB_MAXIMUM_THREADS", "RAYON_NUM_THREADS", "TF_NUM_INTRAOP_THREADS")
# Only these pass from the worker's environment: the worker's own secrets never reach a step.
INHERITED_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "LD_LIBRARY_PATH",
                 "CUDA_HOME", "CUDA_PATH", "VIRTUAL_ENV", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")
MAX_LOG_LINES_PER_READ = 2000
#: a job directory without spec.json younger than this may belong to a submitter still at work
HALF_MADE_GRACE_SECONDS = 600
#: a job whose launcher has not recorded itself this long after spec.json was written never started
LAUNCHER_START_TIMEOUT_SECONDS = 120


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_mib: int
    uuid: str


def gpu_matches(gpu: GpuInfo, wanted: str) -> bool:
    """Whether an ``nvidia-smi`` GPU is of the canonical ``gpu_type`` asked for."""
    name = gpu.name.upper()
    if wanted == "A100-80GB":
        return "A100" in name and gpu.memory_mib >= 70_000
    if wanted == "A100":
        return "A100" in name
    return re.search(rf"(?<![A-Z0-9]){re.escape(wanted)}(?![A-Z0-9])", name) is not None


def discover_gpus(nvidia_smi: str) -> list[GpuInfo]:
    exe = shutil.which(nvidia_smi)
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index,name,memory.total,uuid", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    gpus = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 4 and parts[0].isdigit():
            memory = int(float(parts[2])) if re.match(r"^\d+(\.\d+)?$", parts[2]) else 0
            gpus.append(GpuInfo(int(parts[0]), parts[1], memory, parts[3]))
    return gpus


@lru_cache(maxsize=32)
def _python_info(python: str, mtime: float) -> dict[str, Any]:
    probe = ("import sys, json, importlib.util; print(json.dumps({'version': list(sys.version_info[:3]), "
             "'cloudpickle': importlib.util.find_spec('cloudpickle') is not None}))")
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mtime(path: str) -> float | None:
    try:
        return os.path.getmtime(path)
    except OSError:
        return None


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


class LocalStepOperatorHook(StepOperatorHook):
    """Runs steps as detached local processes with CPU, memory and GPU limits applied."""

    flavor: ClassVar[str] = "local"
    default_poll_interval: ClassVar[float] = 0.5
    min_poll_interval: ClassVar[float] = 0.02

    config: LocalStepOperatorConfig  # type: ignore[assignment]

    @property
    def jobs_dir(self) -> str:
        if self.config.jobs_dir:
            return os.path.abspath(os.path.expanduser(self.config.jobs_dir))
        from airflow_stepops._compat import airflow_home

        return os.path.join(airflow_home(), "stepops", "local", "jobs")

    def job_dir(self, identity: StepIdentity) -> str:
        return os.path.join(self.jobs_dir, identity.job_name(max_length=120, allowed=r"[^a-z0-9_.-]"))

    # ---- preparing a launch -----------------------------------------------------------------
    def python_executable(self) -> str:
        python = self.config.python or sys.executable
        resolved = shutil.which(python) if not os.path.isabs(python) else python
        if not resolved or not os.path.exists(resolved):
            raise StepOperatorConfigError(
                f"connection {self.step_operator_conn_id!r} extra.python: interpreter {python!r} not found"
            )
        return resolved

    def check_python(self, python: str) -> None:
        """Refuse an interpreter that cannot load the bundle, before anything is started."""
        if python == sys.executable:
            return
        try:
            info = _python_info(python, os.path.getmtime(python))
        except (subprocess.SubprocessError, OSError, ValueError) as exc:
            raise StepOperatorConfigError(
                f"connection {self.step_operator_conn_id!r} extra.python: cannot run {python!r}: {exc}"
            ) from exc
        want, have = sys.version_info[:2], tuple(info["version"][:2])
        if have != want:
            raise StepOperatorConfigError(
                f"connection {self.step_operator_conn_id!r} extra.python: remote Python "
                f"{have[0]}.{have[1]} ({python}) differs from the worker's Python {want[0]}.{want[1]}; "
                "cloudpickled steps need the same major.minor version on both sides"
            )
        if not info["cloudpickle"]:
            raise StepOperatorConfigError(
                f"connection {self.step_operator_conn_id!r} extra.python: {python} has no cloudpickle; "
                f"install it there ({python} -m pip install cloudpickle)"
            )

    def _running_specs(self, exclude: str | None = None) -> list[dict[str, Any]]:
        specs: list[dict[str, Any]] = []
        if not os.path.isdir(self.jobs_dir):
            return specs
        retention = self.config.job_retention_days * 86400
        now = time.time()
        for name in os.listdir(self.jobs_dir):
            job_dir = os.path.join(self.jobs_dir, name)
            if job_dir == exclude:
                continue
            finished_at = _mtime(os.path.join(job_dir, "status.json"))
            if finished_at is not None:
                if retention and now - finished_at > retention:  # keep the jobs directory bounded
                    shutil.rmtree(job_dir, ignore_errors=True)
                continue
            if self._status_of_dir(job_dir).state.terminal:
                continue
            spec = _read_json(os.path.join(job_dir, "spec.json"))
            if spec:
                specs.append(spec)
        return specs

    def plan_resources(self, spec: StepSpec, job_dir: str) -> dict[str, Any]:
        """Map ResourceSettings onto this host: CPU affinity, memory limit, GPUs, disk check."""
        res = spec.resources
        plan: dict[str, Any] = {"cpu_ids": None, "memory_limit_bytes": None, "gpus": None, "env": {}}
        busy = self._running_specs(exclude=job_dir)
        if res.cpu_count is not None:
            available = sorted(os.sched_getaffinity(0))
            wanted = math.ceil(res.cpu_count)
            if wanted > len(available):
                raise StepOperatorConfigError(
                    f"resources.cpu_count={res.cpu_count:g}: this host offers {len(available)} CPU(s) to the "
                    "worker; ask for at most that many or use a bigger step operator"
                )
            load = {cpu: 0 for cpu in available}
            for other in busy:
                for cpu in other.get("cpu_ids") or []:
                    if cpu in load:
                        load[cpu] += 1
            plan["cpu_ids"] = sorted(sorted(available, key=lambda c: (load[c], c))[:wanted])
            plan["env"].update({name: str(wanted) for name in THREAD_ENV_VARS})
        if res.memory is not None:
            total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            if res.memory_bytes and res.memory_bytes > total:
                raise StepOperatorConfigError(
                    f"resources.memory={res.memory}: this host has {total / 2**30:.1f} GiB of memory; "
                    "ask for less or use a bigger step operator"
                )
            plan["memory_limit_bytes"] = res.memory_bytes
        if res.disk_size is not None:
            os.makedirs(self.jobs_dir, exist_ok=True)
            free = shutil.disk_usage(self.jobs_dir).free
            if res.disk_bytes and res.disk_bytes > free:
                raise StepOperatorConfigError(
                    f"resources.disk_size={res.disk_size}: only {free / 2**30:.1f} GiB are free under "
                    f"{self.jobs_dir}"
                )
        if res.wants_gpu:
            plan["gpus"] = self._choose_gpus(res.effective_gpu_count, res.gpu_type, busy)
            visible = ",".join(str(g) for g in plan["gpus"])
            # nvidia-smi numbers GPUs in PCI bus order; make CUDA use the same order
            plan["env"].update({"CUDA_VISIBLE_DEVICES": visible, "NVIDIA_VISIBLE_DEVICES": visible,
                                "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
        elif res.gpu_count == 0:
            plan["env"].update({"CUDA_VISIBLE_DEVICES": "", "NVIDIA_VISIBLE_DEVICES": "void"})
        return plan

    def _choose_gpus(self, count: int, gpu_type: str | None, busy: list[dict[str, Any]]) -> list[int]:
        gpus = discover_gpus(self.config.nvidia_smi)
        what = f"{count} x {gpu_type}" if gpu_type else f"{count} GPU(s)"
        if not gpus:
            raise StepOperatorConfigError(
                f"resources: {what} asked, but this host has no NVIDIA GPU ({self.config.nvidia_smi!r} "
                "not found or reports none); use a GPU host or another step operator"
            )
        matching = [g for g in gpus if gpu_type is None or gpu_matches(g, gpu_type)]
        if len(matching) < count:
            have = ", ".join(f"{g.index}: {g.name}" for g in gpus)
            raise StepOperatorConfigError(
                f"resources: {what} asked, but this host has only {len(matching)} matching "
                f"(GPUs here: {have})"
            )
        load = {g.index: 0 for g in matching}
        for other in busy:
            for index in other.get("gpus") or []:
                if index in load:
                    load[index] += 1
        return sorted(sorted(load, key=lambda i: (load[i], i))[:count])

    def _launch_spec(self, spec: StepSpec, job_dir: str) -> dict[str, Any]:
        settings = spec.settings
        assert isinstance(settings, LocalStepOperatorSettings)
        python = self.python_executable()
        self.check_python(python)
        bundle_dir = local_path(store_path(spec.bundle_uri))
        output_dir = local_path(store_path(spec.output_uri))
        if bundle_dir is None or output_dir is None:
            raise StepOperatorConfigError("artifact_store: the local flavor needs a file:// artifact store")
        plan = self.plan_resources(spec, job_dir)
        argv = [python, os.path.join(bundle_dir, protocol.BOOTSTRAP_FILE), "--bundle", bundle_dir, "--output", output_dir]
        for index, ref in enumerate(spec.refs):
            path = local_path(ref.path) or os.path.join(job_dir, protocol.staged_ref(index))
            argv += ["--ref", f"{index}={path}"]
        step_env = {**self.config.environment, **settings.environment, **plan["env"],
                    Env.FLAVOR: "local", Env.JOB_DIR: job_dir, "PYTHONUNBUFFERED": "1"}
        return {
            "python": python,
            "launcher": [python, LAUNCHER, job_dir, "--detach"],
            "argv": argv,
            "step_env": step_env,
            "cwd": job_dir,
            "cpu_ids": plan["cpu_ids"],
            "memory_limit_bytes": plan["memory_limit_bytes"],
            "limit_data_segment": not plan["gpus"],
            "gpus": plan["gpus"],
            "max_runtime_seconds": self.max_runtime(spec),
            "nice": settings.nice,
            "cancel_grace_seconds": settings.cancel_grace_period_seconds,
        }

    def max_runtime(self, spec: StepSpec) -> int | None:
        return spec.backstop(spec.settings.max_runtime_in_seconds, timeout_margin=None)  # Airflow's own host

    def price(self, spec: StepSpec) -> Price:
        """What the step reserves of this host, at the connection's prices (a host has no list price)."""
        resources = spec.resources
        return resource_price(self.prices(), spot=False, cpus=resources.cpu_count, memory_gib=resources.get_memory(),
                              gpus=resources.effective_gpu_count if resources.wants_gpu else 0,
                              gpu_type=resources.gpu_type, where=f"step operator {self.step_operator_conn_id!r}")

    def build_request(self, spec: StepSpec) -> dict[str, Any]:
        job_dir = self.job_dir(spec.identity)
        return {"job_dir": job_dir, **self._launch_spec(spec, job_dir)}

    def render(self, spec: StepSpec) -> dict[str, Any]:
        return {"flavor": "local", **{k: v for k, v in self.build_request(spec).items() if k != "launcher"}}

    # ---- lifecycle --------------------------------------------------------------------------
    def _handle(self, identity: StepIdentity, job_dir: str, output_uri: str) -> JobHandle:
        return {"flavor": "local", "job_id": os.path.basename(job_dir), "job_dir": job_dir, "host": os.uname().nodename,
                "output_uri": output_uri, "conn_id": self.step_operator_conn_id, "try_number": identity.try_number}

    def find_job(self, identity: StepIdentity) -> JobHandle | None:
        job_dir = self.job_dir(identity)
        spec = _read_json(os.path.join(job_dir, "spec.json"))
        if spec is None:
            return None
        return self._handle(identity, job_dir, spec["output_uri"])

    def submit(self, spec: StepSpec) -> JobHandle:
        launch = self.prepare(spec)
        job_dir = launch["job_dir"]
        os.makedirs(self.jobs_dir, mode=0o700, exist_ok=True)
        try:
            os.mkdir(job_dir, mode=0o700)  # atomic: exactly one submitter wins for this identity
        except FileExistsError:
            existing = self.find_job(spec.identity)
            if existing is not None:
                self.log.info("Job directory %s already exists: re-attaching", job_dir)
                return with_queue_limit(existing, spec)
            if time.time() - os.path.getmtime(job_dir) < HALF_MADE_GRACE_SECONDS:
                raise StepOperatorConfigError(
                    f"another submitter is preparing {job_dir} right now; not starting a second job"
                ) from None
            shutil.rmtree(job_dir, ignore_errors=True)  # left half-made by a submitter that died
            os.mkdir(job_dir, mode=0o700)
        for index, ref in enumerate(spec.refs):
            if local_path(ref.path) is None:
                os.makedirs(os.path.join(job_dir, "refs"), exist_ok=True)
                ref.copy_to(os.path.join(job_dir, protocol.staged_ref(index)))
        env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
        env.update(launch["step_env"])
        launcher_spec = {**{k: launch[k] for k in ("argv", "cwd", "cpu_ids", "memory_limit_bytes",
                                                    "limit_data_segment", "gpus", "max_runtime_seconds",
                                                    "nice", "cancel_grace_seconds")},
                         "env": env, "output_uri": spec.output_uri, "identity": spec.identity.__dict__,
                         "host": os.uname().nodename}
        spec_path = os.path.join(job_dir, "spec.json")
        fd = os.open(spec_path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the step env
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(launcher_spec, fh)
        os.replace(spec_path + ".tmp", spec_path)
        failure = None
        with open(os.path.join(job_dir, "launcher.log"), "wb") as launcher_log:
            try:
                proc = subprocess.Popen(launch["launcher"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=launcher_log, start_new_session=True, close_fds=True, env=env)
                if proc.wait(timeout=60) != 0:
                    failure = f"the local launcher exited with code {proc.returncode}"
            except (OSError, subprocess.TimeoutExpired) as exc:
                failure = f"the local launcher could not start: {exc}"
        if failure is not None:
            # leave a terminal status so that no retry re-attaches to a job that never ran
            local_launcher.write_json(os.path.join(job_dir, "status.json"), {
                "state": "failed", "exit_code": None, "reason": failure, "finished_at": time.time()})
            raise StepFailedError(f"{failure} (see {os.path.join(job_dir, 'launcher.log')})")
        self.log.info("Started local step in %s (cpus=%s, memory_limit=%s, gpus=%s)", job_dir,
                      launch["cpu_ids"], launch["memory_limit_bytes"], launch["gpus"])
        handle = self._handle(spec.identity, job_dir, spec.output_uri)
        return with_queue_limit(handle, spec)

    def _immutable_json(self, job_dir: str, name: str) -> dict[str, Any] | None:
        """spec.json and launcher.json never change once written: read each once per hook."""
        cache = self.__dict__.setdefault("_file_cache", {})
        key = (job_dir, name)
        if key not in cache:
            data = _read_json(os.path.join(job_dir, name))
            if data is None:
                return None
            cache[key] = data
        return cache[key]

    def _status_of_dir(self, job_dir: str) -> JobStatus:
        if not os.path.isdir(job_dir):
            return JobStatus(JobState.FAILED, f"the job directory {job_dir} no longer exists (removed or pruned)")
        status = _read_json(os.path.join(job_dir, "status.json"))
        spec = self._immutable_json(job_dir, "spec.json") or {}
        details: dict[str, Any] = {"cpu_ids": spec.get("cpu_ids"), "gpus": spec.get("gpus"),
                                   "memory_limit_bytes": spec.get("memory_limit_bytes"), "host": os.uname().nodename}
        if status is not None:
            state = {"succeeded": JobState.SUCCEEDED, "cancelled": JobState.CANCELLED}.get(
                status["state"], JobState.FAILED)
            details.update({k: status.get(k) for k in ("started_at", "finished_at", "exit_code", "peak_rss_bytes")})
            for name in ("spec.json", "launcher.json"):  # finished: nothing more to cache for this job
                self.__dict__.get("_file_cache", {}).pop((job_dir, name), None)
            details["reason"] = status["state"]
            return JobStatus(state, status.get("reason", ""), details)
        launcher = self._immutable_json(job_dir, "launcher.json")
        if launcher is None:
            written = spec.get("written_at") or _mtime(os.path.join(job_dir, "spec.json"))
            if written and time.time() - written > LAUNCHER_START_TIMEOUT_SECONDS:
                return JobStatus(JobState.FAILED, "the launcher never started (no launcher.json "
                                 f"{LAUNCHER_START_TIMEOUT_SECONDS}s after submission)", details)
            return JobStatus(JobState.QUEUED, "launcher starting", details)
        if local_launcher.process_start_time(launcher["pid"]) == launcher["start_time"]:
            child = _read_json(os.path.join(job_dir, "child.json"))
            if child:
                details["started_at"] = child.get("started_at")
            return JobStatus(JobState.RUNNING if child else JobState.QUEUED, "", details)
        # the launcher may have written status.json between our two reads
        if os.path.exists(os.path.join(job_dir, "status.json")):
            return self._status_of_dir(job_dir)
        # the supervisor is gone: never leave its step running unsupervised (a retry starts anew)
        self._kill_child_group(job_dir)
        return JobStatus(JobState.FAILED, f"the launcher (pid {launcher['pid']}) disappeared without recording "
                         "a status: the host restarted or it was killed", details)

    @staticmethod
    def _kill_child_group(job_dir: str) -> None:
        """End the step without its launcher: its process group, then whatever carries its job marker."""
        child = _read_json(os.path.join(job_dir, "child.json"))
        if child and local_launcher.process_start_time(child["pid"]) == child.get("start_time"):
            try:
                os.killpg(child["pid"], signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        local_launcher.end_step_processes(job_dir)

    @staticmethod
    def check_host(handle: JobHandle) -> None:
        """Local jobs live on one host; say so clearly instead of reporting a job as missing."""
        here = os.uname().nodename
        if handle.get("host") and handle["host"] != here:
            raise StepOperatorConfigError(
                f"local step {handle['job_id']} runs on host {handle['host']!r} but this process is on {here!r}: "
                "with the local flavor, run the triggerer and workers on the same host, or use deferrable=False"
            )

    def get_status(self, handle: JobHandle) -> JobStatus:
        self.check_host(handle)
        return self._status_of_dir(handle["job_dir"])

    async def acancel(self, handle: JobHandle) -> None:
        # ask the launcher to stop and return: it escalates to SIGKILL by itself after the grace period
        import asyncio

        await asyncio.to_thread(self.cancel, handle, wait=False)

    def cancel(self, handle: JobHandle, wait: bool = True) -> None:
        """Stop the step: SIGTERM through its launcher (SIGKILL after the grace period). With ``wait``
        return only once the job has a terminal status."""
        job_dir = handle["job_dir"]
        if os.path.exists(os.path.join(job_dir, "status.json")):
            return
        launcher = _read_json(os.path.join(job_dir, "launcher.json"))
        spec = _read_json(os.path.join(job_dir, "spec.json")) or {}
        grace = float(spec.get("cancel_grace_seconds", 10))
        if launcher and local_launcher.process_start_time(launcher["pid"]) == launcher["start_time"]:
            try:
                os.kill(launcher["pid"], signal.SIGTERM)
            except ProcessLookupError:  # it just finished
                return
            if not wait:
                self.log.info("Asked the launcher of %s to stop the step", job_dir)
                return
            deadline = time.monotonic() + grace + 5
            while time.monotonic() < deadline and not os.path.exists(os.path.join(job_dir, "status.json")):
                time.sleep(0.1)
            if os.path.exists(os.path.join(job_dir, "status.json")):
                self.log.info("Stopped local step in %s", job_dir)
                return
        # launcher not started yet, gone or stuck: record the cancel (a launcher that starts later sees
        # it and does not run the step) and take the step's process group down directly
        local_launcher.write_json(os.path.join(job_dir, "status.json"), {
            "state": "cancelled", "exit_code": None, "reason": "the step was stopped on request",
            "finished_at": time.time()})
        self._kill_child_group(job_dir)

    def read_logs(self, handle: JobHandle, cursor: Any) -> tuple[list[str], Any]:
        path = os.path.join(handle["job_dir"], "step.log")
        offset = int(cursor or 0)
        final = os.path.exists(os.path.join(handle["job_dir"], "status.json"))  # before reading: no torn tail
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                data = fh.read(4 << 20)
        except OSError:
            return [], offset
        # only complete lines until the job is over; \n only (progress bars redraw with \r)
        end = len(data) if final else data.rfind(b"\n") + 1
        if end == 0:
            return [], offset
        pieces = data[:end].split(b"\n")
        if data[:end].endswith(b"\n"):
            pieces.pop()
        lines: list[str] = []
        consumed = 0
        for piece in pieces[:MAX_LOG_LINES_PER_READ]:
            consumed = min(consumed + len(piece) + 1, end)
            lines.append(piece.decode("utf-8", errors="replace").rstrip("\r").rsplit("\r", 1)[-1])
        return lines, offset + consumed

    async def aread_logs(self, handle: JobHandle, cursor: Any) -> tuple[list[str], Any]:
        # a stat is enough to know there is nothing new; only real reads go to a thread
        try:
            size = os.stat(os.path.join(handle["job_dir"], "step.log")).st_size
        except OSError:
            return [], cursor
        if size <= int(cursor or 0):
            return [], cursor
        return await super().aread_logs(handle, cursor)

    async def aget_statuses(self, handles: list[JobHandle]) -> list[JobStatus | BaseException]:
        import asyncio

        # one thread hop for the whole batch; a broken job yields its own error, not everyone's
        def batch() -> list[JobStatus | BaseException]:
            out: list[JobStatus | BaseException] = []
            for handle in handles:
                try:
                    out.append(self.get_status(handle))
                except Exception as exc:
                    out.append(exc)
            return out

        return await asyncio.to_thread(batch)
