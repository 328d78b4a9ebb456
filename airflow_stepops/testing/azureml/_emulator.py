"""``AzureMLEmulator``: Azurite plus an HTTPS Azure ML REST front whose command jobs run as local processes."""

from __future__ import annotations

import copy
import os
import ssl
import threading
from pathlib import Path
from typing import Any, ClassVar

from aiohttp import web

from airflow_stepops.testing._images import write_python_shims
from airflow_stepops.testing._kit import Emulator, add_fault, configured
from airflow_stepops.testing._loop_thread import LoopThread, serve_app
from airflow_stepops.testing.azureml._auth import IDENTITY_HEADER, StaticTokenCredential
from airflow_stepops.testing.azureml._azurite import Azurite
from airflow_stepops.testing.azureml._config import ComputeSpec, EmulatorConfig
from airflow_stepops.testing.azureml._faults import JSON, RUNNING_KINDS, Fault, FaultRule, RequestFault
from airflow_stepops.testing.azureml._jobs import Job, iso
from airflow_stepops.testing.azureml._runner import RunContext
from airflow_stepops.testing.azureml._server import ApiServer
from airflow_stepops.testing.azureml._service import Service
from airflow_stepops.testing.azureml._tls import TlsFiles, write_tls_files
from airflow_stepops.testing.azureml._transfer import Storage
from airflow_stepops.testing.azureml._workspace import Workspace

#: the variable azure-ai-ml reads (when an MLClient is built) for the base URL of every ARM client
MFE_URL_ENV = "AZUREML_DEV_URL_MFE"
_ENV_LOCK = threading.Lock()


class AzureMLEmulator(Emulator):
    """An Azure ML workspace on 127.0.0.1: Azurite for blobs, an HTTPS REST server for ARM and run history,
    and command jobs run as local process groups. Use it as a context manager (or ``start()``/``stop()``).

    ``ml_client()`` builds a ready ``MLClient``; ``env()`` gives the variables that point another process's
    SDK at the emulator. Keywords beyond the workspace's names are the fields of ``EmulatorConfig``.
    """

    STATES: ClassVar[dict[str, str]] = {"Completed": "succeeded", "Failed": "failed", "Canceled": "cancelled"}

    def __init__(self, subscription_id: str = "00000000-0000-0000-0000-000000000000",
                 resource_group: str = "stepops-rg", workspace_name: str = "stepops-ws", location: str = "eastus",
                 stop_grace_period: float = 2.0, queue_seconds: float = 0.3, prepare_seconds: float = 0.3,
                 workdir: str | os.PathLike[str] | None = None, *, port: int = 0, azurite_port: int = 0,
                 **settings: Any) -> None:
        self.config = configured(EmulatorConfig(), dict(
            subscription_id=subscription_id, resource_group=resource_group, workspace_name=workspace_name,
            location=location, stop_grace_period=stop_grace_period, queue_seconds=queue_seconds,
            prepare_seconds=prepare_seconds, workdir=str(workdir) if workdir is not None else None, **settings))
        self._wanted_port = port
        self._wanted_azurite_port = azurite_port
        self._azurite: Azurite | None = None
        self._serving = LoopThread("azureml-emulator-api")
        self._http: web.AppRunner | None = None
        self._api: ApiServer | None = None
        self._service: Service | None = None
        self._storage: Storage | None = None
        self._tls: TlsFiles | None = None
        self._credential = StaticTokenCredential()
        self.port = 0

    # ----- lifecycle --------------------------------------------------------------------------------

    def _start(self) -> None:
        cfg = self.config
        workdir = self._open_workdir(cfg.workdir, "azureml")
        self._tls = write_tls_files(workdir / "tls")
        self._azurite = Azurite(workdir / "azurite", self._wanted_azurite_port)
        self._azurite.start()
        workspace = Workspace(cfg, "", {})
        datastores = {"workspaceblobstore": f"azureml-blobstore-{workspace.workspace_id}",
                      "workspaceartifactstore": "azureml"}
        workspace.datastores.update(datastores)
        self._storage = Storage(self._azurite.connection_string, self._azurite.port, workspace.datastores)
        for container in datastores.values():
            self._storage.ensure_container(container)
        shims = workdir / "bin"
        write_python_shims(shims)
        ctx = RunContext(cfg, self._storage, workdir / "jobs", shims, datastores["workspaceartifactstore"])
        ctx.root.mkdir(parents=True, exist_ok=True)
        self._service = Service(workspace, ctx)
        self._api = ApiServer(self._service)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(self._tls.cert), str(self._tls.key))
        app = self._api.app()

        async def startup() -> None:
            self._http, self.port = await serve_app(app, self._wanted_port, context)

        self._serving.start(startup, f"the Azure ML emulator's server (127.0.0.1:{self._wanted_port})")
        workspace.base_url = self._api.base_url = self.base_url
        ctx.base_env.update({"AZUREML_SERVICE_ENDPOINT": self.base_url,
                             "AZUREML_DISCOVERY_SERVICE_ENDPOINT": f"{self.base_url}/discovery",
                             "AZUREML_WORKSPACE_ID": workspace.workspace_id})

    def _teardown(self) -> None:
        if self._service is not None:
            self._service.shutdown()
        self._serving.stop(self._stop_http)
        if self._azurite is not None:
            self._azurite.stop()
            self._azurite = None
        self._close_workdir()

    async def _stop_http(self) -> None:
        if self._http is not None:
            await self._http.cleanup()

    # ----- where things are ---------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The REST server: ARM, run history, discovery (``https://127.0.0.1:<port>``)."""
        return f"https://127.0.0.1:{self.port}"

    @property
    def blob_endpoint(self) -> str:
        return self._running(self._azurite).blob_endpoint

    @property
    def blob_connection_string(self) -> str:
        return self._running(self._azurite).connection_string

    @property
    def ca_bundle(self) -> str:
        """PEM file to trust for the server: certifi's roots plus the emulator's CA."""
        return str(self._running(self._tls).bundle)

    @property
    def workspace_id(self) -> str:
        return self._running(self._service).workspace.workspace_id

    @property
    def datastores(self) -> dict[str, str]:
        """Datastore name -> Azurite container (``workspaceblobstore``, ``workspaceartifactstore``)."""
        return dict(self._running(self._service).workspace.datastores)

    def env(self) -> dict[str, str]:
        """Variables that point another process's azure-ai-ml, azure-identity and azure-storage-blob at the
        emulator: ``AZUREML_DEV_URL_MFE`` (read when an ``MLClient`` is built), the CA bundle as
        ``REQUESTS_CA_BUNDLE``/``SSL_CERT_FILE``, an App Service managed identity (``IDENTITY_ENDPOINT``,
        ``IDENTITY_HEADER``: ``DefaultAzureCredential()`` gets emulator tokens), the workspace's names and
        ``AZURE_STORAGE_CONNECTION_STRING``."""
        cfg = self.config
        return {MFE_URL_ENV: self.base_url, "REQUESTS_CA_BUNDLE": self.ca_bundle, "SSL_CERT_FILE": self.ca_bundle,
                "IDENTITY_ENDPOINT": f"{self.base_url}/msi/token", "IDENTITY_HEADER": IDENTITY_HEADER,
                "AZURE_SUBSCRIPTION_ID": cfg.subscription_id, "AZURE_RESOURCE_GROUP": cfg.resource_group,
                "AZUREML_WORKSPACE_NAME": cfg.workspace_name, "AZURE_STORAGE_CONNECTION_STRING":
                    self.blob_connection_string, "AZURITE_BLOB_ENDPOINT": self.blob_endpoint}

    # ----- clients ------------------------------------------------------------------------------------

    def credential(self) -> StaticTokenCredential:
        """A ``TokenCredential`` with static emulator tokens (the server accepts any bearer token)."""
        return self._credential

    def ml_client(self, credential: Any = None, **kwargs: Any) -> Any:
        """An ``azure.ai.ml.MLClient`` on the emulator's workspace. ``AZUREML_DEV_URL_MFE`` is set while
        the client is built (the SDK reads it then only) and the emulator's CA is ``connection_verify``."""
        from azure.ai.ml import MLClient

        cfg = self.config
        kwargs.setdefault("connection_verify", self.ca_bundle)
        kwargs.setdefault("enable_telemetry", False)
        kwargs.setdefault("show_progress", False)
        with _ENV_LOCK:
            previous = os.environ.get(MFE_URL_ENV)
            os.environ[MFE_URL_ENV] = self.base_url
            try:
                return MLClient(credential or self._credential, cfg.subscription_id, cfg.resource_group,
                                cfg.workspace_name, **kwargs)
            finally:
                if previous is None:
                    os.environ.pop(MFE_URL_ENV, None)
                else:
                    os.environ[MFE_URL_ENV] = previous

    def blob_service_client(self) -> Any:
        """An ``azure.storage.blob.BlobServiceClient`` on Azurite's dev account."""
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.blob_connection_string)

    def create_container(self, name: str) -> str:
        """Create a blob container in Azurite (no error when it exists); its URL."""
        self._running(self._storage).ensure_container(name)
        return f"{self.blob_endpoint}/{name}"

    def add_compute(self, name: str, vm_size: str = "STANDARD_DS3_V2", *, low_priority: bool = False,
                    max_nodes: int = 4) -> None:
        """Add an AmlCompute cluster; jobs on a ``low_priority`` one count as preemptible."""
        workspace = self._running(self._service).workspace
        with workspace.lock:
            workspace.computes[name] = ComputeSpec(vm_size, low_priority, max_nodes)

    # ----- faults -------------------------------------------------------------------------------------

    def inject(self, kind: str, job: str | None = None, after: float = 0.0, *, count: int | None = 1,
               **kw: Any) -> FaultRule:
        """Give the fault ``kind`` (see ``Fault``) to the job named ``job``, or to the next created job when
        None; ``count`` jobs in all (None: every matching job; a ``preemption`` for jobs not named goes to
        Spot-tier and low-priority jobs only). ``kw``: ``duration``, ``message``, ``quota``,
        ``status_code``. A ``preemption`` or ``failure`` for a job that exists strikes it ``after`` seconds from
        now (or into ``Running``, when it has not started yet)."""
        fault = Fault(kind, after=after, **kw)
        service = self._running(self._service)
        if job is not None and kind in RUNNING_KINDS and job in service.runners:
            service.runner(job).strike(fault)
            return FaultRule.struck(fault, job)
        rule = FaultRule(fault, job, count)
        service.add_rule(rule)
        return rule

    def fail_requests(self, status_code: int, code: str, times: int | None = 1, path_contains: str | None = None,
                      *, method: str | None = None, message: str | None = None) -> RequestFault:
        """Answer the next ``times`` API requests whose path (with query) contains ``path_contains`` with an
        ARM error ``code`` and HTTP ``status_code`` (429 and 503 carry ``Retry-After: 1``)."""
        return add_fault(self._running(self._api), RequestFault(status_code, code, times, path_contains, method, message))

    def lose_replies(self, how: str = "drop", times: int | None = 1, path_contains: str | None = None, *,
                     method: str | None = None, hang_seconds: float = 30.0) -> RequestFault:
        """Carry out the next ``times`` matching API requests but lose their replies: ``drop`` closes the
        connection, ``hang`` answers nothing for ``hang_seconds`` (e.g. ``lose_replies("drop", method="PUT",
        path_contains="/jobs/")``: the job is created, the client never hears of it)."""
        return add_fault(self._running(self._api), RequestFault(0, "", times, path_contains, method, lose_reply=how,
                                                                hang_seconds=hang_seconds))

    def clear_faults(self) -> None:
        service, api = self._running(self._service), self._running(self._api)
        with service.lock:
            service.rules.clear()
        with api.lock:
            api.faults.clear()

    # ----- inspection ---------------------------------------------------------------------------------

    @property
    def requests(self) -> list[dict[str, Any]]:
        """API requests served (method, path, query, time, status), oldest first."""
        api = self._running(self._api)
        with api.lock:
            return [dict(r) for r in api.requests]

    @property
    def jobs(self) -> list[JSON]:
        """Every job as stored (see ``job``), oldest first."""
        service = self._running(self._service)
        with service.lock:
            jobs = list(service.jobs.values())
        return [_snapshot(j) for j in jobs]

    def job(self, name: str) -> JSON:
        """A job as stored: name, status, properties (the validated request), error, history, times..."""
        return _snapshot(self._job(name))

    def _job(self, name: str) -> Job:
        service = self._running(self._service)
        with service.lock:
            found = service.jobs.get(name)
        if found is None:
            raise KeyError(f"no job {name!r}")
        return found

    @staticmethod
    def job_id(job: JSON) -> str:
        return job["name"]

    def status(self, name: str) -> str:
        return self._job(name).status

    def history(self, name: str) -> list[str]:
        job = self._job(name)
        with job.lock:
            return [s for s, _ in job.history]

    def error(self, name: str) -> Any:
        return self.job(name)["error"]

    #: block until the job has entered one of the statuses (now or earlier); AssertionError if it ends first
    wait_for_status = Emulator.wait_for_state

    def pids(self, name: str) -> list[int]:
        """The job's running process (its process group leader), empty when none runs."""
        return self._running(self._service).runner(name).pids()

    def job_dir(self, name: str) -> Path:
        """``<workdir>/jobs/<name>``: inputs/, outputs/, wd/, home/, tmp/, user_logs/std_log.txt."""
        return self._running(self._service).runner(name).dir

    def logs(self, name: str) -> list[str]:
        """The job's output lines so far (``user_logs/std_log.txt``)."""
        return self._running(self._service).runner(name).log_lines()


def _snapshot(job: Job) -> JSON:
    with job.lock:
        return {"name": job.name, "status": job.status, "properties": copy.deepcopy(job.request),
                "error": copy.deepcopy(job.error), "exit_code": job.exit_code, "spot": job.spot,
                "compute": job.compute_name, "created_at": iso(job.created), "started_at": iso(job.started),
                "ended_at": iso(job.ended), "cancel_requested": job.cancel_requested,
                "history": [{"status": s, "time": iso(t)} for s, t in job.history], "log_url": job.log_url}
