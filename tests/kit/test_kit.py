"""One behaviour, every emulator: the kit's interface (``airflow_stepops.testing._kit``) checked the same way on
each flavor's emulator, with jobs submitted through the flavor's real hook and client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from airflow_stepops.testing._kit import Emulator, FaultRule, spawn, stop_group

from ..emulated import eventually, gone
from ..flavorjobs import EMULATORS, make_hook, make_spec


def _add(a: int, b: int) -> int:
    return a + b


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


@pytest.fixture(params=sorted(EMULATORS))
def flavor(request):
    emulator = request.getfixturevalue(EMULATORS[request.param])
    if request.param == "modal":
        request.getfixturevalue("modal_step_operator")
    hook = make_hook(request.param)

    def submit(fn, *args, **kwargs) -> str:
        spec = make_spec(hook, fn, *args, task_id=f"kit-{uuid.uuid4().hex[:8]}", **kwargs)
        return hook.submit(spec)["job_id"]

    return emulator, submit


def test_a_job_runs_to_success(flavor):
    emulator, submit = flavor
    assert isinstance(emulator, Emulator)
    job = submit(_add, 1, 2)
    emulator.wait_for_state(job, "succeeded", timeout=120)
    assert emulator.state(job) == "succeeded" and emulator.STATES[emulator.status(job)] == "succeeded"
    assert job in emulator.job_ids and emulator.job_id(emulator.job(job)) == job
    assert emulator.pids(job) == [] and emulator.pid(job) is None
    with pytest.raises(AssertionError, match="before reaching"):
        emulator.wait_for_state(job, "failed", timeout=1)


def test_a_failure_strikes_a_running_job(flavor):
    emulator, submit = flavor
    job = submit(_sleep, 120)
    (pid,) = eventually(lambda: emulator.pids(job), 120, f"{job} to run")
    assert emulator.state(job) == "running"
    rule = emulator.inject("failure", job)
    assert isinstance(rule, FaultRule)
    emulator.wait_for_state(job, "failed", timeout=60)
    assert emulator.state(job) == "failed"
    eventually(lambda: emulator.pids(job) == [] and gone(pid), 30, f"the process of {job} to end")


def test_a_failure_waits_for_the_next_job(flavor):
    emulator, submit = flavor
    emulator.inject("failure")
    job = submit(_sleep, 120)
    emulator.wait_for_state(job, "failed", timeout=120)
    assert emulator.state(job) == "failed" and emulator.STATES[emulator.status(job)] == "failed"


def test_a_preemption_strikes_a_running_job(flavor):
    emulator, submit = flavor
    job = submit(_sleep, 120)
    (pid,) = eventually(lambda: emulator.pids(job), 120, f"{job} to run")
    emulator.inject("preemption", job)
    eventually(lambda: gone(pid), 60, f"the process of {job} to be preempted")  # well before its 120 s
    assert pid not in emulator.pids(job) and emulator.state(job) != "succeeded"


def test_stop_group_ends_the_whole_group():
    """What every emulator's runner uses: a job's process and what it started end together."""
    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
             "print(flush=True); time.sleep(60)"
    proc = spawn([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline()  # the child is started
    assert os.getpgid(proc.pid) == proc.pid != os.getpgid(0)
    started = time.monotonic()
    stop_group(proc, grace=5)
    assert proc.returncode == -signal.SIGTERM and time.monotonic() - started < 5
    eventually(lambda: not subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True).stdout, 5,
                "the group to end")


@pytest.mark.parametrize("name", sorted(EMULATORS))
def test_importing_an_emulator_imports_neither_airflow_nor_the_services_sdk(name):
    """The emulators run where the provider is not installed (``python -m``, a demo's own process)."""
    code = (f"import sys, airflow_stepops.testing.{name}; sys.exit(any(m == 'airflow' or m.startswith('airflow.') "
            "or m == 'azure.ai.ml' for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
