"""The pod's entry point on its own: what a step container does with the environment we give it."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

import pytest

pytest.importorskip("kubernetes")

from airflow_stepops.hooks import kubernetes_job as manifest
from airflow_stepops.hooks.kubernetes_logs import decode_record, extract_output_block, output_record
from airflow_stepops.runtime.protocol import ERROR_FILE, OUTPUT_PREFIX, RESULT_FILE, Env

from ..flavorjobs import hook_maker, make_spec

make_hook = hook_maker("kubernetes")

pytestmark = pytest.mark.usefixtures("k8s_emulator")


def _noise(size: int) -> bytes:
    import os

    print("made noise", flush=True)
    return os.urandom(size)


def _run_entry(env_list: list[dict], **overrides: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as tmp:
        env = {"PATH": "/usr/bin:/bin", **{e["name"]: e["value"] for e in env_list},
               Env.TERMINATION_LOG: f"{tmp}/termination-log", **overrides}
        done = subprocess.run([sys.executable, "-c", manifest.ENTRY_PROGRAM], env=env, capture_output=True,
                              text=True, timeout=60)
        done.message = Path(env[Env.TERMINATION_LOG]).read_text()  # type: ignore[attr-defined]
    return done


def _outcome_files(done: subprocess.CompletedProcess) -> dict[str, bytes]:
    """The output as the hook reads it: the termination message's record, and the log block it names."""
    assert len(done.message.encode()) <= 4096  # what the kubelet keeps
    kind, digest, payload = output_record(done.message, "job")
    archive = decode_record(digest, payload) if kind == "data" else extract_output_block(done.stdout, "job", digest)
    assert archive is not None, done.stdout[-2000:]
    with tarfile.open(fileobj=BytesIO(archive), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_a_large_output_for_a_store_the_pod_cannot_see_fails_clearly():
    hook = make_hook()
    spec = make_spec(hook, _noise, 200_000, task_id="entry_unshared")
    env = hook.transport_env(spec)
    done = _run_entry(env, **{Env.MARKER: "job", Env.BUNDLE_URI: "file:///nonexistent/try-1/bundle",
                              Env.OUTPUT_URI: "file:///nonexistent/try-1/output", Env.INLINE_MAX_BYTES: "10000"})
    assert done.returncode == 3, done.stderr
    assert "made noise" in done.stdout
    error = json.loads(_outcome_files(done)[ERROR_FILE])
    assert "not a volume this pod shares with the Airflow workers" in error["message"]
    assert "exit code 0" in error["message"]


@pytest.mark.parametrize(("size", "kind"), [(1000, "data"), (20_000, "log")])
def test_an_output_comes_back_in_the_termination_message_or_the_log_it_names(size, kind):
    hook = make_hook()
    spec = make_spec(hook, _noise, size, task_id=f"entry_inline_{kind}")
    done = _run_entry(hook.transport_env(spec), **{Env.MARKER: "job"})
    assert done.returncode == 0, done.stderr
    assert output_record(done.message, "job")[0] == kind
    assert (OUTPUT_PREFIX.format(marker="job") + "begin:" in done.stdout) == (kind == "log")
    files = _outcome_files(done)
    result = json.loads(files[RESULT_FILE])
    entry = result["outputs"]["return_value"]
    assert entry["kind"] != "json" and len(files[entry["path"]]) == entry["size"]


def test_a_damaged_inline_bundle_is_refused():
    hook = make_hook()
    spec = make_spec(hook, _noise, 10, task_id="entry_damaged")
    done = _run_entry(hook.transport_env(spec), **{Env.MARKER: "job", Env.BUNDLE_SHA256: "0" * 64})
    assert done.returncode == 2
    assert "sha256 mismatch" in json.loads(_outcome_files(done)[ERROR_FILE])["message"]
