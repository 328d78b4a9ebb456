"""The remote side: the bootstrap runs a bundle with nothing but the stdlib and cloudpickle."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import cloudpickle
import pytest

from airflow_stepops.artifacts import store_path
from airflow_stepops.bundle import (
    RUNTIME_DIR,
    StepIdentity,
    build_meta,
    entry_program,
    pickle_payload,
    stage,
    write_bundle,
)
from airflow_stepops.runtime import bootstrap, protocol
from airflow_stepops.runtime.protocol import BOOTSTRAP_FILE, ERROR_FILE, META_FILE, PAYLOAD_FILE, RESULT_FILE, Env


def test_runtime_imports_only_the_standard_library():
    siblings = {path.stem for path in RUNTIME_DIR.glob("*.py")}  # they travel together
    allowed = {"cloudpickle", "__future__", *siblings}
    for path in RUNTIME_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module == "airflow_stepops.runtime":  # on the worker
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or top in allowed, (path.name, name)


def _bundle(tmp_path: Path, fn, *args, multiple_outputs=False, max_result_bytes=10**9, inline=48_000,
            python_version=None, **kwargs) -> tuple[Path, Path]:
    bundle_dir, output_dir = tmp_path / "bundle", tmp_path / "output"
    meta = build_meta(StepIdentity("d", "r", "t", -1, 1), multiple_outputs=multiple_outputs,
                      max_result_bytes=max_result_bytes, inline_result_max_bytes=inline, task_label="d.t")
    if python_version:
        meta["python_version"] = python_version
    write_bundle(store_path(f"file://{bundle_dir}"), pickle_payload(fn, list(args), kwargs), meta)
    return bundle_dir, output_dir


def _isolated(tmp_path: Path, argv: list[str], **env: str) -> subprocess.CompletedProcess:
    """Run ``python -S argv`` (site-packages switched off) with only cloudpickle on the path."""
    only = tmp_path / "only-cloudpickle"
    only.mkdir(exist_ok=True)
    link = only / "cloudpickle"
    if not link.exists():
        link.symlink_to(Path(cloudpickle.__file__).parent)
    return subprocess.run([sys.executable, "-S", *argv], capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "PYTHONPATH": str(only), **env})


def _run_isolated(bundle_dir: Path, output_dir: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run bootstrap.py from the bundle, as the local flavor and the entry program do."""
    return _isolated(tmp_path, [str(bundle_dir / BOOTSTRAP_FILE), "--bundle", str(bundle_dir), "--output",
                                str(output_dir), *extra])


def test_json_result_without_airflow_or_site_packages(tmp_path):
    def step(a, b=1):
        import sys

        # (no assert here: pytest rewrites asserts into calls to its own helpers)
        loaded = sorted(m for m in ("airflow", "pydantic", "airflow_stepops") if m in sys.modules)
        return {"sum": a + b, "loaded": loaded}

    bundle_dir, output_dir = _bundle(tmp_path, step, 2, b=3)
    proc = _run_isolated(bundle_dir, output_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((output_dir / RESULT_FILE).read_text())
    assert result["outputs"]["return_value"] == {"kind": "json", "value": {"sum": 5, "loaded": []}}


def test_non_json_result_becomes_an_artifact_with_checksum(tmp_path):
    import hashlib

    bundle_dir, output_dir = _bundle(tmp_path, lambda: {1, 2, 3})
    assert _run_isolated(bundle_dir, output_dir, tmp_path).returncode == 0
    entry = json.loads((output_dir / RESULT_FILE).read_text())["outputs"]["return_value"]
    data = (output_dir / entry["path"]).read_bytes()
    assert entry["kind"] == "artifact" and entry["type"] == "builtins.set"
    assert entry["size"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert cloudpickle.loads(data) == {1, 2, 3}


def test_large_json_result_goes_to_the_store(tmp_path):
    bundle_dir, output_dir = _bundle(tmp_path, lambda: list(range(1000)), inline=100)
    assert _run_isolated(bundle_dir, output_dir, tmp_path).returncode == 0
    entry = json.loads((output_dir / RESULT_FILE).read_text())["outputs"]["return_value"]
    assert entry["kind"] == "artifact" and entry["type"] == "builtins.list"


def test_multiple_outputs_are_stored_per_key(tmp_path):
    bundle_dir, output_dir = _bundle(tmp_path, lambda: {"small": 1, "big": b"x" * 10}, multiple_outputs=True)
    assert _run_isolated(bundle_dir, output_dir, tmp_path).returncode == 0
    outputs = json.loads((output_dir / RESULT_FILE).read_text())["outputs"]
    assert outputs["small"] == {"kind": "json", "value": 1}
    assert outputs["big"]["kind"] == "artifact"


def test_multiple_outputs_needs_a_dict(tmp_path):
    bundle_dir, output_dir = _bundle(tmp_path, lambda: [1], multiple_outputs=True)
    assert _run_isolated(bundle_dir, output_dir, tmp_path).returncode == 1
    error = json.loads((output_dir / ERROR_FILE).read_text())
    assert "multiple_outputs=True needs the step to return a dict" in error["message"]


def test_remote_exception_is_recorded_with_type_and_traceback(tmp_path):
    def step():
        def inner():
            raise KeyError("missing-column")

        inner()

    bundle_dir, output_dir = _bundle(tmp_path, step)
    proc = _run_isolated(bundle_dir, output_dir, tmp_path)
    assert proc.returncode == 1
    error = json.loads((output_dir / ERROR_FILE).read_text())
    assert error["type"] == "builtins.KeyError"
    assert "missing-column" in error["message"]
    assert "in inner" in error["traceback"]
    assert "KeyError" in proc.stderr  # the traceback is in the step's log too


def test_python_version_mismatch_fails_clearly(tmp_path):
    bundle_dir, output_dir = _bundle(tmp_path, lambda: 1, python_version=[3, 99, 0])
    proc = _run_isolated(bundle_dir, output_dir, tmp_path)
    assert proc.returncode == 2
    error = json.loads((output_dir / ERROR_FILE).read_text())
    assert error["type"].endswith("StepEnvironmentError")
    assert "differs from the worker's Python 3.99" in error["message"]


def test_missing_cloudpickle_fails_clearly(tmp_path):
    bundle_dir, output_dir = _bundle(tmp_path, lambda: 1)
    proc = subprocess.run([sys.executable, "-S", str(bundle_dir / BOOTSTRAP_FILE), "--bundle", str(bundle_dir),
                           "--output", str(output_dir)], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"]}, timeout=60)
    assert proc.returncode == 2
    assert "cloudpickle is not installed" in json.loads((output_dir / ERROR_FILE).read_text())["message"]


def test_result_too_large_for_the_store(tmp_path):
    bundle_dir, output_dir = _bundle(tmp_path, lambda: b"x" * 5000, max_result_bytes=1000)
    assert _run_isolated(bundle_dir, output_dir, tmp_path).returncode == 1
    error = json.loads((output_dir / ERROR_FILE).read_text())
    assert error["type"].endswith("ResultTooLargeError")
    assert "larger than max_result_size (1000 bytes)" in error["message"]
    assert not (output_dir / "return_value.pkl").exists()


def test_input_artifacts_are_resolved_from_staged_paths(tmp_path):
    staged = tmp_path / "ref0.pkl"
    staged.write_bytes(cloudpickle.dumps({"model": [1, 2]}))
    marker = {protocol.REF_MARKER: 0}
    bundle_dir, output_dir = _bundle(tmp_path, lambda m, rows: len(m["model"]) + len(rows), marker, rows=[marker])
    proc = _run_isolated(bundle_dir, output_dir, tmp_path, "--ref", f"0={staged}")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((output_dir / RESULT_FILE).read_text())["outputs"]["return_value"]["value"] == 3


@pytest.mark.parametrize("value", [float("nan"), (1, 2), {1: "a"}])
def test_values_json_cannot_round_trip_are_not_inlined(value):
    assert not bootstrap._is_json_value(value)


def _with_cloudpickle_version(bundle_dir: Path, version: str) -> None:
    meta = json.loads((bundle_dir / META_FILE).read_text())
    assert meta["cloudpickle_version"] == cloudpickle.__version__  # the worker's version travels in the bundle
    (bundle_dir / META_FILE).write_text(json.dumps({**meta, "cloudpickle_version": version}))


def test_another_cloudpickle_minor_version_fails_saying_what_to_install(tmp_path):
    bundle_dir, output_dir = _bundle(tmp_path, lambda: 1)
    _with_cloudpickle_version(bundle_dir, "2.0.0")
    assert _run_isolated(bundle_dir, output_dir, tmp_path).returncode == 2
    error = json.loads((output_dir / ERROR_FILE).read_text())
    assert error["type"].endswith("StepEnvironmentError")
    assert f"remote cloudpickle {cloudpickle.__version__} differs from the worker's cloudpickle 2.0.0" in error["message"]
    assert "pip install cloudpickle==2.0.0" in error["message"]


def test_another_cloudpickle_patch_version_runs_and_names_the_versions_if_loading_fails(tmp_path):
    major_minor = ".".join(cloudpickle.__version__.split(".")[:2])
    bundle_dir, output_dir = _bundle(tmp_path, lambda: 1)
    _with_cloudpickle_version(bundle_dir, f"{major_minor}.999")
    assert _run_isolated(bundle_dir, output_dir, tmp_path).returncode == 0
    (bundle_dir / PAYLOAD_FILE).write_bytes(b"\x80\x05not a pickle")  # what an incompatible pickle looks like
    assert _run_isolated(bundle_dir, output_dir, tmp_path).returncode == 2
    message = json.loads((output_dir / ERROR_FILE).read_text())["message"]
    assert f"pip install cloudpickle=={major_minor}.999" in message and "loading the step failed" in message


def _loaded(a, b=1):
    import sys

    return {"sum": a + b, "loaded": sorted(m for m in ("airflow", "airflow_stepops", "protocol") if m in sys.modules)}


@pytest.mark.parametrize("how", ["file", "program"])
def test_the_entry_program_runs_a_bundle_with_only_the_stdlib_and_cloudpickle(tmp_path, how):
    """What SageMaker, Vertex and Azure ML run (``entry.py`` staged beside the bundle) and what Kubernetes runs
    (``python -c``, nothing beside it): both find ``protocol`` without airflow_stepops installed."""
    bundle_dir, output_dir = _bundle(tmp_path, _loaded, 2, b=3)
    stage(f"file://{bundle_dir}")
    argv = [str(bundle_dir / protocol.ENTRY_FILE)] if how == "file" else ["-c", entry_program()]
    proc = _isolated(tmp_path, argv, **{Env.BUNDLE_PATH: str(bundle_dir), Env.OUTPUT_PATH: str(output_dir)})
    assert proc.returncode == 0, proc.stderr
    result = json.loads((output_dir / RESULT_FILE).read_text())
    # the step ran in bootstrap's own process, which imported protocol.py from the bundle
    assert result["outputs"]["return_value"]["value"] == {"sum": 5, "loaded": ["protocol"]}


def test_the_entry_program_writes_sagemakers_failure_file(tmp_path):
    def fail():
        raise ValueError("bad rows")

    bundle_dir, output_dir = _bundle(tmp_path, fail)
    stage(f"file://{bundle_dir}")
    failure = tmp_path / "failure"
    proc = _isolated(tmp_path, [str(bundle_dir / protocol.ENTRY_FILE)], **{
        Env.BUNDLE_PATH: str(bundle_dir), Env.OUTPUT_PATH: str(output_dir), Env.FAILURE_FILE: str(failure)})
    assert proc.returncode == 1, proc.stderr
    text = failure.read_text()
    assert text.startswith("ValueError: bad rows\n" + protocol.FAILURE_MARKER) and len(text) <= 1024


def test_stage_puts_the_entry_program_inputs_and_listing_beside_the_bundle(tmp_path):
    from airflow_stepops.artifacts import ArtifactRef

    data = cloudpickle.dumps([1, 2])
    (tmp_path / "in.pkl").write_bytes(data)
    import hashlib

    ref = ArtifactRef(f"file://{tmp_path}/in.pkl", "builtins.list", len(data), hashlib.sha256(data).hexdigest())
    (tmp_path / "b" / "refs").mkdir(parents=True)
    stage(f"file://{tmp_path}/b", {3: ref}, {"3": {"path": "/x"}})
    assert (tmp_path / "b" / protocol.ENTRY_FILE).read_bytes() == (RUNTIME_DIR / protocol.ENTRY_FILE).read_bytes()
    assert (tmp_path / "b" / protocol.staged_ref(3)).read_bytes() == data
    assert json.loads((tmp_path / "b" / protocol.REFS_FILE).read_text()) == {"3": {"path": "/x"}}


def test_only_the_protocol_spells_runtime_environment_variables():
    """Every ``STEPOPS_*`` name is declared once, in protocol.py (emulators' own settings aside)."""
    package = RUNTIME_DIR.parent
    found = []
    for path in package.rglob("*.py"):
        if path.name == "protocol.py" or "testing" in path.relative_to(package).parts[:1]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("STEPOPS_"):
                found.append((str(path.relative_to(package)), node.lineno, node.value))
    assert not found
