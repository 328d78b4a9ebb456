"""The local flavor with real detached processes: limits, status, logs, cancel, re-attach."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from airflow_stepops import ResourceSettings, StepOperatorConfigError
from airflow_stepops.artifacts import store_path
from airflow_stepops.bundle import read_outcome
from airflow_stepops.hooks.base import JobState
from airflow_stepops.runtime.local_launcher import process_start_time
from airflow_stepops.settings.local import LocalStepOperatorSettings

from .localjobs import make_hook, make_spec, wait_running, wait_terminal


def _result(handle):
    return read_outcome(store_path(handle["output_uri"]))


def test_runs_detached_and_returns_result(tmp_path):
    hook = make_hook(tmp_path)

    def step(x):
        import os

        print("hello from the step", flush=True)
        return {"x": x * 2, "pid": os.getpid(), "sid": os.getsid(0)}

    handle = hook.submit(make_spec(hook, step, 21))
    assert wait_terminal(hook, handle).state is JobState.SUCCEEDED
    value = _result(handle).value
    assert value["x"] == 42
    assert value["pid"] != os.getpid() and value["sid"] != os.getsid(0)  # own session: survives the worker
    lines, cursor = hook.read_logs(handle, 0)
    assert "hello from the step" in lines
    assert hook.read_logs(handle, cursor) == ([], cursor)


def test_worker_secrets_do_not_reach_the_step(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_SECRET_DB", "postgres://user:secret@db/x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "shh")
    hook = make_hook(tmp_path, environment={"FROM_CONN": "1"})

    def step():
        import os

        return {k: v for k, v in os.environ.items() if k in ("AIRFLOW_CONN_SECRET_DB", "AWS_SECRET_ACCESS_KEY", "FROM_CONN", "FROM_SETTINGS")}

    spec = make_spec(hook, step, settings=LocalStepOperatorSettings(environment={"FROM_SETTINGS": "2"}))
    handle = hook.submit(spec)
    wait_terminal(hook, handle)
    assert _result(handle).value == {"FROM_CONN": "1", "FROM_SETTINGS": "2"}


def test_cpu_count_sets_affinity_and_thread_variables(tmp_path):
    hook = make_hook(tmp_path)

    def step():
        import os

        return {"cpus": sorted(os.sched_getaffinity(0)), "omp": os.environ.get("OMP_NUM_THREADS")}

    handle = hook.submit(make_spec(hook, step, resources=ResourceSettings(cpu_count=1)))
    wait_terminal(hook, handle)
    value = _result(handle).value
    assert len(value["cpus"]) == 1 and value["cpus"][0] in os.sched_getaffinity(0)
    assert value["omp"] == "1"


def test_fractional_cpu_rounds_up(tmp_path):
    hook = make_hook(tmp_path)
    spec = make_spec(hook, lambda: 1, resources=ResourceSettings(cpu_count=0.5))
    assert len(hook.render(spec)["cpu_ids"]) == 1


def test_more_cpus_than_the_host_has_is_refused(tmp_path):
    hook = make_hook(tmp_path)
    spec = make_spec(hook, lambda: 1, resources=ResourceSettings(cpu_count=len(os.sched_getaffinity(0)) + 1))
    with pytest.raises(StepOperatorConfigError, match=r"resources.cpu_count=\d+: this host offers \d+ CPU"):
        hook.submit(spec)
    assert not (tmp_path / "jobs").exists() or not os.listdir(tmp_path / "jobs")


def test_more_memory_than_the_host_has_is_refused(tmp_path):
    hook = make_hook(tmp_path)
    with pytest.raises(StepOperatorConfigError, match=r"resources.memory=64PB: this host has"):
        hook.submit(make_spec(hook, lambda: 1, resources=ResourceSettings(memory="64PB")))


def test_memory_limit_is_hard(tmp_path):
    hook = make_hook(tmp_path)

    def hog():
        blocks = []
        for _ in range(200):
            blocks.append(bytearray(10 * 2**20))  # touches 10 MiB each time
        return len(blocks)

    handle = hook.submit(make_spec(hook, hog, resources=ResourceSettings(memory="150MiB")))
    status = wait_terminal(hook, handle)
    assert status.state is JobState.FAILED
    outcome = _result(handle)
    # either the allocation fails inside Python, or the watchdog kills the process group
    if outcome is not None and outcome.error:
        assert outcome.error["type"] == "builtins.MemoryError"
    else:
        assert status.details["reason"] == "oom_killed"
        assert "memory limit" in status.message


def test_a_memory_error_under_the_limit_names_the_limit_and_the_setting(tmp_path):
    hook = make_hook(tmp_path)

    def allocate():
        return len(bytearray(400 * 2**20))  # past RLIMIT_DATA at once: MemoryError, nothing touched

    handle = hook.submit(make_spec(hook, allocate, resources=ResourceSettings(memory="150MiB")))
    assert wait_terminal(hook, handle).state is JobState.FAILED
    error = _result(handle).error
    assert error["type"] == "builtins.MemoryError"
    assert error["message"].startswith("the step exceeded its memory limit of 150 MiB (ResourceSettings.memory); "
                                       "raise resources.memory")
    assert "MemoryError: the step exceeded its memory limit of 150 MiB" in (Path(handle["job_dir"]) / "step.log").read_text()


def test_max_runtime_stops_the_step(tmp_path):
    hook = make_hook(tmp_path)
    spec = make_spec(hook, time.sleep, 60, settings=LocalStepOperatorSettings(max_runtime_in_seconds=1,
                                                                              cancel_grace_period_seconds=1))
    handle = hook.submit(spec)
    status = wait_terminal(hook, handle, timeout=20)
    assert status.state is JobState.FAILED and status.details["reason"] == "timed_out"
    assert "max_runtime_in_seconds=1" in status.message


def test_cancel_kills_the_whole_process_group(tmp_path):
    hook = make_hook(tmp_path)

    def spawner(path):
        import subprocess
        import time

        child = subprocess.Popen(["sleep", "300"])
        with open(path, "w") as fh:
            fh.write(str(child.pid))
        time.sleep(300)

    pid_file = tmp_path / "grandchild.pid"
    handle = hook.submit(make_spec(hook, spawner, str(pid_file),
                                   settings=LocalStepOperatorSettings(cancel_grace_period_seconds=2)))
    wait_running(hook, handle)
    deadline = time.monotonic() + 20
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    child = json.loads((Path(handle["job_dir"]) / "child.json").read_text())["pid"]
    hook.cancel(handle)
    status = hook.get_status(handle)
    assert status.state is JobState.CANCELLED
    for pid in (child, grandchild):
        deadline = time.monotonic() + 10
        while process_start_time(pid) is not None:
            assert time.monotonic() < deadline, f"process {pid} still alive after cancel"
            time.sleep(0.05)


def test_same_identity_re_attaches_and_runs_once(tmp_path):
    hook = make_hook(tmp_path)

    def step(path):
        import os

        with open(path, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        return 1

    marker = tmp_path / "runs.txt"
    spec = make_spec(hook, step, str(marker))
    first = hook.submit(spec)
    second = hook.submit(spec)
    assert first == second
    assert hook.find_job(spec.identity) == first
    wait_terminal(hook, first)
    assert len(marker.read_text().splitlines()) == 1
    assert len(os.listdir(tmp_path / "jobs")) == 1


def test_launcher_that_vanished_is_reported(tmp_path):
    hook = make_hook(tmp_path)
    handle = hook.submit(make_spec(hook, time.sleep, 30))
    wait_running(hook, handle)
    job = Path(handle["job_dir"])
    # simulate a host restart: the supervisor is gone and left no status
    launcher = json.loads((job / "launcher.json").read_text())
    child = json.loads((job / "child.json").read_text())
    os.kill(launcher["pid"], 9)
    os.killpg(child["pid"], 9)
    deadline = time.monotonic() + 10
    while process_start_time(launcher["pid"]) is not None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    status = hook.get_status(handle)
    assert status.state is JobState.FAILED and "disappeared" in status.message


def _fake_nvidia_smi(tmp_path: Path, lines: list[str]) -> str:
    script = tmp_path / "nvidia-smi"
    script.write_text("#!/bin/sh\ncat <<'EOF'\n" + "\n".join(lines) + "\nEOF\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


GPUS = ["0, Tesla T4, 15360, GPU-aaa", "1, NVIDIA A100-SXM4-80GB, 81920, GPU-bbb", "2, NVIDIA A100-SXM4-80GB, 81920, GPU-ccc"]


def test_gpu_type_and_count_choose_visible_devices(tmp_path):
    hook = make_hook(tmp_path, nvidia_smi=_fake_nvidia_smi(tmp_path, GPUS))

    def step():
        import os

        return os.environ["CUDA_VISIBLE_DEVICES"]

    handle = hook.submit(make_spec(hook, step, resources=ResourceSettings(gpu_count=2, gpu_type="A100-80GB")))
    wait_terminal(hook, handle)
    assert _result(handle).value == "1,2"
    spec = make_spec(hook, step, task_id="t4", resources=ResourceSettings(gpu_type="T4"))
    assert hook.render(spec)["step_env"]["CUDA_VISIBLE_DEVICES"] == "0"


def test_busy_gpus_are_avoided(tmp_path):
    hook = make_hook(tmp_path, nvidia_smi=_fake_nvidia_smi(tmp_path, GPUS))
    first = hook.submit(make_spec(hook, time.sleep, 30, task_id="a", resources=ResourceSettings(gpu_type="A100")))
    try:
        wait_running(hook, first)
        second = make_spec(hook, lambda: 1, task_id="b", resources=ResourceSettings(gpu_type="A100"))
        assert hook.render(second)["gpus"] == [2]
    finally:
        hook.cancel(first)


def test_not_enough_gpus_of_that_type(tmp_path):
    hook = make_hook(tmp_path, nvidia_smi=_fake_nvidia_smi(tmp_path, GPUS))
    with pytest.raises(StepOperatorConfigError, match=r"2 x T4 asked, but this host has only 1 matching \(GPUs here: 0: Tesla T4"):
        hook.submit(make_spec(hook, lambda: 1, resources=ResourceSettings(gpu_count=2, gpu_type="T4")))


def test_gpu_asked_on_a_host_without_gpus(tmp_path):
    hook = make_hook(tmp_path, nvidia_smi=str(tmp_path / "no-such-nvidia-smi"))
    with pytest.raises(StepOperatorConfigError, match="1 GPU\\(s\\) asked, but this host has no NVIDIA GPU"):
        hook.submit(make_spec(hook, lambda: 1, resources=ResourceSettings(gpu_count=1)))


def test_zero_gpus_hides_devices(tmp_path):
    hook = make_hook(tmp_path)
    spec = make_spec(hook, lambda: 1, resources=ResourceSettings(gpu_count=0))
    assert hook.render(spec)["step_env"]["CUDA_VISIBLE_DEVICES"] == ""


def _fake_python(tmp_path: Path, version: str, cloudpickle: bool = True) -> str:
    script = tmp_path / f"python{version}"
    script.write_text(
        "#!/bin/sh\n"
        f"echo '{{\"version\": [{version.replace('.', ', ')}, 0], \"cloudpickle\": {str(cloudpickle).lower()}}}'\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_other_python_version_is_refused_before_starting(tmp_path):
    hook = make_hook(tmp_path, python=_fake_python(tmp_path, "3.9"))
    major, minor = sys.version_info[:2]
    with pytest.raises(StepOperatorConfigError,
                       match=rf"extra.python: remote Python 3.9 .* differs from the worker's Python {major}.{minor}"):
        hook.submit(make_spec(hook, lambda: 1))


def test_python_without_cloudpickle_is_refused(tmp_path):
    major, minor = sys.version_info[:2]
    hook = make_hook(tmp_path, python=_fake_python(tmp_path, f"{major}.{minor}", cloudpickle=False))
    with pytest.raises(StepOperatorConfigError, match="has no cloudpickle"):
        hook.submit(make_spec(hook, lambda: 1))


def test_missing_python_is_refused(tmp_path):
    hook = make_hook(tmp_path, python="/nonexistent/python3")
    with pytest.raises(StepOperatorConfigError, match="interpreter '/nonexistent/python3' not found"):
        hook.submit(make_spec(hook, lambda: 1))


def test_local_flavor_needs_a_file_store():
    from pydantic import ValidationError

    from airflow_stepops.settings.local import LocalStepOperatorConfig

    with pytest.raises(ValidationError, match="needs a file:// artifact store"):
        LocalStepOperatorConfig(artifact_store="s3://bucket/x")
    assert LocalStepOperatorConfig(artifact_store="/data/x").artifact_store == "file:///data/x"


def test_memory_watchdog_kills_the_group_when_no_data_limit_applies(tmp_path):
    # with a GPU the data-segment limit is off (GPU runtimes map large private areas); the resident
    # memory watchdog still enforces the limit, like a cgroup OOM kill
    hook = make_hook(tmp_path, nvidia_smi=_fake_nvidia_smi(tmp_path, GPUS))

    def hog():
        import time

        blocks = []
        for _ in range(100):
            blocks.append(bytearray(10 * 2**20))
            time.sleep(0.05)
        return len(blocks)

    handle = hook.submit(make_spec(hook, hog, resources=ResourceSettings(memory="150MiB", gpu_type="T4")))
    status = wait_terminal(hook, handle)
    assert status.state is JobState.FAILED
    assert status.details["reason"] == "oom_killed"
    assert "more than its memory limit of 157286400 bytes" in status.message


def test_progress_bars_stream_while_the_step_runs(tmp_path):
    hook = make_hook(tmp_path)

    def step():
        import sys
        import time

        for pct in (10, 50, 100):
            sys.stdout.write(f"\rtraining {pct}%")
            sys.stdout.flush()
        sys.stdout.write("\nepoch done\n")
        sys.stdout.flush()
        time.sleep(30)

    handle = hook.submit(make_spec(hook, step))
    try:
        deadline = time.monotonic() + 20
        lines: list[str] = []
        cursor = 0
        while "epoch done" not in lines:
            assert time.monotonic() < deadline, lines
            new, cursor = hook.read_logs(handle, cursor)
            lines += new
            time.sleep(0.1)
        assert "training 100%" in lines  # the last state of the redrawn line, before the job ends
    finally:
        hook.cancel(handle)


def test_launcher_that_cannot_start_leaves_a_failed_job(tmp_path):
    from airflow_stepops.exceptions import StepFailedError

    major, minor = sys.version_info[:2]
    python = tmp_path / "python-that-cannot-launch"
    python.write_text("#!/bin/sh\n"
                      f"if [ \"$1\" = -c ]; then echo '{{\"version\": [{major}, {minor}, 0], \"cloudpickle\": true}}'; "
                      "exit 0; fi\nexit 3\n")
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    hook = make_hook(tmp_path, python=str(python))
    spec = make_spec(hook, lambda: 1)
    with pytest.raises(StepFailedError, match="launcher exited with code 3"):
        hook.submit(spec)
    handle = hook.find_job(spec.identity)
    status = hook.get_status(handle)
    assert status.state is JobState.FAILED  # a retry will not wait on a job that never ran


def test_jobs_of_another_host_are_refused_clearly(tmp_path):
    hook = make_hook(tmp_path)
    handle = hook.submit(make_spec(hook, lambda: 1))
    wait_terminal(hook, handle)
    with pytest.raises(StepOperatorConfigError, match="runs on host 'gpu-box-7' but this process is on"):
        hook.get_status({**handle, "host": "gpu-box-7"})


def test_job_files_are_private(tmp_path):
    hook = make_hook(tmp_path)
    handle = hook.submit(make_spec(hook, lambda: 1))
    wait_terminal(hook, handle)
    assert stat.S_IMODE(os.stat(handle["job_dir"]).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(Path(handle["job_dir"]) / "spec.json").st_mode) == 0o600


def test_unsafe_ids_map_to_distinct_safe_directories(tmp_path):
    from airflow_stepops.bundle import StepIdentity

    root = make_hook(tmp_path).artifact_root()
    a = str(StepIdentity("d", "run~1", "..", -1, 1).prefix(root))
    b = str(StepIdentity("d", "run_1", "..", -1, 1).prefix(root))
    assert a != b and "/../" not in a and a.startswith(str(root))


def test_finished_job_directories_are_pruned_after_the_retention(tmp_path):
    hook = make_hook(tmp_path, job_retention_days=1)
    old = hook.submit(make_spec(hook, lambda: 1, task_id="old"))
    recent = hook.submit(make_spec(hook, lambda: 1, task_id="recent"))
    wait_terminal(hook, old)
    wait_terminal(hook, recent)
    two_days_ago = time.time() - 2 * 86400
    os.utime(Path(old["job_dir"]) / "status.json", (two_days_ago, two_days_ago))
    hook.submit(make_spec(hook, lambda: 1, task_id="new", resources=ResourceSettings(cpu_count=1)))
    assert not Path(old["job_dir"]).exists()
    assert Path(recent["job_dir"]).exists()


def test_a_removed_job_directory_is_a_failed_job(tmp_path):
    import shutil

    hook = make_hook(tmp_path)
    handle = hook.submit(make_spec(hook, lambda: 1))
    wait_terminal(hook, handle)
    shutil.rmtree(handle["job_dir"])
    status = hook.get_status(handle)
    assert status.state is JobState.FAILED and "no longer exists" in status.message
