"""The kit every emulator is built on: one interface, one way to run a job's processes, one fault rule.

``Emulator`` is what tests (and the conformance harness) may rely on for any flavor:

* ``start()`` / ``stop()`` (or ``with``): ``stop()`` kills every job process group and is idempotent (a
  flavor writes ``_start``, undone by its ``_teardown`` should it fail, and owns ``workdir`` when it made it);
* ``jobs``: the jobs as the service would list them (its own JSON), ``job_id(job)`` the id of one of them,
  ``job(job_id)`` one job (KeyError when unknown);
* ``status(job_id)``: the service's own word (``JOB_STATE_RUNNING``, ``Completed``, ``success``...);
  ``state(job_id)`` the same normalised: ``running`` (anything not over, queued included), ``succeeded``,
  ``failed``, ``cancelled``, or ``gone`` when the service no longer knows the job;
* ``wait_for_state(job_id, states, timeout)``: block until the job has reached one of ``states`` (kit
  states, ``running`` meaning its process runs, or the service's own statuses; now or earlier, so a short
  status is not missed);
* ``inject(kind, job=None, after=0.0, **kw)``: a fault for the job ``job`` (striking it ``after`` seconds
  from now when it already runs) or for the next job made. Every flavor takes ``preemption`` (the capacity
  is taken back: spot reclaim, eviction) and ``failure`` (the service fails the job); the other kinds are
  the flavor's own (see its ``_faults``);
* ``pids(job_id)``: the job's live process group leaders.

``spawn`` / ``stop_group`` run a job's process in a session of its own and end it with everything it
started; ``JobThread`` is the base of each flavor's job runner, ``Fault`` and ``FaultRule`` of its faults.
"""

from __future__ import annotations

import abc
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

JSON = dict[str, Any]
STATES = ("running", "succeeded", "failed", "cancelled", "gone")
C = TypeVar("C")
R = TypeVar("R")
FT = TypeVar("FT", bound="Fault")
E = TypeVar("E", bound="Emulator")


class Emulator(abc.ABC):
    """The interface every emulator implements (see the module's docstring)."""

    #: the service's terminal statuses -> kit states; every other status is ``running``
    STATES: ClassVar[dict[str, str]] = {}
    #: kit fault kinds -> the flavor's own, where the service names them otherwise
    KINDS: ClassVar[dict[str, str]] = {}
    #: where job directories (and the rest) go; ``stop()`` removes it when ``_open_workdir`` made it
    workdir: Path | None = None
    _owns_workdir = False
    _up = False
    #: the job runners by job id, where a flavor keeps them here (guarded by ``_lock``)
    _runners: dict[str, JobThread]
    _lock: threading.Lock

    def start(self: E) -> E:
        """``_start``; when it fails, ``_teardown`` undoes what it did and the error goes on."""
        if self._up:
            raise RuntimeError("the emulator is already running")
        self._up = True
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill every job's process group, stop the servers, remove an own workdir; idempotent. Jobs keep the
        state they had."""
        self._teardown()
        self._up = False

    @abc.abstractmethod
    def _start(self) -> None: ...

    @abc.abstractmethod
    def _teardown(self) -> None:
        """Undo whatever of ``_start`` was done; idempotent."""

    def _open_workdir(self, wanted: str | os.PathLike[str] | None, flavor: str) -> Path:
        """``wanted`` (made if missing), else a new temporary directory the emulator owns."""
        if wanted:
            self.workdir = Path(wanted).resolve()
            self.workdir.mkdir(parents=True, exist_ok=True)
        else:
            self.workdir, self._owns_workdir = Path(tempfile.mkdtemp(prefix=f"stepops-{flavor}-")), True
        return self.workdir

    def _close_workdir(self) -> None:
        if self.workdir is not None and self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir, self._owns_workdir = None, False

    @staticmethod
    def _running(value: R | None) -> R:
        """``value``, a part ``start()`` makes; RuntimeError before it (or after ``stop()``)."""
        if value is None:
            raise RuntimeError("the emulator is not running")
        return value

    def _each_runner(self, method: str) -> None:
        """Call ``method`` (``wake``, ``shutdown``) of every job runner, outside the lock (they take it)."""
        with self._lock:
            runners = list(self._runners.values())
        for runner in runners:
            getattr(runner, method)()

    def _wake(self, job_id: str) -> None:
        """A cancel arrived for the job: its runner looks at it now."""
        runner = self._runners.get(job_id)
        if runner is not None:
            runner.wake()

    def __enter__(self: E) -> E:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    @abc.abstractmethod
    def jobs(self) -> list[JSON]:
        """Every job, oldest first, as the service shows it."""

    @staticmethod
    @abc.abstractmethod
    def job_id(job: JSON) -> str:
        """The id a job of ``jobs`` is known by (what ``job``, ``state``, ``inject`` and ``pids`` take)."""

    @property
    def job_ids(self) -> list[str]:
        return [self.job_id(j) for j in self.jobs]

    @abc.abstractmethod
    def job(self, job_id: str) -> JSON:
        """One job as the service shows it; KeyError when unknown."""

    @abc.abstractmethod
    def status(self, job_id: str) -> str:
        """The job's status in the service's own words; KeyError when unknown."""

    def history(self, job_id: str) -> list[str]:
        """The statuses the job went through, the current one last."""
        return [self.status(job_id)]

    def error(self, job_id: str) -> Any:
        """What the service says about why the job ended (None when nothing)."""
        return None

    def state(self, job_id: str) -> str:
        """``running``, ``succeeded``, ``failed``, ``cancelled`` or ``gone``."""
        try:
            return self.STATES.get(self.status(job_id), "running")
        except KeyError:
            return "gone"

    def wait_for_state(self, job_id: str, states: str | Iterable[str], timeout: float = 30.0) -> JSON:
        """Block until the job has reached one of ``states``: the service's own statuses, or kit states (``running``
        meaning its process runs, not just queued). Its history counts, so a status shorter than the poll is
        not missed; AssertionError if it ends in another, TimeoutError after ``timeout``. A job not there yet
        is waited for. Returns the job as it is now."""
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        while True:
            try:
                seen = self.history(job_id)
            except KeyError:
                seen = None
                if "gone" in wanted:
                    return {}
            if seen is not None:
                ended = {self.STATES[s] for s in seen if s in self.STATES}
                if wanted & {*seen, *ended} or ("running" in wanted and self.pids(job_id)):
                    return self.job(job_id)
                if seen[-1] in self.STATES:
                    raise AssertionError(f"job {job_id} ended {seen[-1]} before reaching {sorted(wanted)}: "
                                         f"{self.error(job_id)}")
            if time.monotonic() > deadline:
                now = seen[-1] if seen else "absent"
                raise TimeoutError(f"job {job_id} did not reach {sorted(wanted)} within {timeout}s (it is {now})")
            time.sleep(0.02)

    @abc.abstractmethod
    def inject(self, kind: str, job: str | None = None, after: float = 0.0, **kw: Any) -> FaultRule:
        """A fault for the job ``job`` (struck ``after`` seconds from now when it runs), or for the next job."""

    def _kind(self, kind: Any) -> Any:
        """The flavor's name of a kit fault kind (other kinds and Fault objects pass unchanged)."""
        return self.KINDS.get(kind, kind) if isinstance(kind, str) else kind

    def _fault(self, fault_type: type[FT], kind: FT | str, after: float, **kw: Any) -> FT:
        """A ``fault_type`` of the kind (its flavor name) and ``kw``, or the Fault given."""
        kind = self._kind(kind)
        return fault_type(kind, after=after, **kw) if isinstance(kind, str) else kind

    @abc.abstractmethod
    def pids(self, job_id: str) -> list[int]:
        """The job's live processes (process group leaders), empty when none runs."""

    def pid(self, job_id: str) -> int | None:
        """The job's live process, None when none runs."""
        return next(iter(self.pids(job_id)), None)


# ----- process groups ---------------------------------------------------------------------------------


def spawn(argv: list[str], **popen: Any) -> subprocess.Popen[bytes]:
    """Start a job's process in a session (and process group) of its own, stdin closed."""
    popen.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen(argv, start_new_session=True, **popen)


def signal_group(pid: int, sig: int) -> None:
    """Signal the process group led by ``pid``; nothing when it is gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def stop_group(proc: subprocess.Popen[bytes], grace: float = 0.0, *,
               abort: Callable[[], bool] = lambda: False) -> bool:
    """SIGTERM to the process group, SIGKILL after ``grace`` seconds (at once without one, or as soon as
    ``abort()`` says so); then reap the process. The SIGKILL goes to the group in any case, so what the
    process left behind dies with it. True when the process had exited before the SIGKILL."""
    if grace > 0 and proc.poll() is None:
        signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while proc.poll() is None and time.monotonic() < deadline and not abort():
            time.sleep(0.02)
    exited = proc.poll() is not None
    signal_group(proc.pid, signal.SIGKILL)
    proc.wait()
    return exited


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(argv: Callable[[int], list[str]], port: int, log: Path, ready: Callable[[int], bool], what: str,
                 timeout: float = 30.0) -> tuple[subprocess.Popen[bytes], int]:
    """Start a server program (``argv(port)``, in a group of its own, output appended to ``log``) on ``port``, or
    on a free one in up to three tries (a free port can be taken before the server binds it); the process and
    its port once ``ready(port)``. End it with ``stop_group``."""
    for _attempt in range(1 if port else 3):
        chosen = port or free_port()
        with open(log, "ab") as out:
            proc = spawn(argv(chosen), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if ready(chosen):
                return proc, chosen
            time.sleep(0.05)
        stop_group(proc, grace=5)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise RuntimeError(f"{what} did not start on 127.0.0.1:{chosen}:\n{tail}")


class JobThread:
    """One job run on a thread of its own (``_main``), which other threads wake (a cancel arrived) or shut down
    (the emulator stops: the job's process group is killed at once, the job keeps its state)."""

    #: the longest the thread sleeps before it looks at the job again
    TICK = 0.05

    def __init__(self, name: str) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self._wake = threading.Event()
        self._shutdown = False
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def wake(self) -> None:
        """Look at the job again now."""
        self._wake.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._shutdown = True
        self._wake.set()
        self._kill()
        proc = self.proc
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)  # reaped: no zombie outlives the emulator
        self.thread.join(timeout)

    def pids(self) -> list[int]:
        proc = self.proc
        return [proc.pid] if proc is not None and proc.poll() is None else []

    def _main(self) -> None:
        raise NotImplementedError

    def _kill(self) -> None:
        proc = self.proc
        if proc is not None:
            signal_group(proc.pid, signal.SIGKILL)

    def _stopping(self) -> str | None:
        """Why the job must stop waiting (``shutdown``: the emulator stops; a flavor adds its cancel), or None."""
        return "shutdown" if self._shutdown else None

    def _pause(self, seconds: float) -> str | None:
        """Sleep ``seconds`` unless the job must stop first (then ``_stopping``'s reason)."""
        end = time.monotonic() + seconds
        while True:
            reason = self._stopping()
            if reason is not None:
                return reason
            left = end - time.monotonic()
            if left <= 0:
                return None
            self._wake.wait(min(left, self.TICK))
            self._wake.clear()


# ----- settings and faults ----------------------------------------------------------------------------


def configured(config: C, settings: Mapping[str, Any]) -> C:
    """``config`` (a dataclass) with ``settings`` replaced; TypeError naming any that is not one of its fields."""
    unknown = set(settings) - {f.name for f in fields(config)}  # type: ignore[arg-type]
    if unknown:
        raise TypeError(f"unknown emulator settings {sorted(unknown)}")
    return replace(config, **settings)  # type: ignore[type-var]


def take_request_fault(faults: Iterable[Any], matches: Callable[[Any], bool], uses: str = "times") -> Any:
    """The first request fault not used up (its ``uses`` field counts the requests left, None: no end) that
    ``matches`` the request, one use taken and counted in its ``hits``; None when there is none."""
    for fault in faults:
        left = getattr(fault, uses)
        if (left is None or left > 0) and matches(fault):
            if left is not None:
                setattr(fault, uses, left - 1)
            fault.hits += 1
            return fault
    return None


class _Faulted(Protocol):
    lock: Any
    faults: list[Any]


def add_fault(server: _Faulted, fault: R) -> R:
    """Queue a request fault on a server (under its lock); the fault, to watch or clear."""
    with server.lock:
        server.faults.append(fault)
    return fault


@dataclass(frozen=True)
class Fault:
    """One injected failure: ``kind`` (one of the flavor's ``KINDS``), ``after`` seconds, ``message``."""

    KINDS: ClassVar[frozenset[str]] = frozenset()

    kind: str
    after: float = 0.0
    message: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {sorted(self.KINDS)}")


@dataclass
class FaultRule:
    """A fault waiting for the jobs it matches: ``job`` one name (None: any), ``count`` jobs in all (None:
    every matching one); ``applied`` lists the jobs it went to."""

    fault: Any
    job: str | None = None
    count: int | None = 1
    applied: list[str] = field(default_factory=list)

    def matches(self, name: str, **facts: Any) -> bool:
        return self.job is None or self.job == name

    def take(self, name: str, **facts: Any) -> bool:
        """Whether the rule goes to the job ``name`` (consuming one use)."""
        if (self.count is not None and self.count <= 0) or not self.matches(name, **facts):
            return False
        if self.count is not None:
            self.count -= 1
        self.applied.append(name)
        return True

    @classmethod
    def struck(cls, fault: Any, job: str, **kw: Any) -> Any:
        """The record of a fault given at once to the job ``job`` (nothing left to take)."""
        return cls(fault, job, 0, [job], **kw)


def take_faults(rules: Iterable[FaultRule], name: str, accept: Callable[[Any], bool] = lambda fault: True,
                **facts: Any) -> list[Any]:
    """The faults of the rules (those ``accept`` takes) that go to a new job, in registration order."""
    return [rule.fault for rule in rules if accept(rule.fault) and rule.take(name, **facts)]
