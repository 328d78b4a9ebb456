"""``CallRunner``: one thread per function call, doing what Modal's scheduler and worker do with its input.

The input is queued (``pending``, no task) for ``queue_seconds`` plus any ``slow_start``, and until a GPU
of one of the function's ranked types has capacity (see ``no_capacity``; ``any`` is granted the first of
L4, A10, T4 that has). Then it runs on a new task (``ta-...``): ``sys.executable -m
airflow_stepops.testing.modal._container <attempt dir>`` as its own process group, in
``<workdir>/calls/<call id>/<task id>/`` (``home/`` is its cwd, ``tmp/`` its TMPDIR). No image is built or
pulled: the process runs this interpreter, with the emulator's ``sys.path`` prepended to PYTHONPATH, standing
in for Modal mounting the local source a function is pickled by reference from.

Volumes: each task gets a copy of every mounted volume's committed state (``mounts/<volume id>/`` in its
directory; see ``_volumes``); nothing can mount at the function's mount path on this host, so the container
entrypoint rewrites that path to the copy in the call's string arguments (also inside lists, tuples and
dicts), as ``/gcs/`` is rewritten for the Vertex emulator. The task's changes are committed to the volume
every ``volume_commit_interval`` seconds while it runs (Modal's background commits) and when its process
exits, by itself or within the stop grace period after SIGTERM (Modal's commit on container exit); a process
that has to be killed with SIGKILL, and an emulator that stops, commit nothing more.

Environment: the host's, minus every ``STEPOPS_*`` variable (the host's step-operator settings must not
leak), plus the function's secrets, then Modal's reserved variables: MODAL_TASK_ID, MODAL_ENVIRONMENT,
MODAL_REGION (the first requested region, else ``us-east``), MODAL_CLOUD_PROVIDER (``CLOUD_PROVIDER_<CLOUD>``,
AWS when none was asked for), MODAL_IMAGE_ID and, with a GPU, MODAL_GPU (the type granted). MODAL_IS_REMOTE
is not set, so Modal clients inside keep using the host's token. Stdout and stderr lines become log entries
as they are read; the service adds system lines (container start, timeout, cancel, preemption).

Ends: the container's result; past the function's ``timeout`` the group is killed (SIGTERM, SIGKILL after
``stop_grace_period``) and the input ends GENERIC_STATUS_TIMEOUT; a cancel kills it the same way and ends it
GENERIC_STATUS_TERMINATED; a process that exits without a result ends GENERIC_STATUS_FAILURE.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modal._utils.blob_utils import MAX_ASYNC_OBJECT_SIZE_BYTES, MAX_OBJECT_SIZE_BYTES
from modal_proto import api_pb2

from airflow_stepops.runtime.protocol import Env
from airflow_stepops.testing._kit import JobThread, spawn, stop_group
from airflow_stepops.testing.modal import _faults as F
from airflow_stepops.testing.modal._blobs import BlobStore
from airflow_stepops.testing.modal._calls import STATE_OF_STATUS, Call
from airflow_stepops.testing.modal._ids import new_id
from airflow_stepops.testing.modal._limits import ANY_GPU_ORDER
from airflow_stepops.testing.modal._logs import STDERR, STDOUT, SYSTEM, LogStore
from airflow_stepops.testing.modal._objects import Registry
from airflow_stepops.testing.modal._volumes import VolumeMount

logger = logging.getLogger(__name__)

GR = api_pb2.GenericResult
CONTAINER_MODULE = "airflow_stepops.testing.modal._container"


@dataclass
class RunContext:
    """What every runner shares: settings and the emulator's stores."""

    registry: Registry
    blobs: BlobStore
    logs: LogStore
    calls_root: Path
    stop_grace_period: float
    queue_seconds: float
    blocked_gpus: Callable[[], set[str]]  # GPU types without capacity right now
    #: seconds between background commits of volume changes, read as a task runs (None: only on exit)
    commit_interval: Callable[[], float | None] = lambda: 5.0


@dataclass
class Outcome:
    """How an attempt ended: the call's end state and result, or ``restart`` (a preempted input runs again)."""

    state: str
    result: Any = None
    data_format: int = api_pb2.DATA_FORMAT_PICKLE
    exit_code: int | None = None


@dataclass
class _Strike:
    fault: F.Fault
    given_at: float


class CallRunner(JobThread):
    """Runs one function call on its own thread; see the module docstring."""

    def __init__(self, call: Call, ctx: RunContext, faults: list[F.Fault]) -> None:
        self.call, self.ctx = call, ctx
        now = time.monotonic()
        self._strikes = [_Strike(f, now) for f in faults]
        self._lock = threading.Lock()
        super().__init__(f"modal-call-{call.id}")

    # ----- control (other threads) ----------------------------------------------------------------

    def strike(self, fault: F.Fault) -> None:
        """Give the live call a fault (``after`` counts from now or from when its attempt started, the later)."""
        with self._lock:
            self._strikes.append(_Strike(fault, time.monotonic()))
        self._wake.set()

    def _faults(self, *kinds: str) -> list[_Strike]:
        with self._lock:
            return [s for s in self._strikes if s.fault.kind in kinds]

    def _consume(self, strike: _Strike) -> None:
        with self._lock:
            if strike in self._strikes:
                self._strikes.remove(strike)

    # ----- the call -------------------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._run()
        except Exception as exc:
            logger.exception("the Modal emulator failed running function call %s", self.call.id)
            self.call.finish("failure", GR(status=GR.GENERIC_STATUS_INTERNAL_FAILURE,
                                           exception=f"The Modal emulator failed: {exc!r}"))
        finally:
            self._kill()

    def _log(self, text: str, task_id: str = "") -> None:
        call = self.call
        self.ctx.logs.write(text if text.endswith("\n") else text + "\n", SYSTEM, app_id=call.app_id,
                            function_id=call.function_id, function_call_id=call.id, input_id=call.input_id,
                            task_id=task_id)

    def _stopping(self) -> str | None:
        return super()._stopping() or ("cancel" if self.call.cancel_requested.is_set() else None)

    def _run(self) -> None:
        first = True
        while True:
            chosen = self._queue(first)
            first = False
            if chosen == "shutdown":
                return
            if chosen == "cancel":
                self._end(self._cancelled(""))
                return
            assert isinstance(chosen, tuple)
            outcome = self._attempt(*chosen)
            if outcome is None:  # the emulator stops; the call keeps its state
                return
            if outcome.state == "restart":
                self.call.requeue()
                continue
            self._end(outcome)
            return

    def _queue(self, first: bool) -> tuple[api_pb2.Function, str | None, int] | str:
        """Pending: the queue time (plus ``slow_start`` the first time), then until a GPU type has capacity.
        Returns the ranked function granted, its GPU type and count; or why the wait ended."""
        began = time.monotonic()
        slow = sum(s.fault.extra_queue_seconds for s in self._faults("slow_start")) if first else 0.0
        while True:
            if first:  # a slow_start given while queued counts too
                slow = sum(s.fault.extra_queue_seconds for s in self._faults("slow_start"))
            left = began + self.ctx.queue_seconds + slow - time.monotonic()
            if left <= 0:
                break
            why = self._pause(min(left, self.TICK))
            if why is not None:
                return why
        told = False
        while True:
            chosen = self._grant()
            if chosen is not None:
                return chosen
            if not told:
                wanted = ", ".join(fn.resources.gpu_config.gpu_type for fn in self.call.ranked)
                self._log(F.NO_CAPACITY.format(gpu=wanted))
                told = True
            why = self._pause(self.TICK)
            if why is not None:
                return why

    def _grant(self) -> tuple[api_pb2.Function, str | None, int] | None:
        blocked = self.ctx.blocked_gpus()
        for fn in self.call.ranked:
            config = fn.resources.gpu_config
            if not config.count:
                return fn, None, 0
            kind = config.gpu_type.upper()
            if kind == "ANY":
                for option in ANY_GPU_ORDER:
                    if option not in blocked and "ANY" not in blocked:
                        return fn, option, config.count
                continue
            if kind not in blocked:
                return fn, kind, config.count
        return None

    def _attempt(self, fn: api_pb2.Function, gpu: str | None, count: int) -> Outcome | None:
        call, ctx = self.call, self.ctx
        task_id = new_id("ta")
        attempt = ctx.calls_root / call.id / task_id
        for sub in ("home", "tmp"):
            (attempt / sub).mkdir(parents=True, exist_ok=True)
        try:
            args = (call.function_input.args if not call.function_input.args_blob_id
                    else ctx.blobs.read(call.function_input.args_blob_id))
        except KeyError:
            return Outcome("failure", GR(status=GR.GENERIC_STATUS_FAILURE,
                                         exception=f"Input blob {call.function_input.args_blob_id} not found"))
        if fn.definition_type != api_pb2.Function.DEFINITION_TYPE_SERIALIZED:
            return Outcome("init_failure", GR(
                status=GR.GENERIC_STATUS_INIT_FAILURE,
                exception="The Modal emulator runs serialized functions only (app.function(serialized=True)); "
                          f"{fn.function_name} is defined in a file it cannot mount."))
        data_format = call.function_input.data_format or api_pb2.DATA_FORMAT_PICKLE
        outputs = list(fn.supported_output_formats)
        output_format = data_format if not outputs or data_format in outputs else outputs[0]
        (attempt / "function.pkl").write_bytes(fn.function_serialized)
        (attempt / "input.bin").write_bytes(args)
        mounts = self._mount(fn, attempt)
        (attempt / "call.json").write_text(json.dumps({
            "task_id": task_id, "input_id": call.input_id, "function_call_id": call.id,
            "data_format": data_format, "output_format": output_format,
            "mounts": {m.mount_path: str(m.local) for m in mounts}}))
        env = self._env(fn, task_id, gpu, attempt)
        resources = f"gpu={gpu}:{count}" if gpu else "cpu"
        self._log(F.STARTING.format(task_id=task_id, resources=resources), task_id)
        try:
            proc = spawn([sys.executable, "-m", CONTAINER_MODULE, str(attempt)], cwd=attempt / "home",
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as exc:
            call.start(task_id, gpu, count)
            return Outcome("init_failure", GR(status=GR.GENERIC_STATUS_INIT_FAILURE,
                                              exception=f"Container {task_id} did not start: {exc}"))
        with self._lock:
            self.proc = proc
        call.start(task_id, gpu, count)  # running once the process exists (pid() answers)
        readers = [threading.Thread(target=self._read, args=(stream, fd, task_id), daemon=True,
                                    name=f"modal-call-{call.id}-{fd}")
                   for stream, fd in ((proc.stdout, STDOUT), (proc.stderr, STDERR))]
        for reader in readers:
            reader.start()
        outcome = self._watch(proc, fn, task_id, attempt, mounts)
        for reader in readers:
            reader.join(5)
        return outcome

    def _mount(self, fn: api_pb2.Function, attempt: Path) -> list[VolumeMount]:
        """The task's copies of the function's volumes, filled with their committed state."""
        registry = self.ctx.registry
        with registry.lock:
            found = [(m, registry.volumes[m.volume_id]) for m in fn.volume_mounts if m.volume_id in registry.volumes]
        mounts = [VolumeMount(volume, m.mount_path, attempt / "mounts" / volume.id, m.read_only, m.sub_path)
                  for m, volume in found]
        for mount in mounts:
            mount.mount()
        return mounts

    def _commit(self, mounts: list[VolumeMount], task_id: str) -> None:
        for mount in mounts:
            try:
                mount.commit()
            except OSError as exc:  # as Modal's runtime: a failed commit is logged, the container goes on
                self._log(f"modal.Volume background commit failed for {mount.volume.id}. Exception: {exc}", task_id)

    def _watch(self, proc: subprocess.Popen[bytes], fn: api_pb2.Function, task_id: str,
               attempt: Path, mounts: list[VolumeMount]) -> Outcome | None:
        call, ctx = self.call, self.ctx
        started = last_commit = time.monotonic()
        background = [m for m in mounts if not m.read_only]

        def stop(grace: float) -> None:
            """SIGTERM, then SIGKILL after ``grace``: only a container that exits by itself commits on exit."""
            if stop_group(proc, grace):
                self._commit(mounts, task_id)

        while True:
            code = proc.poll()
            now = time.monotonic()
            strike = next((s for s in self._faults(*F.RUNNING_KINDS)
                           if now >= max(started, s.given_at) + s.fault.after), None)
            if code is not None:
                stop_group(proc, 0.0)  # reap what the process left behind in its group
                self._commit(mounts, task_id)
                return self._exited(code, task_id, attempt)
            if self._shutdown:
                stop_group(proc, 0.0)
                return None
            if call.cancel_requested.is_set():
                stop(ctx.stop_grace_period)
                return self._cancelled(task_id)
            if fn.timeout_secs and now - started >= fn.timeout_secs:
                message = F.TIMEOUT.format(input_id=call.input_id, timeout=fn.timeout_secs)
                self._log(F.CANCELLED_BECAUSE.format(input_id=call.input_id, reason=message), task_id)
                stop(ctx.stop_grace_period)
                return Outcome("timeout", GR(status=GR.GENERIC_STATUS_TIMEOUT, exception=message),
                               exit_code=_exit_code(proc.returncode))
            if strike is not None:
                self._consume(strike)
                stop(ctx.stop_grace_period)
                return self._struck(strike.fault, task_id, proc)
            interval = ctx.commit_interval()
            if background and interval is not None and now - last_commit >= interval:
                self._commit(background, task_id)
                last_commit = time.monotonic()
            self._wake.wait(self.TICK)
            self._wake.clear()

    def _struck(self, fault: F.Fault, task_id: str, proc: subprocess.Popen[bytes]) -> Outcome:
        code = _exit_code(proc.returncode)
        if fault.kind == "preemption":
            if fault.restart:
                self._log(F.PREEMPTED_RESTART, task_id)
                return Outcome("restart")
            message = F.PREEMPTED_FINAL.format(input_id=self.call.input_id)
            self._log(message, task_id)
            # as Modal reports a lost input it gives up on: a retriable internal failure (InternalFailure)
            return Outcome("terminated", GR(status=GR.GENERIC_STATUS_INTERNAL_FAILURE, exception=message),
                           exit_code=code)
        message = fault.message or F.FAILURE.format(task_id=task_id)
        self._log(message, task_id)
        return Outcome("failure", GR(status=GR.GENERIC_STATUS_FAILURE, exception=message), exit_code=code)

    def _cancelled(self, task_id: str) -> Outcome:
        message = F.CANCELLED.format(call_id=self.call.id)
        self._log(F.CANCELLED_BECAUSE.format(input_id=self.call.input_id, reason=message), task_id)
        proc = self.proc
        code = _exit_code(proc.returncode) if proc is not None and task_id else None
        return Outcome("terminated", GR(status=GR.GENERIC_STATUS_TERMINATED, exception=message), exit_code=code)

    def _exited(self, code: int, task_id: str, attempt: Path) -> Outcome:
        """The container ended by itself: its result, sized into a blob when too large to send inline."""
        exit_code = _exit_code(code)
        path = attempt / "result.pkl"
        if not path.is_file():
            message = F.EXITED.format(task_id=task_id, code=exit_code)
            self._log(message, task_id)
            return Outcome("failure", GR(status=GR.GENERIC_STATUS_FAILURE, exception=message), exit_code=exit_code)
        packed = pickle.loads(path.read_bytes())
        result = GR(status=packed["status"], exception=packed.get("exception", ""),
                    traceback=packed.get("traceback", ""), serialized_tb=packed.get("serialized_tb", b""),
                    tb_line_cache=packed.get("tb_line_cache", b""))
        data: bytes = packed.get("data", b"")
        if len(data) > self._inline_limit():
            result.data_blob_id = self.ctx.blobs.put(data)
        elif data:
            result.data = data
        return Outcome(STATE_OF_STATUS.get(result.status, "failure"), result, packed.get("data_format", 1), exit_code)

    def _inline_limit(self) -> int:
        """As the container's IO manager: a spawned call's results go to blobs above the async limit."""
        if self.call.invocation_type == api_pb2.FUNCTION_CALL_INVOCATION_TYPE_ASYNC:
            return min(MAX_OBJECT_SIZE_BYTES, MAX_ASYNC_OBJECT_SIZE_BYTES)
        return MAX_OBJECT_SIZE_BYTES

    def _end(self, outcome: Outcome) -> None:
        self.call.finish(outcome.state, outcome.result, outcome.data_format, outcome.exit_code)

    def _read(self, stream: Any, fd: int, task_id: str) -> None:
        call = self.call
        with stream:
            for raw in iter(stream.readline, b""):
                self.ctx.logs.write(raw.decode("utf-8", errors="replace"), fd, app_id=call.app_id,
                                    function_id=call.function_id, function_call_id=call.id,
                                    input_id=call.input_id, task_id=task_id)

    def _env(self, fn: api_pb2.Function, task_id: str, gpu: str | None, attempt: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(Env.PREFIX)}
        paths = [p for p in sys.path if p and os.path.isdir(p)]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", TMPDIR=str(attempt / "tmp"))
        with self.ctx.registry.lock:
            for secret_id in fn.secret_ids:
                secret = self.ctx.registry.secrets.get(secret_id)
                if secret is not None:
                    env.update(secret.env)
        regions = list(fn.scheduler_placement.regions)
        cloud = (fn.cloud_provider_str or "aws").upper()
        env.update(MODAL_TASK_ID=task_id, MODAL_ENVIRONMENT=self.call.environment,
                   MODAL_REGION=regions[0] if regions else "us-east", MODAL_CLOUD_PROVIDER=f"CLOUD_PROVIDER_{cloud}",
                   MODAL_IMAGE_ID=fn.image_id)
        env.pop("MODAL_GPU", None)
        if gpu:
            env["MODAL_GPU"] = gpu
        return env


def _exit_code(code: int | None) -> int | None:
    if code is None:
        return None
    return code if code >= 0 else 128 - code
