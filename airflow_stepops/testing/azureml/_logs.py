"""A job's ``user_logs/std_log.txt``: the user process's output, kept where Azure ML keeps it.

Azure ML's common runtime (v2 jobs) writes the process's stdout and stderr to ``user_logs/std_log.txt``
among the run's artifacts, in the workspace artifact store (container ``azureml``, prefix
``ExperimentRun/dcid.<job name>/``), and run history's ``runs/{id}/details`` lists it under
``logFiles`` with a read-only SAS URL. ``MLClient.jobs.stream`` polls those details and re-reads the
file at that URL, printing the lines it has not printed yet (``_job_ops_helper._incremental_print``
skips as many lines as it printed before: the file only grows, its beginning never changes). Here the
bytes the process writes go to a local copy at once and the whole file is uploaded to Azurite every
``log_flush_interval`` seconds while it changes, so an upload can end in the middle of a line, even of a
UTF-8 character, and lines written since the last upload arrive late.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from airflow_stepops.testing.azureml._transfer import BlobLocation, Storage

logger = logging.getLogger(__name__)

#: the prefix of a run's artifacts in the workspace artifact store
ARTIFACT_PREFIX = "ExperimentRun/dcid.{name}"


class JobLog:
    """Collects a job's output lines and ships ``std_log.txt`` to the artifact store."""

    def __init__(self, path: Path, storage: Storage, location: BlobLocation, interval: float,
                 on_first_upload: Callable[[str], None]) -> None:
        self.path = path
        self.storage = storage
        self.location = location
        self.interval = interval
        self._on_first_upload = on_first_upload
        self._data = bytearray()
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._shipped = -1  # bytes in the uploaded copy
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()

    def add(self, chunk: bytes) -> None:
        """What the process wrote, as it wrote it (not necessarily whole lines)."""
        with self._lock:
            self._data += chunk
            with open(self.path, "ab") as fh:
                fh.write(chunk)

    def lines(self) -> list[str]:
        with self._lock:
            return bytes(self._data).decode("utf-8", errors="replace").splitlines()

    def start(self) -> None:
        """Upload the (empty) file now, then every ``interval`` seconds while lines arrive."""
        self.flush()
        self._thread = threading.Thread(target=self._loop, name=f"azureml-log-{self.path.parent.parent.name}",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the periodic uploads and upload what is left."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.flush()

    def flush(self) -> None:
        with self._flush_lock:
            with self._lock:
                count = len(self._data)
                if count == self._shipped:
                    return
                data = bytes(self._data)
            try:
                self.storage.upload_bytes(data, self.location)
            except Exception:
                logger.warning("could not upload %s", self.location, exc_info=True)
                return
            first = self._shipped < 0
            self._shipped = count
            if first:
                self._on_first_upload(self.storage.sas_url(self.location))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()
