"""``VertexEmulator``: fake-gcs-server plus one aiohttp server (tokens, JobService, Logging) and job runners."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlencode

from aiohttp import web

from airflow_stepops.testing._images import write_python_shims
from airflow_stepops.testing._kit import Emulator, add_fault
from airflow_stepops.testing._loop_thread import LoopThread, serve_app
from airflow_stepops.testing.vertex import _faults as F
from airflow_stepops.testing.vertex._auth import UNIVERSE_DOMAIN, ServiceAccount, without_boundary_lookup
from airflow_stepops.testing.vertex._errors import DEFAULT_STATUS, ApiError
from airflow_stepops.testing.vertex._gcs import FakeGcsServer
from airflow_stepops.testing.vertex._jobs import TERMINAL, Job, JobService
from airflow_stepops.testing.vertex._logging import REPLICA, LogStore
from airflow_stepops.testing.vertex._runner import JobRunner, RunContext
from airflow_stepops.testing.vertex._server import ApiServer
from airflow_stepops.testing.vertex._time import Clock

JSON = dict[str, Any]
DEFAULT_PROJECT_NUMBER = "123456789012"
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"


class VertexEmulator(Emulator):
    """Vertex AI custom jobs, Cloud Logging and Cloud Storage on 127.0.0.1; jobs run as local processes.

    Use it as a context manager (or ``start()`` / ``stop()``). Point ``JobServiceClient(transport="rest",
    client_options={"api_endpoint": emu.api_endpoint})`` at it, GCS clients at ``gcs_endpoint`` (or
    ``env()``), and Airflow at ``gcp_connection_uri()``.

    project / project_number: the project's id and the number Vertex puts in resource names; request paths
        may use either.
    location: the one location served (other locations answer 400).
    stop_grace_period: seconds between SIGTERM and SIGKILL when a job is cancelled, times out or is
        preempted.
    queue_seconds / pending_seconds: how long a job stays JOB_STATE_QUEUED and JOB_STATE_PENDING.
    list_lag: seconds a new job is missing from ListCustomJobs results (an eventually consistent list;
        Vertex documents none, so 0 by default).
    workdir: where job directories go (``<workdir>/jobs/<id>/``); default a temporary one removed by
        ``stop()``.
    port: the API server's port on 127.0.0.1 (default a free one).
    """

    STATES: ClassVar[dict[str, str]] = {"JOB_STATE_SUCCEEDED": "succeeded", "JOB_STATE_FAILED": "failed",
                                        "JOB_STATE_CANCELLED": "cancelled", "JOB_STATE_EXPIRED": "failed",
                                        "JOB_STATE_PARTIALLY_SUCCEEDED": "succeeded"}

    def __init__(self, project: str = "stepops-tests", location: str = "us-central1",
                 stop_grace_period: float = 2.0, queue_seconds: float = 0.3, pending_seconds: float = 0.3,
                 workdir: str | Path | None = None, *, port: int = 0,
                 project_number: str = DEFAULT_PROJECT_NUMBER, list_lag: float = 0.0) -> None:
        self.project, self.location, self.project_number = project, location, project_number
        self.stop_grace_period = stop_grace_period
        self.queue_seconds, self.pending_seconds = queue_seconds, pending_seconds
        self._list_lag = list_lag
        self._wanted_workdir = workdir
        self._wanted_port = port
        self.port = 0
        self._lock = threading.Lock()
        self._runners: dict[str, JobRunner] = {}
        self._rules: list[F.FaultRule] = []
        self._clock = Clock()
        self._account = ServiceAccount(project)
        self._gcs: FakeGcsServer | None = None
        self._server: ApiServer | None = None
        self._logs: LogStore | None = None
        self._service: JobService | None = None
        self._ctx: RunContext | None = None
        self._serving = LoopThread("stepops-vertex-emulator")
        self._runner: web.AppRunner | None = None

    # ----- lifecycle --------------------------------------------------------------------------------

    def _start(self) -> None:
        workdir = self._open_workdir(self._wanted_workdir, "vertex")
        self._gcs = FakeGcsServer(workdir / "fake-gcs-server.log")
        self._gcs.start()
        self._logs = LogStore(self.project, self.project_number, self.location, self._clock)
        self._service = JobService(self.project, self.project_number, self.location, self._clock,
                                   self._admit, self._job_created, lambda job: self._wake(job.id))
        self._service.list_lag = self._list_lag
        server = self._server = ApiServer(self._service, self._logs, self._account, lambda: self.token_uri)

        async def startup() -> None:
            self._runner, self.port = await serve_app(server.app(), self._wanted_port)

        self._serving.start(startup, "the Vertex AI emulator's server")
        shims = workdir / "bin"
        write_python_shims(shims)
        self._ctx = RunContext(self.project, self.project_number, self.location, self.stop_grace_period,
                               self.queue_seconds, self.pending_seconds, self._gcs, self._logs, self._clock,
                               workdir / "jobs", shims, self._job_env())

    def _teardown(self) -> None:
        self._each_runner("shutdown")

        async def shutdown() -> None:
            if self._runner is not None:
                await self._runner.cleanup()

        self._serving.stop(shutdown)
        if self._gcs is not None:
            self._gcs.stop()
            self._gcs = None
        self._close_workdir()

    # ----- the job service's calls (request thread) -----------------------------------------------

    def _admit(self) -> None:
        """Before a job is made: a ``quota_exceeded`` rule answers the create call with 429."""
        with self._lock:
            for rule in self._rules:
                if rule.fault.kind == "quota_exceeded" and rule.take("<create>"):
                    raise ApiError("RESOURCE_EXHAUSTED", rule.fault.message or F.QUOTA.format(
                        metric=rule.fault.metric))

    def _job_created(self, job: Job) -> None:
        assert self._ctx is not None
        # a preemption waiting for new jobs goes to Spot VMs only: "Spot VMs ... can be preempted", standard VMs
        # are not (https://cloud.google.com/vertex-ai/docs/training/use-spot-vms); a job on STANDARD capacity
        # (an escalated attempt) leaves the rule for the next Spot job
        spot = (job.spec().get("scheduling") or {}).get("strategy") == "SPOT"
        with self._lock:
            faults = []
            for rule in self._rules:
                if rule.fault.kind == "lost_create_reply" and job.lose_reply is None and rule.take(job.id):
                    job.lose_reply = rule.fault.duration
                elif rule.fault.kind not in ("quota_exceeded", "lost_create_reply") and \
                        (spot or rule.fault.kind != "preemption") and rule.take(job.id):
                    faults.append(rule.fault)
            runner = JobRunner(job, self._ctx, faults)
            self._runners[job.id] = runner
        runner.start()

    # ----- endpoints and clients --------------------------------------------------------------------

    @property
    def api_endpoint(self) -> str:
        """``http://127.0.0.1:<port>``: the ``api_endpoint`` of the Vertex AI clients."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def logging_endpoint(self) -> str:
        """Cloud Logging's endpoint (the same server): ``POST <it>/v2/entries:list``."""
        return self.api_endpoint

    @property
    def token_uri(self) -> str:
        return f"{self.api_endpoint}/token"

    @property
    def gcs_endpoint(self) -> str:
        return self._running(self._gcs).endpoint

    def service_account_info(self) -> dict[str, str]:
        """A service-account key (JSON as a dict) whose ``token_uri`` is the emulator's token endpoint."""
        return self._account.info(self.token_uri)

    def credentials(self, scopes: Iterable[str] = (CLOUD_PLATFORM_SCOPE,)) -> Any:
        """``google.oauth2.service_account.Credentials`` of ``service_account_info()``, kept from looking up
        their regional access boundary at Google (see ``without_boundary_lookup``)."""
        from google.oauth2 import service_account

        return without_boundary_lookup(service_account.Credentials.from_service_account_info(
            self.service_account_info(), scopes=list(scopes)))

    def env(self) -> dict[str, str]:
        """Environment pointing clients at the emulator. ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` keeps
        gcsfs (2025.x+) from probing buckets over gRPC/TLS, which fake-gcs-server does not answer (it takes
        effect in processes that import gcsfs after it is set)."""
        return {"STORAGE_EMULATOR_HOST": self.gcs_endpoint, "GOOGLE_CLOUD_PROJECT": self.project,
                "GOOGLE_CLOUD_UNIVERSE_DOMAIN": UNIVERSE_DOMAIN,
                "STEPOPS_VERTEX_EMULATOR_API": self.api_endpoint,
                "STEPOPS_VERTEX_EMULATOR_LOGGING": self.logging_endpoint,
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

    def _job_env(self) -> dict[str, str]:
        """What a job process gets in place of its service account: GCS through the emulator."""
        env = self.env()
        return {k: env[k] for k in ("STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT",
                                    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")}

    def connection_extra(self) -> dict[str, str]:
        return {"keyfile_dict": json.dumps(self.service_account_info()), "project": self.project}

    def airflow_connection(self) -> str:
        """An Airflow ``google_cloud_platform`` connection as JSON (for ``AIRFLOW_CONN_<ID>``)."""
        return json.dumps({"conn_type": "google_cloud_platform", "extra": self.connection_extra()})

    def gcp_connection_uri(self) -> str:
        """The same connection as a URI, ``google-cloud-platform://?keyfile_dict=...&project=...``."""
        return "google-cloud-platform://?" + urlencode(self.connection_extra())

    def storage_client(self) -> Any:
        """A ``google.cloud.storage.Client`` on the fake GCS (anonymous credentials)."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project=self.project, credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.gcs_endpoint})

    def create_bucket(self, name: str) -> str:
        """Make a bucket (no-op if it exists); returns ``gs://<name>``."""
        self._running(self._gcs).create_bucket(name, self.project)
        return f"gs://{name}"

    @property
    def late_logs(self) -> tuple[int, float] | None:
        """``(every, seconds)``: every ``every``-th line a job writes reaches Cloud Logging ``seconds`` late,
        after lines written later (None: in order)."""
        return self._logs.late if self._logs is not None else None

    @late_logs.setter
    def late_logs(self, value: tuple[int, float] | None) -> None:
        self._running(self._logs).late = value

    @property
    def list_lag(self) -> float:
        """Seconds a new job is missing from ListCustomJobs results (settable while running)."""
        return self._list_lag

    @list_lag.setter
    def list_lag(self, seconds: float) -> None:
        self._list_lag = seconds
        if self._service is not None:
            self._service.list_lag = seconds

    # ----- faults -----------------------------------------------------------------------------------

    def inject(self, kind: str, job: str | None = None, after: float = 0.0, *, count: int | None = 1,
               **kw: Any) -> F.FaultRule:
        """A fault (see ``Fault``) for the job ``job`` (id or name; it must exist and not be over), or for the
        next ``count`` created jobs (None: every one; a ``preemption`` goes to SPOT jobs only, a job given one by
        name that is not on Spot VMs loses its VM instead); ``quota_exceeded`` always strikes create calls."""
        fault = F.Fault(kind, after=after, **kw)
        rule = F.FaultRule(fault, count=count)
        if job is None or kind in ("quota_exceeded", "lost_create_reply"):
            with self._lock:
                self._rules.append(rule)
            return rule
        runner = self._runner_of(job)
        state = runner.job.state
        if state in TERMINAL:
            raise ValueError(f"custom job {job} is already over ({state})")
        if kind in ("slow_start", "stockout") and state not in ("JOB_STATE_QUEUED", "JOB_STATE_PENDING"):
            raise ValueError(f"a {kind} fault cannot strike custom job {job}: it is {state}")
        runner.strike(fault)
        return F.FaultRule.struck(fault, runner.job.id)

    def fail_requests(self, status_code: int, status: str | None = None, times: int | None = 1,
                      path_contains: str | None = None, *, method: str | None = None,
                      message: str | None = None) -> F.ApiFault:
        """Answer the next ``times`` matching API requests (None: all) with Google's error JSON."""
        status = status or DEFAULT_STATUS.get(status_code, "UNKNOWN")
        return add_fault(self._running(self._server), F.ApiFault(status_code, status, times, path_contains, method,
                                                                 message or ""))

    def clear_faults(self) -> None:
        with self._lock:
            self._rules.clear()
        if self._server is not None:
            with self._server.lock:
                self._server.faults.clear()

    # ----- inspection -------------------------------------------------------------------------------

    def _jobs(self) -> JobService:
        return self._running(self._service)

    def _runner_of(self, job_id: str) -> JobRunner:
        job = self._jobs().find(job_id)
        with self._lock:
            return self._runners[job.id]

    @property
    def requests(self) -> list[JSON]:
        """The API requests served (method, path, query, status, time), oldest first."""
        server = self._running(self._server)
        with server.lock:
            return [dict(r) for r in server.records]

    @property
    def jobs(self) -> list[JSON]:
        """Every CustomJob (JSON, enum names), oldest first."""
        return [job.snapshot() for job in self._jobs().jobs()]

    @staticmethod
    def job_id(job: JSON) -> str:
        return job["name"].rsplit("/", 1)[-1]

    def job(self, job_id: str) -> JSON:
        """One CustomJob by id or resource name (KeyError if unknown)."""
        return self._jobs().find(job_id).snapshot()

    def status(self, job_id: str) -> str:
        return self._jobs().find(job_id).state

    def reply_held(self, job_id: str) -> bool:
        """Whether the create call of a ``lost_create_reply`` job is still holding its reply."""
        return self._jobs().find(job_id).reply_held

    def history(self, job_id: str) -> list[str]:
        return list(self._jobs().find(job_id).history)

    def error(self, job_id: str) -> Any:
        return self.job(job_id).get("error")

    def pids(self, job_id: str) -> list[int]:
        """The live process of a job (its process group leader), empty when none runs."""
        return self._runner_of(job_id).pids()

    def job_dir(self, job_id: str) -> Path:
        """``<workdir>/jobs/<id>/``: ``gcs/`` (stands for ``/gcs``), ``home/``, ``tmp/``."""
        return self._runner_of(job_id).dir

    def logs(self, job_id: str, *, service: bool = False) -> list[str]:
        """The job's output lines so far (stdout and stderr, as logged); with ``service`` also the training
        service's own lines."""
        assert self._logs is not None
        job = self._jobs().find(job_id)
        return [e["textPayload"] for e in self._logs.entries(job.id, None if service else REPLICA)]

    def log_entries(self, job_id: str | None = None) -> list[JSON]:
        """The LogEntry JSON of one job (or all), oldest first."""
        key = self._jobs().find(job_id).id if job_id is not None else None
        return self._running(self._logs).entries(key)
