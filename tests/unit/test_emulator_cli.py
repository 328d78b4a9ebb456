"""``python -m airflow_stepops.testing FLAVOR``: one command starts any flavor's emulator."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path


def _cli(*args: str, **kwargs) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "airflow_stepops.testing", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_unknown_flavor_lists_the_emulated_ones() -> None:
    proc = _cli("local")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "unknown flavor 'local'" in err and "kubernetes, sagemaker, vertex, azureml, modal" in err


def test_a_flavor_runs_its_emulator_until_stopped(tmp_path: Path) -> None:
    env_file = tmp_path / "modal.env"
    proc = _cli("modal", "--env-file", str(env_file))
    try:
        deadline = time.monotonic() + 60
        while not env_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "MODAL_SERVER_URL=" in env_file.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0 and not env_file.exists()
