"""App logs as Modal keeps them: each line a function's container writes, plus the service's own lines.

A line becomes an entry the moment it is read: ``TaskLogs`` with the text (newline kept, as Modal sends
it), a nanosecond timestamp, the file descriptor (STDOUT, STDERR; the service's lines are INFO, which the
client shows as source "system"), and the ids of the app, function, function call, input and task. Entries
are numbered in the order they arrive (the ``entry_id`` that ``AppGetLogs`` resumes after, as the modal
client's ``_LogsManager.stream`` does with ``last_entry_id``) and stamped when they are written. With
``late_every`` set, every n-th entry arrives ``late_seconds`` after it was written, behind entries written
after it: it gets a later number but keeps its earlier timestamp, so a reader that resumes from the last
timestamp it saw never gets it. Queries are what ``AppFetchLogs``, ``AppCountLogs`` and ``AppGetLogs`` ask: a
time range, a source, function / function call / task ids and a search text, joined by AND.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from modal_proto import api_pb2

STDOUT = api_pb2.FILE_DESCRIPTOR_STDOUT
STDERR = api_pb2.FILE_DESCRIPTOR_STDERR
SYSTEM = api_pb2.FILE_DESCRIPTOR_INFO
_FD_NAMES = {STDOUT: "stdout", STDERR: "stderr", SYSTEM: "system"}


@dataclass(frozen=True)
class LogEntry:
    seq: int
    timestamp_ns: int
    fd: int
    data: str
    app_id: str
    function_id: str
    function_call_id: str
    input_id: str
    task_id: str

    def item(self) -> api_pb2.TaskLogs:
        return api_pb2.TaskLogs(data=self.data, timestamp=self.timestamp_ns / 1e9, timestamp_ns=self.timestamp_ns,
                                file_descriptor=self.fd, function_call_id=self.function_call_id,
                                input_id=self.input_id, container_id=self.task_id)

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "timestamp_ns": self.timestamp_ns, "source": _FD_NAMES.get(self.fd, str(self.fd)),
                "data": self.data, "app_id": self.app_id, "function_id": self.function_id,
                "function_call_id": self.function_call_id, "input_id": self.input_id, "task_id": self.task_id}


@dataclass(frozen=True)
class LogQuery:
    """The filters of a log request; empty strings and FILE_DESCRIPTOR_UNSPECIFIED match everything."""

    app_id: str = ""
    since_ns: int | None = None
    until_ns: int | None = None
    source: int = api_pb2.FILE_DESCRIPTOR_UNSPECIFIED
    function_id: str = ""
    function_call_id: str = ""
    task_id: str = ""
    search_text: str = ""

    def matches(self, entry: LogEntry) -> bool:
        return ((not self.app_id or entry.app_id == self.app_id)
                and (self.since_ns is None or entry.timestamp_ns >= self.since_ns)
                and (self.until_ns is None or entry.timestamp_ns < self.until_ns)
                and (not self.source or entry.fd == self.source)
                and (not self.function_id or entry.function_id == self.function_id)
                and (not self.function_call_id or entry.function_call_id == self.function_call_id)
                and (not self.task_id or entry.task_id == self.task_id)
                and (not self.search_text or self.search_text in entry.data))

    @classmethod
    def of(cls, request: Any) -> LogQuery:
        """From an ``AppFetchLogsRequest`` / ``AppCountLogsRequest`` / ``AppGetLogsRequest``."""
        fields = request.DESCRIPTOR.fields_by_name
        ranged = "since" in fields
        return cls(app_id=request.app_id,
                   since_ns=_nanos(request.since) if ranged and request.HasField("since") else None,
                   until_ns=_nanos(request.until) if ranged and request.HasField("until") else None,
                   source=request.source if "source" in fields else request.file_descriptor,
                   function_id=request.function_id, function_call_id=request.function_call_id,
                   task_id=request.task_id, search_text=request.search_text)


def _nanos(stamp: Any) -> int:
    return stamp.seconds * 1_000_000_000 + stamp.nanos


class LogStore:
    """Every log entry, oldest first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: list[LogEntry] = []
        self._held: list[tuple[float, LogEntry]] = []  # (when it arrives, the entry without its number)
        self._last_ns = 0
        self._written = 0
        self.late_every = 0
        self.late_seconds = 1.0

    def write(self, data: str, fd: int, *, app_id: str, function_id: str, function_call_id: str,
              input_id: str = "", task_id: str = "") -> None:
        with self._lock:
            self._arrive()
            self._last_ns = max(time.time_ns(), self._last_ns + 1)
            self._written += 1
            entry = LogEntry(0, self._last_ns, fd, data, app_id, function_id, function_call_id, input_id, task_id)
            if self.late_every and self._written % self.late_every == 0:
                self._held.append((time.monotonic() + self.late_seconds, entry))
            else:
                self._entries.append(replace(entry, seq=len(self._entries) + 1))

    def _arrive(self) -> None:
        """Number the held entries whose time has come (under the lock)."""
        now = time.monotonic()
        for due, entry in [h for h in self._held if h[0] <= now]:
            self._held.remove((due, entry))
            self._entries.append(replace(entry, seq=len(self._entries) + 1))

    def entries(self, query: LogQuery | None = None, after_seq: int = 0) -> list[LogEntry]:
        """Matching entries that have arrived, after number ``after_seq``, in the order they arrived."""
        with self._lock:
            self._arrive()
            found = self._entries[after_seq:]
        return [e for e in found if query is None or query.matches(e)]

    def fetch(self, query: LogQuery, limit: int) -> list[LogEntry]:
        """The newest ``limit`` matching entries (all when ``limit`` is 0), in time order: what a tail asks."""
        found = sorted(self.entries(query), key=lambda e: e.timestamp_ns)
        return found[-limit:] if limit else found

    def count(self, query: LogQuery, bucket_secs: int) -> list[api_pb2.AppCountLogsResponse.LogBucket]:
        """Counts per source in buckets of ``bucket_secs`` aligned to the epoch, covering the query's range."""
        bucket_ns = max(bucket_secs, 1) * 1_000_000_000
        since = query.since_ns if query.since_ns is not None else 0
        until = query.until_ns if query.until_ns is not None else time.time_ns()
        counts: dict[int, list[int]] = {}
        for entry in self.entries(query):
            start = entry.timestamp_ns - entry.timestamp_ns % bucket_ns
            counts.setdefault(start, [0, 0, 0])[{STDOUT: 0, STDERR: 1}.get(entry.fd, 2)] += 1
        buckets = []
        start = since - since % bucket_ns
        while start < until and len(buckets) < 10_000:
            stdout, stderr, system = counts.get(start, [0, 0, 0])
            stamp = api_pb2.AppCountLogsResponse.LogBucket(stdout_logs=stdout, stderr_logs=stderr, system_logs=system)
            stamp.bucket_start_at.seconds, stamp.bucket_start_at.nanos = divmod(start, 1_000_000_000)
            buckets.append(stamp)
            start += bucket_ns
        return buckets


def batches(entries: Iterable[LogEntry]) -> list[api_pb2.TaskLogsBatch]:
    """Consecutive entries of one task (and function, input) as one ``TaskLogsBatch``; ``entry_id`` is the
    number of a batch's last entry, which a stream resumes after."""
    out: list[api_pb2.TaskLogsBatch] = []
    key: tuple[str, str, str] | None = None
    for entry in entries:
        here = (entry.task_id, entry.function_id, entry.input_id)
        if key != here or not out:
            out.append(api_pb2.TaskLogsBatch(task_id=entry.task_id, function_id=entry.function_id,
                                             input_id=entry.input_id))
            key = here
        out[-1].items.append(entry.item())
        out[-1].entry_id = str(entry.seq)
    return out
