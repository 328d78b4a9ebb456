"""Shipping a training process's output to CloudWatch Logs as SageMaker does.

SageMaker writes each instance's container output to the log group ``/aws/sagemaker/TrainingJobs``,
stream ``<TrainingJobName>/algo-<n>-<epoch seconds when the instance started>``; a restarted spot job
gets a new stream. Lines reach CloudWatch within seconds; here every ``log_flush_interval``.

Late ingestion: with ``late_every`` N, every Nth line is held back ``late_delay`` seconds and put in a
later PutLogEvents call than the lines after it, keeping its own (earlier) timestamp; CloudWatch Logs
accepts such events (a batch must be in chronological order, batches need not be, and events may be up
to 14 days old: https://docs.aws.amazon.com/AmazonCloudWatchLogs/latest/APIReference/API_PutLogEvents.html)
and sorts them by timestamp when read.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

LOG_GROUP = "/aws/sagemaker/TrainingJobs"

#: CloudWatch Logs limits: bytes per event (the 26-byte overhead counts), events and bytes per call
_MAX_EVENT_BYTES = 256 * 1024 - 26
_MAX_BATCH_EVENTS = 10_000
_MAX_BATCH_BYTES = 1_048_576

logger = logging.getLogger(__name__)


def stream_name(job_name: str, started: float, host: int = 1) -> str:
    return f"{job_name}/algo-{host}-{int(started)}"


class LogShipper:
    """Buffers lines with their timestamps and puts them to one stream on ``flush()``."""

    def __init__(self, logs: Any, stream: str, late_every: int = 0, late_delay: float = 0.0) -> None:
        self.logs, self.stream = logs, stream
        self.late_every, self.late_delay = late_every, late_delay
        self._lock = threading.Lock()
        self._pending: list[dict[str, Any]] = []
        self._late: list[tuple[float, dict[str, Any]]] = []  # (put no sooner than, event)
        self._count = 0
        self._last_ms = 0
        self._flush_lock = threading.Lock()

    def create(self) -> None:
        for call, kwargs in ((self.logs.create_log_group, {"logGroupName": LOG_GROUP}),
                             (self.logs.create_log_stream, {"logGroupName": LOG_GROUP, "logStreamName": self.stream})):
            try:
                call(**kwargs)
            except self.logs.exceptions.ResourceAlreadyExistsException:
                pass

    def add(self, line: str, when: float | None = None) -> None:
        data = line.encode("utf-8", errors="replace")
        if len(data) > _MAX_EVENT_BYTES:
            line = data[:_MAX_EVENT_BYTES].decode("utf-8", errors="ignore")
        with self._lock:
            ms = max(int((time.time() if when is None else when) * 1000), self._last_ms)  # chronological
            self._last_ms = ms
            self._count += 1
            if self.late_every and self._count % self.late_every == 0:
                self._late.append((time.monotonic() + self.late_delay, {"timestamp": ms, "message": line}))
            else:
                self._pending.append({"timestamp": ms, "message": line})

    def flush(self, final: bool = False) -> None:
        """Put the lines waiting, then the late ones that are due (all of them when ``final``)."""
        with self._flush_lock:  # one put at a time keeps the stream in order
            with self._lock:
                now = time.monotonic()
                due = [event for at, event in self._late if final or at <= now]
                self._late = [(at, event) for at, event in self._late if not (final or at <= now)]
                events, self._pending = self._pending, []
            self._put(events)
            self._put(due)  # a put of their own, after lines stamped later than they are

    def _put(self, events: list[dict[str, Any]]) -> None:
        while events:
            batch: list[dict[str, Any]] = []
            size = 0
            for event in events:
                cost = len(event["message"].encode("utf-8", errors="replace")) + 26
                if batch and (len(batch) >= _MAX_BATCH_EVENTS or size + cost > _MAX_BATCH_BYTES):
                    break
                batch.append(event)
                size += cost
            events = events[len(batch):]
            try:
                self.logs.put_log_events(logGroupName=LOG_GROUP, logStreamName=self.stream, logEvents=batch)
            except Exception:
                logger.exception("could not put %d log events to %s", len(batch), self.stream)
