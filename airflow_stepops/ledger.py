"""``stepops cost``: what steps cost, added up per DAG run, DAG, task, step operator or day, from the job summaries
(XCom ``stepops_job``) in Airflow's metadata database.

Each summary lists the charges of every attempt of every try of its task instance (``charges``), so the latest
summary of a task instance is its whole bill; an attempt whose price was unknown is counted, not guessed.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

#: the ledger's groupings, and the columns of a charge that key each
GROUPS = {"run": ("dag_id", "run_id"), "dag": ("dag_id",), "task": ("dag_id", "task_id"),
          "step_operator": ("step_operator", "flavor"), "day": ("day",)}
FORMATS = ("table", "csv", "json")
_RELATIVE = re.compile(r"^(\d+)([dh])$")


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """``2026-12-01``, an ISO date-time, or a span back from now: ``7d``, ``12h``."""
    found = _RELATIVE.match(value.strip())
    if found:
        amount, unit = int(found.group(1)), found.group(2)
        return (now or datetime.now(timezone.utc)) - timedelta(**{"days" if unit == "d" else "hours": amount})
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"--since: {value!r} is not a date (2026-12-01), a date-time (2026-12-01T08:00) or a span "
                         "back from now (7d, 12h)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def charges(dag_id: str | None = None, since: datetime | None = None) -> Iterator[dict[str, Any]]:
    """Every recorded charge, with the task instance it belongs to and its UTC day."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    from airflow_stepops.operators.base import XCOM_JOB_KEY

    with create_session() as session:
        query = session.query(XComModel).filter(XComModel.key == XCOM_JOB_KEY)
        if dag_id:
            query = query.filter(XComModel.dag_id == dag_id)
        rows = [(row.dag_id, row.run_id, row.task_id, row.map_index, XComModel.deserialize_value(row))
                for row in query]
    for dag, run, task, map_index, info in rows:
        for charge in (info.get("charges") or []) if isinstance(info, dict) else []:
            ended = datetime.fromtimestamp(float(charge.get("ended_at") or 0), timezone.utc)
            if since is not None and ended < since:
                continue
            yield {"dag_id": dag, "run_id": run, "task_id": task, "map_index": map_index, **charge,
                   "day": ended.date().isoformat()}


def ledger(found: list[dict[str, Any]], by: str) -> list[dict[str, Any]]:
    """The charges summed per ``by`` group and currency; attempts without a known price are counted apart."""
    keys = GROUPS[by]
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for charge in found:
        currency = charge.get("currency") if charge.get("amount") is not None else None
        key = (*(charge.get(k) for k in keys), currency)
        row = rows.setdefault(key, {**{k: charge.get(k) for k in keys}, "currency": currency or "", "amount": 0.0,
                                    "attempts": 0, "billed_seconds": 0, "unpriced_attempts": 0})
        row["attempts"] += 1
        row["billed_seconds"] += int(charge.get("billed_seconds") or 0)
        if currency is None:
            row["unpriced_attempts"] += 1
        else:
            row["amount"] = round(row["amount"] + float(charge["amount"]), 9)
    return sorted(rows.values(), key=lambda r: tuple(str(r[k]) for k in (*keys, "currency")))


def render(rows: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2)
    columns = list(rows[0]) if rows else ["amount"]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()
    if not rows:
        return "no step charges recorded"
    cells = [columns, *([f"{r[c]:.6f}" if c == "amount" else str(r[c]) for c in columns] for r in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in cells)
