"""Cloud Logging as Vertex AI custom jobs fill it: the replica's output and the service's own lines.

Each line a job process writes becomes a LogEntry the moment it is read, shaped like Vertex's: logName
``projects/<project>/logs/workerpool0-0``, resource ``ml_job`` with labels ``job_id``, ``project_id``,
``task_name``, severity ``INFO`` for stdout and ``ERROR`` for stderr. The training service's lines
("Waiting for job to be provisioned.", "Job failed.", ...) go to
``projects/<project>/logs/ml.googleapis.com%2F<job_id>`` with ``task_name`` ``service``.

Timestamps are strictly increasing nanoseconds and ``insertId`` is the timestamp in fixed-width hex. Cloud
Logging receives entries late and out of order (``entries:tail`` buffers up to 60 s "to prevent out of
order results due to late arriving log entries", https://cloud.google.com/logging/docs/reference/v2/rest/
v2/entries/tail): with ``late = (every, seconds)`` every ``every``-th line of a replica becomes visible
only ``seconds`` after it was written, behind entries stamped later, so a reader that resumes strictly
after the newest timestamp it saw loses it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from typing import Any

from airflow_stepops.testing.vertex._errors import ApiError, invalid_argument
from airflow_stepops.testing.vertex._filters import log_filter
from airflow_stepops.testing.vertex._time import Clock, format_rfc3339

JSON = dict[str, Any]
REPLICA = "workerpool0-0"
SERVICE = "service"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


class LogStore:
    """Every log entry the emulated jobs wrote, oldest first."""

    def __init__(self, project: str, project_number: str, location: str, clock: Clock) -> None:
        self.project, self.project_number, self.location = project, project_number, location
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: list[tuple[int, JSON]] = []  # (visible from, entry), in timestamp order
        self._written = 0
        #: (every, seconds): every ``every``-th replica line is ingested ``seconds`` late; None: none is
        self.late: tuple[int, float] | None = None

    def write(self, job_id: str, text: str, *, severity: str = "INFO", task: str = REPLICA) -> JSON:
        """Append one line of ``task`` (``workerpool0-0`` or ``service``) of the job; returns the entry."""
        with self._lock:  # stamp and append under one lock: the list stays in timestamp order
            stamp = self.clock.now()
            log = REPLICA if task == REPLICA else f"ml.googleapis.com%2F{job_id}"
            labels = {"ml.googleapis.com/job_id/log_area": "user" if task == REPLICA else "service",
                      "ml.googleapis.com/trial_id": ""}
            if task == REPLICA:
                labels["compute.googleapis.com/zone"] = f"{self.location}-a"
            entry = {
                "insertId": f"{stamp:016x}",
                "logName": f"projects/{self.project}/logs/{log}",
                "resource": {"type": "ml_job", "labels": {"job_id": job_id, "project_id": self.project,
                                                          "task_name": task}},
                "textPayload": text,
                "timestamp": format_rfc3339(stamp),
                "receiveTimestamp": format_rfc3339(stamp + 1_000_000),
                "severity": severity,
                "labels": labels,
            }
            visible = stamp
            if task == REPLICA:
                self._written += 1
                if self.late is not None and self._written % self.late[0] == 0:
                    visible += int(self.late[1] * 1e9)
            self._entries.append((visible, entry))
        return entry

    def entries(self, job_id: str | None = None, task: str | None = None) -> list[JSON]:
        """The entries ingested so far, in timestamp order."""
        now = self.clock.now()
        with self._lock:
            found = [entry for visible, entry in self._entries if visible <= now]
        return [e for e in found if (job_id is None or e["resource"]["labels"]["job_id"] == job_id)
                and (task is None or e["resource"]["labels"]["task_name"] == task)]

    # ----- entries:list --------------------------------------------------------------------------------

    def list_entries(self, body: JSON) -> JSON:
        """Answer ``POST /v2/entries:list`` (``resourceNames``, ``filter``, ``orderBy``, ``pageSize``,
        ``pageToken``)."""
        unknown = set(body) - {"resourceNames", "projectIds", "filter", "orderBy", "pageSize", "pageToken"}
        if unknown:
            raise invalid_argument(f"Invalid JSON payload received. Unknown name \"{sorted(unknown)[0]}\": "
                                   "Cannot find field.")
        names = list(body.get("resourceNames") or []) + [f"projects/{p}" for p in body.get("projectIds") or []]
        if not names:
            raise invalid_argument("resourceNames: At least one resource name must be specified.")
        projects = set()
        for name in names:
            parts = str(name).split("/")
            if len(parts) != 2 or parts[0] != "projects":
                raise invalid_argument(f"resource_names: the emulator lists projects/<project> only, not {name!r}")
            projects.add(parts[1])
        order = (body.get("orderBy") or "timestamp asc").strip().lower()
        if order not in ("timestamp asc", "timestamp desc", "timestamp"):
            raise invalid_argument(f'orderBy: only "timestamp asc" and "timestamp desc" are supported, '
                                   f'not "{body.get("orderBy")}"')
        descending = order == "timestamp desc"
        size = int(body.get("pageSize") or DEFAULT_PAGE_SIZE)
        if size < 0:
            raise invalid_argument("page_size must not be negative")
        size = min(size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        text = body.get("filter") or ""
        match = log_filter(text)
        query = hashlib.sha256(json.dumps([sorted(projects), text, descending]).encode()).hexdigest()[:16]
        after = _read_token(body.get("pageToken"), query)
        ours = projects & {self.project, self.project_number}
        entries = self.entries() if ours else []
        if descending:
            entries.reverse()
        if after is not None:
            entries = [e for e in entries if (e["insertId"] < after if descending else e["insertId"] > after)]
        page: list[JSON] = []
        for entry in entries:
            if match(entry):
                if len(page) == size:
                    return {"entries": page, "nextPageToken": _token(page[-1]["insertId"], query)}
                page.append(entry)
        return {"entries": page} if page else {}


def _token(insert_id: str, query: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": insert_id, "q": query}).encode()).decode()


def _read_token(token: str | None, query: str) -> str | None:
    if not token:
        return None
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token.encode()))
        after, made_for = str(decoded["after"]), decoded["q"]
    except (ValueError, KeyError, TypeError):
        raise invalid_argument(f"page_token: invalid page token {token!r}") from None
    if made_for != query:
        raise ApiError("INVALID_ARGUMENT", "page_token does not match the request: resend the same filter, "
                                           "orderBy and resourceNames with it")
    return after
