"""``ModalEmulator``: the grpclib API server and the blob server on one event loop thread, and call runners."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import threading
from pathlib import Path
from typing import Any, ClassVar

from aiohttp import web
from grpclib.const import Status
from grpclib.server import Server

from airflow_stepops.testing._kit import Emulator, add_fault, take_faults
from airflow_stepops.testing._loop_thread import LoopThread, serve_app
from airflow_stepops.testing.modal import _faults as F
from airflow_stepops.testing.modal._blobs import BlobStore
from airflow_stepops.testing.modal._calls import Call, CallStore
from airflow_stepops.testing.modal._logs import SYSTEM, LogQuery, LogStore
from airflow_stepops.testing.modal._objects import DEFAULT_ENVIRONMENT, Registry
from airflow_stepops.testing.modal._runner import CallRunner, RunContext
from airflow_stepops.testing.modal._server import ModalServicer

JSON = dict[str, Any]


class ModalEmulator(Emulator):
    """Modal's control plane (gRPC) and blob storage (HTTP) on 127.0.0.1; function calls run as local processes.

    Use it as a context manager (or ``start()`` / ``stop()``) and point the ``modal`` client at it with
    ``env()`` (``MODAL_SERVER_URL``, ``MODAL_TOKEN_ID``, ``MODAL_TOKEN_SECRET``, ``MODAL_ENVIRONMENT``), or
    Airflow with ``airflow_connection()``.

    stop_grace_period: seconds between SIGTERM and SIGKILL when a call is cancelled, times out or is
        preempted.
    queue_seconds: how long an input stays pending (queued, no task) before it runs.
    workdir: where call directories and volumes go (``<workdir>/calls/<call id>/<task id>/``,
        ``<workdir>/volumes/<environment>/<name>/``, ``<workdir>/blobs/``); default a temporary one removed by
        ``stop()``.
    port / blob_port: the gRPC and blob servers' ports on 127.0.0.1 (default free ones).
    token_id / token_secret: the one token accepted (default random ``ak-...`` / ``as-...``).
    multipart_threshold / part_size: blobs larger than the threshold are uploaded in parts of ``part_size``.
    volume_commit_interval: seconds between the background commits of a running task's volume changes (Modal
        commits "every few seconds"); None: only when the container exits. Read as tasks run: it can be changed
        while the emulator serves.
    """

    STATES: ClassVar[dict[str, str]] = {"success": "succeeded", "failure": "failed", "terminated": "cancelled",
                                        "timeout": "failed", "init_failure": "failed"}

    def __init__(self, stop_grace_period: float = 2.0, queue_seconds: float = 0.2,
                 workdir: str | Path | None = None, *, port: int = 0, blob_port: int = 0,
                 token_id: str | None = None, token_secret: str | None = None,
                 multipart_threshold: int = 4 * 1024 * 1024, part_size: int = 2 * 1024 * 1024,
                 volume_commit_interval: float | None = 5.0) -> None:
        self.stop_grace_period, self.queue_seconds = stop_grace_period, queue_seconds
        self.volume_commit_interval = volume_commit_interval
        self.token_id = token_id or f"ak-{secrets.token_hex(10)}"
        self.token_secret = token_secret or f"as-{secrets.token_hex(16)}"
        self.multipart_threshold, self.part_size = multipart_threshold, part_size
        self._wanted_workdir = workdir
        self._wanted_port, self._wanted_blob_port = port, blob_port
        self.port = self.blob_port = 0
        self._lock = threading.Lock()
        self._runners: dict[str, CallRunner] = {}
        self._rules: list[F.FaultRule] = []
        self._registry: Registry | None = None
        self._calls = CallStore()
        self._logs = LogStore()
        self._blobs: BlobStore | None = None
        self._servicer: ModalServicer | None = None
        self._ctx: RunContext | None = None
        self._serving = LoopThread("stepops-modal-emulator")
        self._grpc: Server | None = None
        self._http: web.AppRunner | None = None

    # ----- lifecycle --------------------------------------------------------------------------------

    def _start(self) -> None:
        workdir = self._open_workdir(self._wanted_workdir, "modal")
        self._registry = Registry(workdir / "volumes")
        self._blobs = BlobStore(workdir / "blobs", self.multipart_threshold, self.part_size)
        self._servicer = ModalServicer(self._registry, self._calls, self._blobs, self._logs,
                                       token_id=self.token_id, token_secret=self.token_secret,
                                       on_call=self._call_created, on_cancel=lambda call: self._wake(call.id))
        self._ctx = RunContext(self._registry, self._blobs, self._logs, workdir / "calls",
                               self.stop_grace_period, self.queue_seconds, self._blocked_gpus,
                               lambda: self.volume_commit_interval)

        async def startup() -> None:
            assert self._servicer is not None and self._blobs is not None  # for mypy: set above
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self._wanted_port))
            self.port = sock.getsockname()[1]
            self._grpc = Server([self._servicer])
            await self._grpc.start(sock=sock)
            self._http, self.blob_port = await serve_app(self._blobs.app(), self._wanted_blob_port)
            self._blobs.base_url = f"http://127.0.0.1:{self.blob_port}"

        self._serving.start(startup, "the Modal emulator's servers")

    def _teardown(self) -> None:
        self._each_runner("shutdown")

        async def shutdown() -> None:
            if self._grpc is not None:
                self._grpc.close()
                try:  # clients may hold their connections open
                    await asyncio.wait_for(self._grpc.wait_closed(), 5)
                except asyncio.TimeoutError:
                    pass
            if self._http is not None:
                await self._http.cleanup()

        self._serving.stop(shutdown)
        self._close_workdir()

    # ----- the servicer's calls (event loop thread) -------------------------------------------------

    def _call_created(self, call: Call) -> None:
        assert self._ctx is not None
        with self._lock:
            # Modal does not preempt a nonpreemptible function's containers (https://modal.com/docs/guide/preemption):
            # a preemption waiting for new calls goes to preemptible ones only
            preemptible = not any(f.scheduler_placement.nonpreemptible for f in call.ranked)
            faults = take_faults(self._rules, call.id, lambda fault: fault.kind != "no_capacity" and (
                preemptible or fault.kind != "preemption"))
            runner = CallRunner(call, self._ctx, faults)
            self._runners[call.id] = runner
        runner.start()

    def _blocked_gpus(self) -> set[str]:
        with self._lock:
            return {r.fault.gpu.upper() for r in self._rules if r.fault.kind == "no_capacity" and r.fault.gpu}

    # ----- endpoints and configuration --------------------------------------------------------------

    @property
    def server_url(self) -> str:
        """``http://127.0.0.1:<port>``: the client's ``MODAL_SERVER_URL``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def blob_url(self) -> str:
        return f"http://127.0.0.1:{self.blob_port}"

    def env(self) -> dict[str, str]:
        """Environment pointing the ``modal`` client at the emulator."""
        return {"MODAL_SERVER_URL": self.server_url, "MODAL_TOKEN_ID": self.token_id,
                "MODAL_TOKEN_SECRET": self.token_secret, "MODAL_ENVIRONMENT": DEFAULT_ENVIRONMENT}

    def airflow_connection(self) -> str:
        """An Airflow ``modal`` connection as JSON (for ``AIRFLOW_CONN_<ID>``): the token as login / password,
        the environment in the extra. The server URL comes from ``MODAL_SERVER_URL`` (``env()``)."""
        return json.dumps({"conn_type": "modal", "login": self.token_id, "password": self.token_secret,
                           "extra": {"environment": DEFAULT_ENVIRONMENT}})

    def add_secret(self, name: str, env: dict[str, str], environment: str = DEFAULT_ENVIRONMENT) -> str:
        """Create (or replace the values of) the named secret ``Secret.from_name`` finds; returns its id."""
        return self._reg().add_secret(name, dict(env), environment).id

    def add_environment(self, name: str) -> None:
        """Another environment besides ``main`` (requests naming an unknown one answer NOT_FOUND)."""
        registry = self._reg()
        with registry.lock:
            registry.environments.add(name)

    def volume_path(self, name: str, environment: str = DEFAULT_ENVIRONMENT) -> Path:
        """The local directory holding a volume's committed state (each task works on its own copy, committed
        back as Modal commits: see ``_volumes``)."""
        registry = self._reg()
        with registry.lock:
            volume = next((v for v in registry.volumes.values() if v.name == name and v.environment == environment),
                          None)
        if volume is None:
            raise KeyError(f"no volume {name!r} in environment {environment!r}")
        return volume.path

    # ----- faults -----------------------------------------------------------------------------------

    def inject(self, kind: str, job: str | None = None, after: float = 0.0, *, count: int | None = 1,
               **kw: Any) -> F.FaultRule:
        """A fault (see ``Fault``) for the call ``job`` (it must exist and not be over), or for the next
        ``count`` calls made (None: every one; a ``preemption`` goes to calls of preemptible functions only);
        ``no_capacity`` holds for every call until cleared."""
        fault = F.Fault(kind, after=after, **kw)
        rule = F.FaultRule(fault, count=count)
        if job is None or kind == "no_capacity":
            with self._lock:
                self._rules.append(rule)
            self._each_runner("wake")
            return rule
        found = self._call(job)
        if found.over:
            raise ValueError(f"function call {job} is already over ({found.state})")
        if kind == "slow_start" and found.state != "pending":
            raise ValueError(f"a slow_start fault cannot strike function call {job}: it is {found.state}")
        with self._lock:
            runner = self._runners[found.id]
        runner.strike(fault)
        return F.FaultRule.struck(fault, found.id)

    def fail_requests(self, status: Status = Status.UNAVAILABLE, times: int | None = 1, method: str | None = None,
                      *, message: str | None = None) -> F.RequestFault:
        """Answer the next ``times`` calls (None: all) of the RPC ``method`` (e.g. ``"FunctionMap"``; None: any)
        with gRPC ``status``. The client retries UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED, INTERNAL and UNKNOWN
        (three retries by default)."""
        return add_fault(self._svc(), F.RequestFault(status, times, method, message or ""))

    def lose_replies(self, method: str, times: int | None = 1) -> F.RequestFault:
        """Do what the next ``times`` calls (None: all) of RPC ``method`` ask, but never answer them: a reply
        lost on the way, which the client only notices by timing out."""
        return add_fault(self._svc(), F.RequestFault(Status.UNAVAILABLE, times, method, lose_reply=True))

    def clear_faults(self) -> None:
        with self._lock:
            self._rules.clear()
        if self._servicer is not None:
            with self._servicer.lock:
                self._servicer.faults.clear()
        self._each_runner("wake")

    @property
    def uncounted_queue_seconds(self) -> float:
        """Seconds after a call is made during which its queued input is not counted as unfinished: the call
        then shows no output and no unfinished input, as an expired one does (default 0)."""
        return self._svc().uncounted_queue_seconds

    @uncounted_queue_seconds.setter
    def uncounted_queue_seconds(self, seconds: float) -> None:
        self._svc().uncounted_queue_seconds = seconds

    @property
    def publish_seconds(self) -> float:
        """Seconds an ``AppPublish`` takes before the deployment exists (default 0): a real deploy builds images
        and creates functions first, so workers deploying the same app at once all find none and race."""
        return self._svc().publish_seconds

    @publish_seconds.setter
    def publish_seconds(self, seconds: float) -> None:
        self._svc().publish_seconds = seconds

    def late_logs(self, every: int = 0, seconds: float = 1.0) -> None:
        """From now on every ``every``-th log entry (0: none) arrives ``seconds`` after it was written: behind
        entries written after it, with its own earlier timestamp, as lines a log pipeline ingests late."""
        self._logs.late_every, self._logs.late_seconds = every, seconds

    def age(self, call_id: str, seconds: float) -> None:
        """Make a call look ``seconds`` older (its creation, start and end): a call that ended more than 7 days
        ago has lost its output, as on Modal."""
        self._call(call_id).age(seconds)

    # ----- inspection -------------------------------------------------------------------------------

    def _call(self, call_id: str) -> Call:
        found = self._calls.get_or_none(call_id)
        if found is None:
            raise KeyError(f"no function call {call_id}")
        return found

    def _reg(self) -> Registry:
        return self._running(self._registry)

    def _svc(self) -> ModalServicer:
        return self._running(self._servicer)

    @property
    def requests(self) -> list[str]:
        """The RPC method names served, oldest first (e.g. to count ``FunctionMap`` calls)."""
        servicer = self._svc()
        with servicer.lock:
            return [r["method"] for r in servicer.records]

    @property
    def request_log(self) -> list[JSON]:
        """The RPCs served with their time and status name (``OK`` or the gRPC status answered)."""
        servicer = self._svc()
        with servicer.lock:
            return [dict(r) for r in servicer.records]

    @property
    def blob_uploads(self) -> list[JSON]:
        """What clients uploaded to blob storage, oldest first: blob id, size, number of parts (1 for a single
        PUT)."""
        return self._running(self._blobs).uploaded()

    @property
    def apps(self) -> list[JSON]:
        registry = self._reg()
        with registry.lock:
            return [a.as_dict() for a in registry.apps.values()]

    @property
    def functions(self) -> list[JSON]:
        """The current definition of every function: app, environment, name, GPU request(s) (``gpu``: a list,
        in fallback order, ``"H100"`` / ``"H100:2"``; ``gpus``: type and count), ``milli_cpu`` / ``cpu``,
        ``memory_mb``, ``timeout_secs``, ``regions``, ``cloud``, ``image`` (its Dockerfile commands base first,
        the registry tag it starts from, the Python version that tag names), ``secrets`` (names and env),
        ``volumes`` (mount path -> volume name) and ``retries``."""
        registry = self._reg()
        with registry.lock:
            fdefs = [f for f in registry.functions.values() if f.ranked]
        return [registry.describe(f) for f in fdefs]

    def function(self, app_name: str, name: str, environment: str = DEFAULT_ENVIRONMENT) -> JSON:
        """One function's current definition (KeyError if the app or function is unknown)."""
        matches = [f for f in self.functions if f["app_name"] == app_name and f["name"] == name
                   and f["environment"] == environment]
        if not matches:
            raise KeyError(f"no function {name!r} in app {app_name!r} ({environment})")
        return matches[-1]

    @property
    def jobs(self) -> list[JSON]:
        """Every function call (see ``job``), oldest first."""
        return [c.snapshot() for c in self._calls.all()]

    calls = jobs

    @staticmethod
    def job_id(job: JSON) -> str:
        return job["id"]

    def job(self, call_id: str) -> JSON:
        """One call: id, input_id, function, state (pending, running, success, failure, init_failure, timeout,
        terminated), status (the result's GenericStatus name), history, task_id(s), gpu granted, created_at /
        started_at / finished_at (epoch seconds), exit_code, attempts, exception. KeyError if unknown."""
        return self._call(call_id).snapshot()

    call = job

    def status(self, call_id: str) -> str:
        return self.job(call_id)["state"]

    def history(self, call_id: str) -> list[str]:
        return self.job(call_id)["history"]

    def error(self, call_id: str) -> Any:
        return self.job(call_id)["exception"]

    #: block until the call has reached one of the states (now or earlier); AssertionError if it ends first
    wait_for_call = Emulator.wait_for_state

    def pids(self, call_id: str) -> list[int]:
        """The live container process of a call (its process group leader), empty when none runs."""
        with self._lock:
            runner = self._runners.get(call_id)
        if runner is None:
            raise KeyError(f"no function call {call_id}")
        return runner.pids()

    def logs(self, call_id: str, *, system: bool = False) -> list[str]:
        """The call's output lines so far (stdout and stderr, newline stripped); with ``system`` also the
        service's own lines."""
        entries = self._logs.entries(LogQuery(function_call_id=call_id))
        return [e.data.rstrip("\n") for e in entries if system or e.fd != SYSTEM]

    def log_entries(self, call_id: str | None = None) -> list[JSON]:
        """The log entries of one call (or all) as dicts, oldest first."""
        return [e.as_dict() for e in self._logs.entries(LogQuery(function_call_id=call_id or ""))]
