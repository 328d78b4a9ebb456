"""Emulated images have ``python3`` and no ``python``, like an image with Debian's python3 package only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from airflow_stepops.testing._images import write_python_shims


def _run(shims: Path, name: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": f"{shims}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([name, "-c", "import sys; print(sys.executable)"], env=env, capture_output=True, text=True)


def test_python3_runs_this_interpreter_and_python_is_missing(tmp_path: Path) -> None:
    write_python_shims(tmp_path)
    found = _run(tmp_path, "python3")
    assert found.returncode == 0 and found.stdout.strip() == sys.executable
    missing = _run(tmp_path, "python")  # shadows the host's python, if it has one
    assert missing.returncode == 127
    assert 'exec: "python": executable file not found in $PATH' in missing.stderr
