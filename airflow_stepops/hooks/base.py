"""The contract every flavor's hook fulfils: submit / status / cancel / logs, sync and async.

Hooks are the only modules that talk to a backend. The operator and the trigger work only with
``StepSpec``, job handles (JSON dicts) and ``JobStatus``, so the lifecycle is written once.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from typing import Any, ClassVar

from airflow.sdk import BaseHook
from pydantic import ValidationError

from airflow_stepops.artifacts import ArtifactRef, check_bucket, default_local_store, store_path
from airflow_stepops.bundle import StepIdentity
from airflow_stepops.exceptions import StepOperatorConfigError
from airflow_stepops.flavors import FLAVORS, flavor_for_conn_type, get_flavor
from airflow_stepops.resources import ResourceSettings
from airflow_stepops.settings.base import BaseStepOperatorConfig, BaseStepOperatorSettings, format_validation_error

JobHandle = dict[str, Any]


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    PREEMPTED = "preempted"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self not in (JobState.QUEUED, JobState.RUNNING)


@dataclass
class JobStatus:
    state: JobState
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state.value, "message": self.message, "details": self.details}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobStatus:
        return cls(JobState(data["state"]), data.get("message", ""), data.get("details") or {})


@dataclass
class StepSpec:
    """Everything a backend needs to run one step; built by the operator, rendered by the hook."""

    identity: StepIdentity
    bundle_uri: str
    output_uri: str
    resources: ResourceSettings
    settings: BaseStepOperatorSettings
    refs: list[ArtifactRef] = field(default_factory=list)
    task_label: str = ""
    #: the task's execution_timeout: Airflow enforces it, backends may add it as their own backstop
    timeout_seconds: float | None = None


def registered_step_operators() -> dict[str, str]:
    """Connection id -> flavor of every step operator this process can see (DB and env)."""
    found: dict[str, str] = {}
    prefix = "AIRFLOW_CONN_"
    for key, value in os.environ.items():
        if key.startswith(prefix):
            conn_type = _conn_type_of_env(value)
            flavor = flavor_for_conn_type(conn_type)
            if flavor:
                found[key[len(prefix):].lower()] = flavor.name
    if _inside_task():  # workers do not talk to the metadata DB; the CLI lists everything
        return dict(sorted(found.items()))
    try:
        from airflow.models import Connection
        from airflow.utils.session import create_session

        with create_session() as session:
            rows = session.query(Connection.conn_id, Connection.conn_type).filter(
                Connection.conn_type.like("stepops_%")
            )
            for conn_id, conn_type in rows:
                flavor = flavor_for_conn_type(conn_type)
                if flavor:
                    found[conn_id] = flavor.name
    except Exception:
        pass
    return dict(sorted(found.items()))


def _inside_task() -> bool:
    from airflow.sdk.execution_time import task_runner

    return getattr(task_runner, "SUPERVISOR_COMMS", None) is not None


def _conn_type_of_env(value: str) -> str | None:
    value = value.strip()
    if value.startswith("{"):
        import json

        try:
            return json.loads(value).get("conn_type")
        except ValueError:
            return None
    scheme = value.split("://", 1)[0]
    return scheme.replace("-", "_") if "://" in value else None


def _registered_hint() -> str:
    known = registered_step_operators()
    where = " visible to this worker (run `stepops list` for all)" if _inside_task() else ""
    if not known:
        return f"no step operators are registered{where}"
    return f"registered step operators{where}: " + ", ".join(f"{k} ({v})" for k, v in known.items())


def load_step_operator_connection(conn_id: str, expected_flavor: str | None = None) -> tuple[str, dict[str, Any]]:
    """Return (flavor, extras) of a step operator connection, or raise a clear error."""
    from airflow_stepops._compat import AirflowNotFoundException

    try:
        conn = _get_connection(conn_id)
    except AirflowNotFoundException:
        if expected_flavor and conn_id == get_flavor(expected_flavor).default_conn_id:
            return expected_flavor, {}
        raise StepOperatorConfigError(
            f"step_operator {conn_id!r}: no Airflow connection with this id; {_registered_hint()}. "
            f"Register one with: airflow connections add {conn_id} --conn-type stepops_<flavor> "
            f"--conn-extra '{{...}}' (flavors: {', '.join(sorted(FLAVORS))})"
        ) from None
    return _flavor_and_extras(conn_id, conn.conn_type, connection_extras(conn_id, conn), expected_flavor)


def connection_extras(conn_id: str, conn: Any) -> dict[str, Any]:
    """The connection's extra as a dict, or one clear error: the one place step operators parse extras.

    Airflow's ``extra_dejson`` logs a non-JSON extra at every access and returns ``{}``, which would run
    the step with defaults instead of what was configured."""
    import json

    raw = conn.extra
    if raw:
        try:
            parsed = json.loads(raw) if isinstance(raw, str) else raw
        except ValueError as exc:
            raise StepOperatorConfigError(
                f"connection {conn_id!r} extra: not valid JSON ({exc}); set it to a JSON object, e.g. "
                f"airflow connections add {conn_id} --conn-type {conn.conn_type} --conn-extra '{{\"key\": \"value\"}}'"
            ) from None
        if not isinstance(parsed, dict):
            raise StepOperatorConfigError(
                f"connection {conn_id!r} extra: must be a JSON object ({{...}}), got a JSON {type(parsed).__name__}")
    return dict(conn.extra_dejson or {})  # parsed again by Airflow, which masks secret-looking values


def _get_connection(conn_id: str) -> Any:
    """The connection from the task SDK, or from Airflow's secrets backends and metadata DB when
    called outside a task (``stepops`` CLI, DAG processor)."""
    from airflow_stepops._compat import AirflowNotFoundException

    try:
        return BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        if _inside_task():
            raise
    try:
        from airflow.models.connection import Connection
    except ImportError:
        raise AirflowNotFoundException(conn_id) from None
    return Connection.get_connection_from_secrets(conn_id)


def _flavor_and_extras(conn_id: str, conn_type: str | None, extras: dict[str, Any],
                       expected_flavor: str | None) -> tuple[str, dict[str, Any]]:
    flavor = flavor_for_conn_type(conn_type)
    if flavor is None:
        allowed = ", ".join(f.conn_type for f in FLAVORS.values())
        raise StepOperatorConfigError(
            f"step_operator {conn_id!r}: connection type {conn_type!r} is not a step operator; "
            f"step operator connections have one of the types: {allowed}"
        )
    if expected_flavor and flavor.name != expected_flavor:
        raise StepOperatorConfigError(
            f"step_operator {conn_id!r} is of flavor {flavor.name!r} but this operator runs "
            f"{expected_flavor!r} steps; use {flavor.operator_class.rsplit('.', 1)[1]} or "
            "@task.step_operator, or a step operator of the right flavor"
        )
    return flavor.name, dict(extras or {})


def parse_config(flavor: str, conn_id: str, extras: dict[str, Any]) -> BaseStepOperatorConfig:
    model = get_flavor(flavor).config_model()
    try:
        return model.model_validate(extras)
    except ValidationError as err:
        raise StepOperatorConfigError(
            format_validation_error(err, f"connection {conn_id!r} ({get_flavor(flavor).conn_type}) extra")
        ) from None


class StepOperatorHook(BaseHook):
    """Base hook of one flavor, bound to a registered step operator (an Airflow connection)."""

    #: a flavor's hook names only this; Airflow's conn_type, default_conn_name and hook_name derive from it
    flavor: ClassVar[str] = ""
    conn_name_attr = "step_operator_conn_id"
    default_conn_name = ""
    conn_type = ""
    hook_name = ""
    #: seconds between status polls unless the task sets poll_interval
    default_poll_interval: ClassVar[float] = 10.0
    #: first poll delay after a new job; doubles up to the poll interval (cloud APIs: no fast start)
    min_poll_interval: ClassVar[float] = 10.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "flavor" in cls.__dict__:
            flavor = get_flavor(cls.flavor)
            cls.conn_type, cls.default_conn_name, cls.hook_name = (flavor.conn_type, flavor.default_conn_id,
                                                                   flavor.hook_name)

    @property
    def log_settle_seconds(self) -> float:
        """Seconds a log service may still deliver lines after the job ended (ingestion delay): the trigger
        reads once more after this long before it reports the end, so late last lines are not lost."""
        return 0.0

    def __init__(self, step_operator_conn_id: str | None = None,
                 config: BaseStepOperatorConfig | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step_operator_conn_id = step_operator_conn_id or self.default_conn_name
        if config is not None:
            self.__dict__["config"] = config

    @cached_property
    def config(self) -> BaseStepOperatorConfig:
        _, extras = load_step_operator_connection(self.step_operator_conn_id, self.flavor)
        return parse_config(self.flavor, self.step_operator_conn_id, extras)

    def artifact_root(self) -> Any:
        """Where bundles and results go; no network (``stepops render`` builds a spec with it)."""
        return store_path(self.config.artifact_store or default_local_store())

    def check_store(self) -> None:
        """Refuse a store whose bucket or container does not exist, before anything is written to it."""
        check_bucket(self.artifact_root())

    # ---- to implement per flavor ------------------------------------------------------------
    def render(self, spec: StepSpec) -> dict[str, Any]:
        """The exact request that ``submit`` would send, as JSON (for ``stepops render``)."""
        raise NotImplementedError

    def find_job(self, identity: StepIdentity) -> JobHandle | None:
        """The job of exactly this identity (same try) if it exists: re-attach instead of submitting."""
        raise NotImplementedError

    def submit(self, spec: StepSpec) -> JobHandle:
        raise NotImplementedError

    def get_status(self, handle: JobHandle) -> JobStatus:
        raise NotImplementedError

    def cancel(self, handle: JobHandle) -> None:
        raise NotImplementedError

    def read_logs(self, handle: JobHandle, cursor: Any) -> tuple[list[str], Any]:
        """New log lines since ``cursor`` and the cursor to pass next time."""
        return [], cursor

    def console_url(self, handle: JobHandle) -> str | None:
        return None

    def collect_output(self, handle: JobHandle) -> None:
        """Bring a finished job's output into the artifact store, for backends that return it
        some other way (the Kubernetes pod log); the operator calls it before reading the result."""

    # ---- async side, used by triggers; default to the sync calls in a thread ----------------
    async def aget_statuses(self, handles: list[JobHandle]) -> list[JobStatus | BaseException]:
        """Status of many jobs at once, in order: shared polling calls this once per round per
        backend. A job whose status cannot be read gets its exception in its place."""
        return list(await asyncio.gather(*(asyncio.to_thread(self.get_status, h) for h in handles),
                                         return_exceptions=True))

    async def acancel(self, handle: JobHandle) -> None:
        await asyncio.to_thread(self.cancel, handle)

    async def aread_logs(self, handle: JobHandle, cursor: Any) -> tuple[list[str], Any]:
        return await asyncio.to_thread(self.read_logs, handle, cursor)

    def polling_key(self) -> tuple[Any, ...]:
        """Triggers whose hooks share this key share one status-polling loop."""
        return (type(self).__module__, type(self).__qualname__, self.step_operator_conn_id)
