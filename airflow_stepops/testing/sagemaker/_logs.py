"""Shipping a training process's output to CloudWatch Logs as SageMaker does.

SageMaker writes each instance's container output to the log group ``/aws/sagemaker/TrainingJobs``,
stream ``<TrainingJobName>/algo-<n>-<epoch seconds when the instance started>``; a restarted spot job
gets a new stream. Lines reach CloudWatch within seconds; here every ``log_flush_interval``.
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

    def __init__(self, logs: Any, stream: str) -> None:
        self.logs, self.stream = logs, stream
        self._lock = threading.Lock()
        self._pending: list[dict[str, Any]] = []
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
            self._pending.append({"timestamp": ms, "message": line})

    def flush(self) -> None:
        with self._flush_lock:  # one put at a time keeps the stream in order
            with self._lock:
                events, self._pending = self._pending, []
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
