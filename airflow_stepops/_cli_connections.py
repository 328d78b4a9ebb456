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
from urllib.parse import parse_qsl, unquote, urlsplit

Connection = tuple[str, dict[str, Any]]  # (conn_type, extras)
PREFIX = "AIRFLOW_CONN_"


def airflow_home() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get("AIRFLOW_HOME") or "~/airflow"))


def _config() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False)
    parser.read(os.path.expanduser(os.environ.get("AIRFLOW_CONFIG") or os.path.join(airflow_home(), "airflow.cfg")))
    return parser


class CliError(Exception):
    """A problem the user fixes (printed without a traceback, exit status 2)."""


class _NeedsAirflow(Exception):
    """The configuration uses something only Airflow resolves."""


def _option(cfg: configparser.RawConfigParser, section: str, key: str) -> str | None:
    """Airflow's precedence for the plain forms: ``AIRFLOW__SECTION__KEY``, then airflow.cfg."""
    env = f"AIRFLOW__{section.upper()}__{key.upper()}"
    if any(f"{env}_{kind}" in os.environ for kind in ("CMD", "SECRET")) or any(
            cfg.has_option(section, f"{key}_{kind}") for kind in ("cmd", "secret")):
        raise _NeedsAirflow(f"{section}.{key} comes from a command or secret")
    if env in os.environ:
        return os.environ[env]
    return cfg.get(section, key) if cfg.has_option(section, key) else None


def parse_env_connection(value: str) -> Connection | None:
    """An ``AIRFLOW_CONN_*`` value: JSON, or a URI whose scheme is the type with ``-`` for ``_``."""
    value = value.strip()
    if value.startswith("{"):
        try:
            data = json.loads(value)
        except ValueError:
            return None
        extra = data.get("extra") or {}
        return str(data.get("conn_type") or ""), json.loads(extra) if isinstance(extra, str) else dict(extra)
    if "://" not in value:
        return None
    parts = urlsplit(value)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    extras = json.loads(query["__extra__"]) if "__extra__" in query else {k: unquote(v) for k, v in query.items()}
    return parts.scheme.replace("-", "_"), extras


def _decrypt(token: str, fernet_key: str | None) -> str:
    if not fernet_key:
        raise _NeedsAirflow("encrypted extras without a fernet key")
    from cryptography.fernet import Fernet, MultiFernet

    return MultiFernet([Fernet(k.strip().encode()) for k in fernet_key.split(",") if k.strip()]).decrypt(
        token.encode()).decode()


def _database_connections() -> dict[str, Connection]:
    cfg = _config()
    if _option(cfg, "secrets", "backend") or _option(cfg, "database", "sql_alchemy_schema"):
        raise _NeedsAirflow("a secrets backend or a database schema is configured")
    url = _option(cfg, "database", "sql_alchemy_conn") or f"sqlite:///{os.path.join(airflow_home(), 'airflow.db')}"
    if url.startswith("sqlite:///") and not os.path.exists(url[len("sqlite:///"):]):
        raise CliError(f"no Airflow metadata database at {url[len('sqlite:///'):]}; create it with "
                                "`airflow db migrate` (make demo does)")
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as db:
            rows = db.execute(sqlalchemy.text(
                "SELECT conn_id, conn_type, extra, is_extra_encrypted FROM connection")).all()
    finally:
        engine.dispose()
    fernet_key = _option(cfg, "core", "fernet_key")
    found = {}
    for conn_id, conn_type, extra, encrypted in rows:
        text = _decrypt(extra, fernet_key) if extra and encrypted else extra
        try:
            extras = json.loads(text) if text else {}
        except ValueError:
            extras = {}
        found[conn_id] = (conn_type or "", extras if isinstance(extras, dict) else {})
    return found


@dataclass
class Registry:
    """The connections this process sees; ``direct`` False means Airflow answers every look-up."""

    connections: dict[str, Connection] = field(default_factory=dict)
    direct: bool = True

    @classmethod
    def load(cls) -> Registry:
        try:
            found = _database_connections()
        except _NeedsAirflow:
            return cls(direct=False)
        for key, value in os.environ.items():  # environment variables come first in Airflow's order
            if key.startswith(PREFIX) and (conn := parse_env_connection(value)) is not None:
                found[key[len(PREFIX):].lower()] = conn
        return cls(found)

    def get(self, conn_id: str) -> Connection | None:
        if self.direct:
            return self.connections.get(conn_id)
        return _airflow_lookup(conn_id)

    def step_operators(self) -> dict[str, str]:
        """Connection id -> flavor of every step operator connection."""
        from airflow_stepops.flavors import flavor_for_conn_type

        if not self.direct:
            from airflow_stepops.hooks.base import registered_step_operators

            return registered_step_operators()
        return {k: f.name for k, (t, _) in sorted(self.connections.items()) if (f := flavor_for_conn_type(t))}


def _airflow_lookup(conn_id: str) -> Connection | None:
    """Airflow's secrets backends in their order, asked directly: ``Connection.get_connection_from_secrets``
    would also build the connection's URI for its cache, which warns about the ``_`` of every
    ``stepops_*`` type (see docs/decisions.md)."""
    from airflow.configuration import ensure_secrets_loaded

    for backend in ensure_secrets_loaded():
        try:
            conn = backend.get_connection(conn_id=conn_id)
        except Exception:
            continue
        if conn is not None:
            return str(conn.conn_type or ""), dict(conn.extra_dejson or {})
    return None
