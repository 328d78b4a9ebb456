"""Everything a local step starts ends with it, also processes that left its process group: a child in a
new session (``start_new_session=True``) and a double-forked daemon. Real detached launchers and steps."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from airflow_stepops.hooks.base import JobState
from airflow_stepops.runtime.local_launcher import process_start_time
from airflow_stepops.settings.local import LocalStepOperatorSettings

from .localjobs import make_hook, make_spec, wait_running, wait_terminal


def _escape_and(pid_file: str, then: str) -> str:
    """Start a setsid child and a double-forked grandchild, record their pids, then return or wait."""
    import os
    import subprocess
    import time

    session_child = subprocess.Popen(["sleep", "300"], start_new_session=True)
    read_end, write_end = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.setsid()
        daemon = os.fork()
        if daemon == 0:
            os.execvp("sleep", ["sleep", "301"])
        os.write(write_end, str(daemon).encode())
        os._exit(0)
    os.close(write_end)
    daemon = int(os.read(read_end, 32))
    os.waitpid(middle, 0)  # the daemon is an orphan now
    with open(pid_file + ".tmp", "w") as fh:
        json.dump([session_child.pid, daemon], fh)
    os.replace(pid_file + ".tmp", pid_file)
    if then == "wait":
        time.sleep(300)
    return "done"


def _escaped_pids(pid_file: Path) -> list[int]:
    deadline = time.monotonic() + 30
    while not pid_file.exists():
        assert time.monotonic() < deadline, "the step did not start its processes"
        time.sleep(0.05)
    return json.loads(pid_file.read_text())


def _assert_all_end(pids: list[int]) -> None:
    deadline = time.monotonic() + 10
    for pid in pids:
        while process_start_time(pid) is not None:
            assert time.monotonic() < deadline, f"process {pid} outlived its step"
            time.sleep(0.05)


@pytest.mark.parametrize("how", ["finishes", "cancelled", "times_out", "launcher_dies"])
def test_processes_that_left_the_group_end_with_the_step(tmp_path, how):
    hook = make_hook(tmp_path)
    pid_file = tmp_path / "escaped.json"
    settings = LocalStepOperatorSettings(cancel_grace_period_seconds=1,
                                         max_runtime_in_seconds=3 if how == "times_out" else None)
    handle = hook.submit(make_spec(hook, _escape_and, str(pid_file), "return" if how == "finishes" else "wait",
                                   settings=settings))
    pids = _escaped_pids(pid_file)
    if how == "finishes":
        assert wait_terminal(hook, handle).state is JobState.SUCCEEDED
    else:
        assert all(process_start_time(pid) is not None for pid in pids)
        wait_running(hook, handle)
    if how == "cancelled":
        hook.cancel(handle)
        assert hook.get_status(handle).state is JobState.CANCELLED
    elif how == "times_out":
        assert wait_terminal(hook, handle, timeout=20).details["reason"] == "timed_out"
    elif how == "launcher_dies":  # the supervisor is killed: the hook ends the step by its marker
        job = Path(handle["job_dir"])
        launcher = json.loads((job / "launcher.json").read_text())["pid"]
        os.kill(launcher, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while process_start_time(launcher) is not None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert "disappeared" in hook.get_status(handle).message
    _assert_all_end(pids)
