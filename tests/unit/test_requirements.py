"""A step's requirements: what the DAG file may say, and what a job's runtime does with them in images that differ
from the workers' (another cloudpickle, no pip), run as a real interpreter of such an image would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_stepops.bundle import StepIdentity, build_meta, pickle_payload, stage, write_bundle
from airflow_stepops.requirements import check_line, requirements_text
from airflow_stepops.runtime import protocol
from airflow_stepops.runtime.protocol import Env

from ..package_index import build_wheel


@pytest.mark.parametrize("line", ["numpy", "numpy>=1.26,<3", "torch==2.4.*; python_version >= '3.10'",
                                  "pkg[extra] @ https://example.com/pkg-1.0-py3-none-any.whl", "# a comment", "",
                                  "--extra-index-url https://pypi.example/simple", "numpy==2.0 --hash=sha256:abc",
                                  "scipy  # inline comment", "numpy==1.26.4\t# pinned", "--require-hashes",
                                  "https://example.com/foo-1.0-py3-none-any.whl",
                                  "git+https://github.com/psf/requests#egg=requests"])
def test_requirement_lines_pip_takes_are_accepted(line):
    check_line(line, "requirements[0]")


@pytest.mark.parametrize(("line", "says"), [("numpy>>1", "not a requirement specifier"),
                                            ("-r base.txt", "names another file"),
                                            ("--constraint=c.txt", "names another file"),
                                            ("-e .", "names another file"), ("../lib/mypkg", "local paths"),
                                            ("--user", "'--user' is not allowed here"),
                                            ("foo @ file:///home/me/foo.whl", "names a local file"),
                                            ("--find-links ./wheels", "must be a URL the job can reach")])
def test_requirement_lines_the_job_could_not_honour_are_refused(line, says):
    with pytest.raises(ValueError, match="requirements\\[0\\]") as caught:
        check_line(line, "requirements[0]")
    assert says in str(caught.value)


def test_a_requirements_file_is_read_relative_to_the_dag_folder(tmp_path):
    (tmp_path / "reqs.txt").write_text("numpy\n")
    assert requirements_text("reqs.txt", str(tmp_path)) == "numpy\n"
    hashed = "numpy==1.26.4 \\\n    --hash=sha256:aaa \\\n    --hash=sha256:bbb\n--require-hashes\n"  # pip-compile's
    (tmp_path / "hashed.txt").write_text(hashed)
    assert requirements_text("hashed.txt", str(tmp_path)) == hashed
    assert requirements_text(["numpy", "scipy"], None) == "numpy\nscipy\n"
    with pytest.raises(ValueError, match="'other.txt' does not exist"):
        requirements_text("other.txt", str(tmp_path))


def _image(root: Path, *packages: Path, pip: bool = True) -> str:
    """The Python of an emulated image: a fresh virtual environment with only ``packages`` (wheels) installed."""
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv",
                    *(() if pip else ("--without-pip",)), str(root)], check=True, capture_output=True)
    python = root / "bin" / "python3"
    if packages:
        subprocess.run([str(python), "-m", "pip", "install", "--no-index", *map(str, packages)], check=True,
                       capture_output=True)
    return str(python)


def _answer() -> int:
    return 42


def _run_entry(python: str, tmp_path: Path, requirements: str = "", **env: str) -> tuple[subprocess.CompletedProcess,
                                                                                         Path]:
    """A step's job started by ``python`` (an image's interpreter) on a bundle in ``tmp_path``."""
    bundle, output = tmp_path / "bundle", tmp_path / "output"
    from airflow.sdk import ObjectStoragePath

    meta = build_meta(StepIdentity("d", "r", "t", -1, 1), multiple_outputs=False, max_result_bytes=10**9,
                      inline_result_max_bytes=48_000, task_label="d.t", requirements=requirements)
    write_bundle(ObjectStoragePath(f"file://{bundle}"), pickle_payload(_answer, [], {}), meta)
    stage(f"file://{bundle}")
    output.mkdir()
    done = subprocess.run([python, str(bundle / protocol.ENTRY_FILE)], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), Env.BUNDLE_PATH: str(bundle),
                               Env.OUTPUT_PATH: str(output), **env})
    return done, output


def test_an_image_with_another_cloudpickle_minor_gets_the_workers_installed_for_the_step(tmp_path, package_index):
    import cloudpickle

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    old = build_wheel(wheels, "cloudpickle", "2.2.1", {"cloudpickle/__init__.py": b"__version__ = '2.2.1'\n"})
    python = _image(tmp_path / "image", old)  # like the Deep Learning Containers: cloudpickle 2.2.1
    done, output = _run_entry(python, tmp_path, PIP_INDEX_URL=package_index.url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"the image has cloudpickle 2.2.1, the workers {cloudpickle.__version__}" in done.stdout
    assert json.loads((output / protocol.RESULT_FILE).read_text())["outputs"]["return_value"]["value"] == 42


def test_requirements_on_an_image_without_pip_fail_naming_it(tmp_path):
    python = _image(tmp_path / "image", pip=False)
    done, output = _run_entry(python, tmp_path, requirements="stepops-probe==1.0\n")
    error = json.loads((output / protocol.ERROR_FILE).read_text())
    assert done.returncode == 2 and (error["type"], error["phase"]) == (protocol.REQUIREMENTS_TYPE, "install")
    assert "has no pip" in error["message"] and "leave \"image\" unset" in error["message"], error


def test_without_requirements_or_pip_a_missing_cloudpickle_is_named_by_the_bootstrap(tmp_path):
    python = _image(tmp_path / "image", pip=False)
    done, output = _run_entry(python, tmp_path)
    error = json.loads((output / protocol.ERROR_FILE).read_text())
    assert done.returncode == 2 and error["phase"] == "load" and "pip install cloudpickle" in error["message"], error


def test_a_cached_install_that_cannot_be_read_is_installed_afresh(tmp_path, package_index):
    import cloudpickle

    from airflow_stepops.runtime.entry import _cache_key

    python = _image(tmp_path / "image")  # Python and pip only, like python:3.x-slim
    cache = tmp_path / "cache"
    cache.mkdir()
    broken = cache / f"{_cache_key('stepops-probe==1.0', f'cloudpickle=={cloudpickle.__version__}')}.tar.gz"
    broken.write_bytes(b"\x1f\x8b cut short")
    done, _ = _run_entry(python, tmp_path, requirements="stepops-probe==1.0\n", PIP_INDEX_URL=package_index.url,
                              **{Env.REQUIREMENTS_CACHE: str(cache)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cannot be read" in done.stderr and "requirements: installed in" in done.stdout
    import tarfile

    with tarfile.open(broken) as tar:  # replaced by the fresh install
        assert any(name.startswith("stepops_probe") for name in tar.getnames())


def test_index_credentials_are_masked_in_the_log(tmp_path, package_index):
    python = _image(tmp_path / "image")
    done, _ = _run_entry(python, tmp_path, requirements="--extra-index-url https://deploy:s3cret@pypi.example/simple\n"
                         "stepops-probe==1.0\n", PIP_INDEX_URL=package_index.url, PIP_TIMEOUT="1", PIP_RETRIES="0")
    assert "s3cret" not in done.stdout.split("pip install --target")[1].splitlines()[0]
    assert "https://****@pypi.example/simple" in done.stdout
