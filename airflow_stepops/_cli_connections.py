"""Connections for ``stepops list`` / ``describe``, read without importing Airflow where that is exact.

Airflow looks connections up in its secrets backends in order: environment variables
(``AIRFLOW_CONN_<ID>``), then the metadata database
(https://airflow.apache.org/docs/apache-airflow/stable/security/secrets/secrets-backend/index.html). When
the configuration names no other backend and its database settings are plain values, this module reads
both directly (environment, ``airflow.cfg``, one SELECT, Fernet-encrypted extras decrypted as Airflow does),
which takes a fraction of the seconds importing Airflow takes. Anything else (a secrets backend,
``*_cmd``/``*_secret`` settings, a schema) is left to Airflow itself.
"""

from __future__ import annotations

import configparser
import json
import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

Connection = tuple[str, dict[str, Any]]  # (conn_type, extras)
PREFIX = "AIRFLOW_CONN_"


def airflow_home() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get("AIRFLOW_HOME") or "~/airflow"))


def _config() -> configparser.ConfigParser:
    """airflow.cfg as Airflow reads it: a ConfigParser, so ``%%`` is ``%`` and ``%(name)s`` interpolates."""
    parser = configparser.ConfigParser(strict=False)
    parser.read(os.path.expanduser(os.environ.get("AIRFLOW_CONFIG") or os.path.join(airflow_home(), "airflow.cfg")))
    return parser


class CliError(Exception):
    """A problem the user fixes (printed without a traceback, exit status 2)."""


class _NeedsAirflow(Exception):
    """The configuration uses something only Airflow resolves."""


def _expand(value: str) -> str:
    """Airflow's ``expand_env_var``: environment variables and ``~``, until nothing changes."""
    while True:
        expanded = os.path.expanduser(os.path.expandvars(value))
        if expanded == value:
            return value
        value = expanded


def _option(cfg: configparser.ConfigParser, section: str, key: str, *fallbacks: str) -> str | None:
    """Airflow's precedence for the plain forms: ``AIRFLOW__SECTION__KEY``, then airflow.cfg; then the
    deprecated ``section.key`` names in ``fallbacks`` (e.g. ``core.sql_alchemy_conn``)."""
    for name in (f"{section}.{key}", *fallbacks):
        sect, opt = name.split(".")
        env = f"AIRFLOW__{sect.upper()}__{opt.upper()}"
        if any(f"{env}_{kind}" in os.environ for kind in ("CMD", "SECRET")) or any(
                cfg.has_option(sect, f"{opt}_{kind}") for kind in ("cmd", "secret")):
            raise _NeedsAirflow(f"{sect}.{opt} comes from a command or secret")
        try:
            value = os.environ.get(env) or (cfg.get(sect, opt) if cfg.has_option(sect, opt) else None)
        except configparser.Error as exc:  # an interpolation only Airflow's own parser resolves
            raise _NeedsAirflow(str(exc)) from None
        if value:
            return _expand(value)
    return None


def _extras(conn_id: str, raw: Any) -> dict[str, Any]:
    """A connection's extra as a dict; a CliError worded as the operator's (connections.connection_extras)."""
    if not raw:
        return {}
    try:
        parsed = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError as exc:
        raise CliError(f"connection {conn_id!r} extra: not valid JSON ({exc}); set it to a JSON object") from None
    if not isinstance(parsed, dict):
        raise CliError(f"connection {conn_id!r} extra: must be a JSON object ({{...}}), got a JSON "
                       f"{type(parsed).__name__}")
    return parsed


def parse_env_connection(value: str) -> tuple[str, Any] | None:
    """An ``AIRFLOW_CONN_*`` value as (type, raw extra): JSON, or a URI whose scheme is the type with ``-``
    for ``_``; None when not even the type can be read (Airflow fails that look-up too)."""
    value = value.strip()
    if value.startswith("{"):
        try:
            data = json.loads(value)
        except ValueError:
            return None
        return (str(data.get("conn_type") or ""), data.get("extra")) if isinstance(data, dict) else None
    if "://" not in value:
        return None
    parts = urlsplit(value)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))  # values come back unquoted
    return parts.scheme.replace("-", "_"), query["__extra__"] if "__extra__" in query else query


def _decrypt(token: str, fernet_key: str | None) -> str:
    if not fernet_key:
        raise _NeedsAirflow("encrypted extras without a fernet key")
    from cryptography.fernet import Fernet, MultiFernet

    return MultiFernet([Fernet(k.strip().encode()) for k in fernet_key.split(",") if k.strip()]).decrypt(
        token.encode()).decode()


def _database_connections() -> dict[str, tuple[str, Any]]:
    """The metadata database's connections; CliError when it cannot be read."""
    cfg = _config()
    if _option(cfg, "secrets", "backend") or _option(cfg, "database", "sql_alchemy_schema") or _option(
            cfg, "database", "sql_alchemy_connect_args") or _option(cfg, "database", "sql_alchemy_engine_args"):
        raise _NeedsAirflow("a secrets backend, a database schema or engine arguments are configured")
    url = _option(cfg, "database", "sql_alchemy_conn", "core.sql_alchemy_conn") or \
        f"sqlite:///{os.path.join(airflow_home(), 'airflow.db')}"
    if url.startswith("sqlite:///") and not os.path.exists(url[len("sqlite:///"):].split("?", 1)[0]):
        raise CliError(f"no Airflow metadata database at {url[len('sqlite:///'):]}; create it with "
                       "`airflow db migrate` (make demo does)")
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(url)
        try:
            with engine.connect() as db:
                rows = db.execute(sqlalchemy.text(
                    "SELECT conn_id, conn_type, extra, is_extra_encrypted FROM connection")).all()
        finally:
            engine.dispose()
    except (ImportError, sqlalchemy.exc.SQLAlchemyError) as exc:
        where = sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CliError(f"cannot read connections from the metadata database {where}: {first} (is it migrated: "
                       "`airflow db migrate`?)") from None
    fernet_key = _option(cfg, "core", "fernet_key")
    return {conn_id: (conn_type or "", _decrypt(extra, fernet_key) if extra and encrypted else extra)
            for conn_id, conn_type, extra, encrypted in rows}


@dataclass
class Registry:
    """The connections this process sees; ``direct`` False means Airflow answers every look-up.

    ``problem``: why the metadata database could not be read; connections from the environment still
    answer, and a look-up they do not answer raises it."""

    connections: dict[str, tuple[str, Any]] = field(default_factory=dict)
    direct: bool = True
    problem: str | None = None

    @classmethod
    def load(cls) -> Registry:
        problem = None
        try:
            found = _database_connections()
        except _NeedsAirflow:
            return cls(direct=False)
        except CliError as exc:
            found, problem = {}, str(exc)
        for key, value in os.environ.items():  # environment variables come first in Airflow's order
            if key.startswith(PREFIX) and (conn := parse_env_connection(value)) is not None:
                found[key[len(PREFIX):].lower()] = conn
        return cls(found, problem=problem)

    def exists(self, conn_id: str) -> bool:
        if self.direct:
            return conn_id in self.connections
        return _airflow_lookup(conn_id) is not None

    def get(self, conn_id: str) -> Connection | None:
        """(type, extras) of a connection; CliError for an extra that is not a JSON object."""
        if not self.direct:
            return _airflow_lookup(conn_id)
        if conn_id not in self.connections:
            if self.problem:
                raise CliError(self.problem)
            return None
        conn_type, raw = self.connections[conn_id]
        return conn_type, _extras(conn_id, raw)

    def step_operators(self) -> dict[str, str]:
        """Connection id -> flavor of every step operator connection."""
        from airflow_stepops.flavors import flavor_for_conn_type

        if not self.direct:
            from airflow_stepops.connections import registered_step_operators

            return registered_step_operators()
        if not self.connections and self.problem:
            raise CliError(self.problem)
        return {k: f.name for k, (t, _) in sorted(self.connections.items()) if (f := flavor_for_conn_type(t))}


def _airflow_lookup(conn_id: str) -> Connection | None:
    """Airflow's secrets backends in their order, asked directly: ``Connection.get_connection_from_secrets``
    would also build the connection's URI for its cache, which warns about the ``_`` of every
    ``stepops_*`` type (see docs/decisions/connections-and-cli.md)."""
    from airflow.configuration import ensure_secrets_loaded

    for backend in ensure_secrets_loaded():
        try:
            conn = backend.get_connection(conn_id=conn_id)
        except Exception:
            continue
        if conn is not None:
            return str(conn.conn_type or ""), dict(conn.extra_dejson or {})
    return None
