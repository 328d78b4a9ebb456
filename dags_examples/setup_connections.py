"""Register the example step operators as Airflow connections (idempotent).

``python dags_examples/setup_connections.py [FLAVOR]`` registers the example step operators of that
flavor from ``connections.json`` (``local_step_operator`` by default; ``${VAR}`` in extras is expanded,
and an extra naming an unset variable is left out) and prints the id of the first one on stdout, for ``STEPOPS_EXAMPLE_STEP_OPERATOR``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

CONNECTIONS = json.loads((Path(__file__).with_name("connections.json")).read_text())


def _expand(value):
    if isinstance(value, str):
        return os.path.expandvars(value)
    if isinstance(value, dict):  # an extra naming an unset variable is left out
        return {k: _expand(v) for k, v in value.items() if not _unset_variable(v)}
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


def _unset_variable(value) -> bool:
    return isinstance(value, str) and "${" in os.path.expandvars(value)


def main(flavor: str = "local") -> None:
    from airflow.models import Connection
    from airflow.utils.session import create_session

    wanted = {cid: spec for cid, spec in CONNECTIONS.items() if spec["conn_type"] == f"stepops_{flavor}"}
    if not wanted:
        raise SystemExit(f"no example step operator of flavor {flavor!r} in connections.json")
    with create_session() as session:
        for conn_id, spec in wanted.items():
            session.query(Connection).filter(Connection.conn_id == conn_id).delete()
            session.add(Connection(conn_id=conn_id, conn_type=spec["conn_type"],
                                   description=spec.get("description"),
                                   extra=json.dumps(_expand(spec.get("extra", {})))))
            print(f"registered step operator {conn_id!r} ({spec['conn_type']})", file=sys.stderr)
    print(next(iter(wanted)))


if __name__ == "__main__":
    main(*sys.argv[1:2])
