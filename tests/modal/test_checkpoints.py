"""STEPOPS_CHECKPOINT_DIR on Modal: a directory on the step operator's checkpoint volume that a preempted try
commits and the next try mounts; and the emulator's volumes behaving as Modal documents (a task's own copy,
background commits, a commit when the container exits, nothing more after SIGKILL)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("modal")

import modal

from airflow_stepops.artifacts import store_path
from airflow_stepops.bundle import StepIdentity, read_outcome
from airflow_stepops.runtime.protocol import Env
from airflow_stepops.settings.modal import CHECKPOINT_MOUNT, ModalStepOperatorConfig

from ..emulated import eventually
from ..flavorjobs import hook_maker, make_spec, run_trigger

make_hook = hook_maker("modal")

pytestmark = pytest.mark.usefixtures("md_emulator", "modal_step_operator")

APP = "stepops-volumes"
VOLUME = "scratch-volume"
MOUNT = "/scratch"


@pytest.fixture
def commit_interval(md_emulator):
    """Set the emulator's background commit interval for one test (None: commits on exit only)."""
    before = md_emulator.volume_commit_interval

    def set_to(seconds: float | None) -> None:
        md_emulator.volume_commit_interval = seconds

    yield set_to
    md_emulator.volume_commit_interval = before
    md_emulator.clear_faults()


# ----- the flavor ------------------------------------------------------------------------------------------


def _resume(marker: str) -> dict:
    """Restore from the checkpoint dir if an earlier try left one; else checkpoint and wait to be preempted."""
    import json
    import os

    path = os.path.join(os.environ["STEPOPS_CHECKPOINT_DIR"], "state.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            return {"restored": json.load(fh), "dir": os.environ["STEPOPS_CHECKPOINT_DIR"]}
    with open(path, "w", encoding="utf-8") as fh:  # the runner made the directory
        json.dump({"marker": marker}, fh)
    print("checkpointed", flush=True)
    time.sleep(120)
    return {"restored": None}


def test_a_preempted_try_leaves_its_checkpoint_to_the_next_try(md_emulator, commit_interval):
    commit_interval(None)  # only the commit when the preempted container exits can carry the file
    hook = make_hook()
    first = hook.submit(make_spec(hook, _resume, "try-1", task_id="resumable"))
    eventually(lambda: "checkpointed" in md_emulator.logs(first["job_id"]), what="the step to checkpoint")
    md_emulator.inject("preemption", job=first["job_id"], restart=False)
    event = run_trigger(hook, first)
    assert event["status"] == "preempted", event

    stored = md_emulator.volume_path("stepops-tests-checkpoints") / "md_tests/run-1/resumable/-1/state.json"
    assert json.loads(stored.read_text()) == {"marker": "try-1"}
    second = hook.submit(make_spec(hook, _resume, "try-2", task_id="resumable", try_number=2))
    event = run_trigger(hook, second)
    assert event["status"] == "succeeded", event
    result = read_outcome(store_path(second["output_uri"])).value
    assert result["restored"] == {"marker": "try-1"}, result
    assert result["dir"].endswith("/md_tests/run-1/resumable/-1"), result  # the emulator's stand-in for the mount


def test_modals_own_restart_of_a_preempted_input_resumes_from_the_checkpoint(md_emulator, commit_interval):
    commit_interval(None)
    hook = make_hook()
    handle = hook.submit(make_spec(hook, _resume, "first-container", task_id="restarted"))
    eventually(lambda: "checkpointed" in md_emulator.logs(handle["job_id"]), what="the step to checkpoint")
    md_emulator.inject("preemption", job=handle["job_id"], restart=True)  # Modal's default: same input, new task
    event = run_trigger(hook, handle)
    assert event["status"] == "succeeded", event
    assert read_outcome(store_path(handle["output_uri"])).value["restored"] == {"marker": "first-container"}


def test_the_checkpoint_dir_is_per_task_instance_and_run_and_travels_with_the_call():
    hook = make_hook()
    spec = make_spec(hook, _resume, "x", task_id="train")
    env = hook.render(spec)["call"]["args"][1]
    assert env[Env.CHECKPOINT_DIR] == f"{CHECKPOINT_MOUNT}/md_tests/run-1/train/-1"
    again = hook._environment(make_spec(hook, _resume, "x", task_id="train", try_number=3))
    assert again[Env.CHECKPOINT_DIR] == env[Env.CHECKPOINT_DIR]  # every try: the same directory
    assert hook.options(spec)["checkpoint_volume"] == {CHECKPOINT_MOUNT: "stepops-tests-checkpoints"}
    # a run deleted and made again under the same run id has a new run key: it starts without checkpoints
    identity = StepIdentity("d", "manual__2024-01-01T00:00:00+00:00", "t/x", 2, 1, run_key="k1")
    parts = identity.step_path("/c/").split("/")
    assert parts[:3] == ["", "c", "d"] and parts[4].startswith("t_x-") and parts[5:] == ["2", "run-k1"], parts
    assert identity.for_try(2).step_path("/c") == identity.step_path("/c")
    assert StepIdentity("d", "r", "t", 2, 1, run_key="k2").step_path("/c") != StepIdentity(
        "d", "r", "t", 2, 1, run_key="k1").step_path("/c")


def test_the_checkpoint_volume_is_named_by_the_connection_and_checked():
    assert ModalStepOperatorConfig(app_name="team-a").checkpoint_volume_name == "team-a-checkpoints"
    assert ModalStepOperatorConfig(checkpoint_volume="ckpt").checkpoint_volume_name == "ckpt"
    with pytest.raises(ValueError, match="checkpoint_volume: 'no/slash'"):
        ModalStepOperatorConfig(checkpoint_volume="no/slash")
    with pytest.raises(ValueError, match="overlaps /stepops/checkpoints"):
        ModalStepOperatorConfig(volumes={"/stepops": "data"})
    with pytest.raises(ValueError, match="is the checkpoint volume"):
        ModalStepOperatorConfig(checkpoint_volume="ckpt", volumes={"/data": "ckpt"})


# ----- the emulator's volumes ------------------------------------------------------------------------------


def _volume_step():
    """Made in here so cloudpickle ships it by value (the container does not import this module)."""

    def run_step(path, mode, seconds):
        import os
        import signal

        if mode == "read":
            return open(path).read() if os.path.exists(path) else None
        if mode == "stubborn":  # a container that does not stop on SIGTERM: killed after the grace period
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(mode)
        print(f"wrote {path}", flush=True)
        time.sleep(seconds)
        return "done"

    return run_step


@pytest.fixture(scope="module")
def volume_fn(md_emulator):
    client = modal.Client.from_credentials(md_emulator.token_id, md_emulator.token_secret)
    app = modal.App(APP)
    volume = modal.Volume.from_name(VOLUME, create_if_missing=True, environment_name="main")
    app.function(serialized=True, name="run_step", timeout=600, volumes={MOUNT: volume})(_volume_step())
    app.deploy(name=APP, environment_name="main", client=client)
    fn = modal.Function.from_name(APP, "run_step", environment_name="main", client=client)
    fn.hydrate()
    return fn


def _committed(md_emulator, rel: str) -> Path:
    return md_emulator.volume_path(VOLUME) / rel


def _spawn_and_wait_written(md_emulator, volume_fn, rel: str, mode: str, seconds: float = 120):
    call = volume_fn.spawn(f"{MOUNT}/{rel}", mode, seconds)
    eventually(lambda: "wrote " in "".join(md_emulator.logs(call.object_id)), what="the write")
    return call


def test_writes_stay_in_the_task_until_a_commit_and_the_exit_commits_them(md_emulator, volume_fn, commit_interval):
    commit_interval(None)
    call = _spawn_and_wait_written(md_emulator, volume_fn, "exit/a.txt", "exit", seconds=1.5)
    assert not _committed(md_emulator, "exit/a.txt").exists()  # written in the task's copy only
    assert call.get(timeout=30) == "done"
    assert _committed(md_emulator, "exit/a.txt").read_text() == "exit"
    assert volume_fn.remote(f"{MOUNT}/exit/a.txt", "read", 0) == "exit"  # a new container mounts it


def test_background_commits_carry_writes_while_the_task_runs(md_emulator, volume_fn, commit_interval):
    commit_interval(0.2)
    call = _spawn_and_wait_written(md_emulator, volume_fn, "background/b.txt", "background")
    eventually(lambda: _committed(md_emulator, "background/b.txt").exists(), timeout=10, what="a background commit")
    assert md_emulator.call(call.object_id)["state"] == "running"  # committed while the task still runs
    assert _committed(md_emulator, "background/b.txt").read_text() == "background"
    call.cancel(terminate_containers=True)


def test_a_preempted_container_that_exits_commits_and_a_killed_one_does_not(md_emulator, volume_fn,
                                                                            commit_interval):
    commit_interval(None)
    graceful = _spawn_and_wait_written(md_emulator, volume_fn, "preempt/graceful.txt", "graceful")
    stubborn = _spawn_and_wait_written(md_emulator, volume_fn, "preempt/stubborn.txt", "stubborn")
    for call in (graceful, stubborn):
        md_emulator.inject("preemption", job=call.object_id, restart=False)
    for call in (graceful, stubborn):
        eventually(lambda c=call: md_emulator.call(c.object_id)["state"] == "terminated", what="the preemption")
    assert _committed(md_emulator, "preempt/graceful.txt").read_text() == "graceful"  # exit on SIGTERM: committed
    assert not _committed(md_emulator, "preempt/stubborn.txt").exists()  # SIGKILL after the grace period: lost
    assert volume_fn.remote(f"{MOUNT}/preempt/stubborn.txt", "read", 0) is None
