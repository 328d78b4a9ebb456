"""Helpers of the emulators' own tests: waiting for what an emulator does, and running one as a process
(``python -m airflow_stepops.testing.<flavor>``) as the demo and users do."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def eventually(probe: Callable[[], T], timeout: float = 30.0, what: str = "condition") -> T:
    """Poll ``probe`` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while not (found := probe()):
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)
    return found


def running_pid(emulator: Any, job_id: str) -> int:
    """The job's process, once it runs."""
    emulator.wait_for_state(job_id, "running")
    pid = emulator.pid(job_id)
    assert pid is not None
    return pid


def gone(*pids: int) -> bool:
    """Whether every one of these processes has ended (a zombie not reaped yet has too)."""
    import psutil

    def ended(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    return all(ended(pid) for pid in pids)


@contextmanager
def emulator_process(flavor: str, env_file: Path, *args: str, timeout: float = 60) -> Iterator[dict[str, str]]:
    """The environment it publishes (read as a shell reads the file) while it serves; on leaving, SIGTERM: it
    must exit 0, having said where it served, and remove the file."""
    proc = subprocess.Popen([sys.executable, "-m", f"airflow_stepops.testing.{flavor}", "--env-file", str(env_file),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + timeout
        while not env_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the env file did not appear"
            time.sleep(0.1)
        yield dict(word.split("=", 1) for word in shlex.split(env_file.read_text()))
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and " serving on " in out and not env_file.exists(), out
