"""Reading a step operator connection: which flavor it is, its extras, and its validated config model.

Kept apart from the hooks so that what reads connections (operator, hooks, triggers, CLI) needs no hook,
and the hooks need not know where connections come from.
"""

from __future__ import annotations

import json
import os
from typing import Any

from airflow_stepops.exceptions import StepOperatorConfigError
from airflow_stepops.flavors import FLAVORS, flavor_for_conn_type, get_flavor
from airflow_stepops.settings.base import BaseStepOperatorConfig
from airflow_stepops.settings.step import validated


def registered_step_operators() -> dict[str, str]:
    """Connection id -> flavor of every step operator this process can see (DB and env)."""
    found: dict[str, str] = {}
    prefix = "AIRFLOW_CONN_"
    for key, value in os.environ.items():
        if key.startswith(prefix):
            flavor = flavor_for_conn_type(_conn_type_of_env(value))
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
        conn = get_connection(conn_id)
    except AirflowNotFoundException:
        if expected_flavor and conn_id == get_flavor(expected_flavor).default_conn_id:
            return expected_flavor, {}
        raise StepOperatorConfigError(
            f"step_operator {conn_id!r}: no Airflow connection with this id; {_registered_hint()}. "
            f"Register one with: airflow connections add {conn_id} --conn-type stepops_<flavor> "
            f"--conn-extra '{{...}}' (flavors: {', '.join(sorted(FLAVORS))})"
        ) from None
    return flavor_and_extras(conn_id, conn.conn_type, connection_extras(conn_id, conn), expected_flavor)


def load_config(conn_id: str, expected_flavor: str | None = None) -> tuple[str, BaseStepOperatorConfig]:
    """(flavor, validated config) of a step operator connection."""
    flavor, extras = load_step_operator_connection(conn_id, expected_flavor)
    return flavor, parse_config(flavor, conn_id, extras)


def connection_extras(conn_id: str, conn: Any) -> dict[str, Any]:
    """The connection's extra as a dict, or one clear error: the one place step operators parse extras.

    Airflow's ``extra_dejson`` logs a non-JSON extra at every access and returns ``{}``, which would run
    the step with defaults instead of what was configured."""
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


def get_connection(conn_id: str) -> Any:
    """The connection from the task SDK, or from Airflow's secrets backends and metadata DB when
    called outside a task (``stepops`` CLI, DAG processor)."""
    from airflow.sdk import BaseHook

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


def flavor_and_extras(conn_id: str, conn_type: str | None, extras: dict[str, Any],
                      expected_flavor: str | None) -> tuple[str, dict[str, Any]]:
    """The flavor of a connection of type ``conn_type``, refused unless it is a step operator of
    ``expected_flavor`` (when given)."""
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
    spec = get_flavor(flavor)
    return validated(spec.config_model(), extras, f"connection {conn_id!r} ({spec.conn_type}) extra")
