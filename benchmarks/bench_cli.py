"""``stepops`` response times on a demo-like home with all six example step operators registered.

Budgets (issue "A new user's first hour"): ``list`` and ``describe`` under 2 s (configuration only),
``render`` under 5 s; baselines measured in the same run: ``python -c pass`` and ``airflow version``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import PROJECT_ROOT, Section, airflow_env, fmt_time, median, ratio

BIN = Path(sys.executable).parent
BUDGETS = {"list": 2.0, "describe": 2.0, "render": 5.0}


def _timed(cmd: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=PROJECT_ROOT, check=True, capture_output=True, timeout=600)
    return time.perf_counter() - started


def run(workdir: Path, quick: bool = False) -> Section:
    section = Section("cli", "stepops list / describe / render against `python -c pass` and `airflow version`")
    home = workdir / "cli-home"
    home.mkdir(parents=True, exist_ok=True)
    env = airflow_env(home, AIRFLOW__CORE__DAGS_FOLDER=str(PROJECT_ROOT / "dags_examples"))
    subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, check=True, capture_output=True, timeout=900)
    for flavor in json.loads((PROJECT_ROOT / "dags_examples" / "connections.json").read_text()).values():
        subprocess.run([sys.executable, "dags_examples/setup_connections.py", flavor["conn_type"][len("stepops_"):]],
                       env=env, cwd=PROJECT_ROOT, check=True, capture_output=True, timeout=600)
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "airflow version": [str(BIN / "airflow"), "version"],
        "list": [str(BIN / "stepops"), "list"],
        "describe": [str(BIN / "stepops"), "describe", "sagemaker_step_operator"],
        "render": [str(BIN / "stepops"), "render", "mixed_pipeline", "train_model"],
    }
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(2 if quick else 5):  # interleaved, so load drifts hit every command alike
        for name, cmd in commands.items():
            samples[name].append(_timed(cmd, env))
    base = median(samples["airflow version"])
    for name, limit in BUDGETS.items():
        value = median(samples[name])
        section.add(f"stepops {name}", fmt_time(value), f"airflow version {fmt_time(base)}", ratio(value, base),
                    f"< {limit:.0f} s", value < limit)
    section.notes.append(f"python -c pass: {fmt_time(median(samples['python -c pass']))} (process floor)")
    section.data["samples"] = samples
    return section
