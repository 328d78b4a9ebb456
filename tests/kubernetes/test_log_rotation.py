"""Pod logs as the kubelet keeps them: results of the inline transport do not depend on them (the
kubelet rotates them), and incremental reads of them lose and repeat nothing."""

from __future__ import annotations

import asyncio
import time

import pytest

from airflow_stepops.artifacts import store_path
from airflow_stepops.bundle import read_outcome
from airflow_stepops.exceptions import StepFailedError
from airflow_stepops.hooks.base import JobState

from ..flavorjobs import hook_maker, make_spec

make_hook = hook_maker("kubernetes")

NS = "steps"


@pytest.fixture
def small_log_files(k8s_emulator, monkeypatch):
    """Rotate at 8 KiB, checked every 10 ms (a kubelet: 10 MiB, every 10 s)."""
    monkeypatch.setattr(k8s_emulator.config, "container_log_max_size", 8 * 1024)
    monkeypatch.setattr(k8s_emulator.config, "container_log_monitor_interval", 0.01)
    return k8s_emulator


def _verbose(lines: int, result_bytes: int) -> object:
    """Print far more than a log file holds, leaving a chatty helper process (a data loader worker)
    that writes on until the container ends, as the output goes back."""
    import os
    import subprocess
    import sys
    import time

    subprocess.Popen([sys.executable, "-c", "import sys, time\nwhile True:\n    sys.stdout.write('helper ' + "
                      "'h' * 100 + '\\n'); sys.stdout.flush(); time.sleep(0.002)"])
    for i in range(lines):
        print(f"progress {i} " + "p" * 100, flush=True)
        time.sleep(0.01)
    return {"answer": 42} if not result_bytes else os.urandom(result_bytes)


def _container_log(k8s, hook, handle):
    """The emulated kubelet's log of the step's (finished) container."""
    pod = hook._pods(handle)[0]["metadata"]
    return k8s.cluster.kubelet.runtimes[pod["uid"]].runs["step"][-1].logs


def _follow(hook, handle) -> list[str]:
    """Wait as deferrable=False does, reading new log lines as they come and what is left at the end
    (reads are capped); the lines shown."""
    streamed, cursor = [], None
    while True:
        done = hook.get_status(handle)
        lines, cursor = asyncio.run(hook.aread_logs(handle, cursor))
        streamed += lines
        if done.state.terminal and not lines:
            assert done.state is JobState.SUCCEEDED, done
            return streamed
        time.sleep(0 if done.state.terminal else 0.2)


def test_a_verbose_step_returns_its_result_and_streams_its_log(small_log_files):
    hook = make_hook()
    handle = hook.submit(make_spec(hook, _verbose, 150, 0, task_id="verbose"))
    streamed = _follow(hook, handle)
    pod = hook._pods(handle)[0]["metadata"]["name"]
    assert "progress 0 " not in hook._pod_log(pod, NS)  # rotated away: pods/log serves the current file
    # a rotation just after the last lines, before the container ended, leaves an empty current file
    _container_log(small_log_files, hook, handle).rotate(5)
    hook.collect_output(handle)
    assert read_outcome(store_path(handle["output_uri"])).value == {"answer": 42}
    assert any(line.startswith("progress ") for line in streamed)  # shown while the step ran (the first lines
    # may rotate away before a read reaches them, as on a kubelet: the test host may be slow)


def test_an_output_whose_log_block_was_rotated_away_is_a_clear_error(k8s_emulator):
    hook = make_hook()
    handle = hook.submit(make_spec(hook, _verbose, 5, 30_000, task_id="verbose_large"))
    _follow(hook, handle)
    # what a rotation during the block's last lines leaves: a current file without the block whole
    logs = _container_log(k8s_emulator, hook, handle)
    logs.lines = logs.lines[-3:]
    with pytest.raises(StepFailedError, match="inline_transfer_max_size.*pvc://|pvc://.*inline_transfer_max_size"):
        hook.collect_output(handle)
    assert read_outcome(store_path(handle["output_uri"])) is None  # nothing, rather than something wrong


def _bursts() -> None:
    import time

    for burst in range(3):  # identical lines, many sharing one timestamp, and more than one read returns
        for _ in range(7000 if burst == 1 else 1500):
            print("tick")
        print(f"burst {burst}", flush=True)
        time.sleep(1)


def test_incremental_log_reads_of_a_live_pod_lose_and_repeat_nothing(k8s_emulator):
    hook = make_hook()
    handle = hook.submit(make_spec(hook, _bursts, task_id="bursts"))
    streamed = [line for line in _follow(hook, handle) if not line.startswith("[stepops]")]
    expected = [line for burst, count in enumerate((1500, 7000, 1500)) for line in ["tick"] * count + [f"burst {burst}"]]
    assert streamed == expected
