"""``python -m benchmarks [parse] [local] [triggerer] [artifacts] [options]``: the budgets of DESIGN section 7.

Prints one table per benchmark (measurements, baselines from the same run, ratios, budget status)
and a summary, and writes everything as JSON to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from benchmarks.common import (
    GIB,
    Section,
    fmt_bytes,
    fmt_ratio,
    parse_size,
    progress,
    render_section,
    render_table,
    status_word,
)

#: each benchmark (module ``benchmarks.bench_<name>``) and its ``run`` keyword arguments' command-line options
RUN_OPTIONS: dict[str, dict[str, str]] = {
    "parse": {"quick": "quick"}, "local": {"quick": "quick"}, "triggerer": {"triggers": "triggers"},
    "artifacts": {"size": "size", "quick": "quick"}, "kubernetes": {"steps": "k8s_steps"},
    "vertex": {"steps": "vertex_steps"}, "modal": {"steps": "modal_steps"}, "cli": {"quick": "quick"}}
BENCHMARKS = tuple(RUN_OPTIONS)
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _version(dist: str) -> str:
    """Installed version of a distribution, without importing it."""
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, Any]:
    """What the numbers depend on: versions, CPUs, memory and load."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 0
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 0
    return {"python": platform.python_version(), "airflow": _version("apache-airflow"),
            "airflow_stepops": _version("airflow-stepops"), "cloudpickle": _version("cloudpickle"),
            "numpy": _version("numpy"), "platform": platform.platform(), "cpus": cpus, "memory_bytes": memory,
            "loadavg_start": list(os.getloadavg())}


def run_one(name: str, workdir: Path, args: argparse.Namespace) -> Section:
    """Run one benchmark, turning a crash into a section with an error."""
    started = time.perf_counter()
    try:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        section = module.run(workdir, **{key: getattr(args, option) for key, option in RUN_OPTIONS[name].items()})
    except Exception as exc:
        section = Section(name, "did not complete", error=f"{type(exc).__name__}: {exc}")
        section.notes.append("traceback: " + " | ".join(traceback.format_exc().strip().splitlines()[-6:]))
    section.seconds = time.perf_counter() - started
    return section


def summary(sections: list[Section]) -> str:
    """One line per budget row of every benchmark."""
    rows = [(s.name, r.metric.strip(), fmt_ratio(r.ratio), r.budget, status_word(r.met))
            for s in sections for r in s.rows if r.budget]
    rows += [(s.name, "(benchmark failed)", "", "", "ERROR") for s in sections if s.error]
    return render_table(("benchmark", "budget metric", "ratio", "budget", "status"), rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line: which benchmarks, and their sizes."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run the benchmarks of DESIGN section 7 and print ratios against baselines measured in the "
        "same run; results also go to benchmarks/results/ as JSON. See benchmarks/README.md.")
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run: {', '.join(BENCHMARKS)} "
                        "(default: all)")
    parser.add_argument("--size", type=parse_size, default=GIB, help="artifact payload size (default 1GiB)")
    parser.add_argument("--triggers", type=int, default=1000, help="concurrent triggers (default 1000)")
    parser.add_argument("--k8s-steps", type=int, default=100, help="deferred Kubernetes steps (default 100)")
    parser.add_argument("--vertex-steps", type=int, default=50, help="deferred Vertex AI steps (default 50)")
    parser.add_argument("--modal-steps", type=int, default=20, help="deferred Modal steps (default 20)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (noisier; for a smoke test)")
    parser.add_argument("--tmp-dir", default=None, help="where temporary files go (default: the system temp dir)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON results go")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory for inspection")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    args.names = [n for n in BENCHMARKS if n in args.names] if args.names else list(BENCHMARKS)
    if args.triggers < 10:
        parser.error("--triggers: at least 10")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks; exit status 1 only if one of them could not run."""
    args = parse_args(argv)
    env = environment()
    started = datetime.now(timezone.utc)
    print(f"airflow-stepops benchmarks (DESIGN section 7), {started:%Y-%m-%d %H:%M:%S} UTC", flush=True)
    print(f"Python {env['python']}, Airflow {env['airflow']}, airflow-stepops {env['airflow_stepops']}, "
          f"{env['cpus']} CPU(s), {fmt_bytes(env['memory_bytes'])} RAM, load average "
          f"{' '.join(f'{x:.2f}' for x in env['loadavg_start'])}", flush=True)
    print("Ratios compare against baselines measured in this run; budgets are reported, not asserted.\n",
          flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="stepops-bench-", dir=args.tmp_dir))
    sections = []
    try:
        for name in args.names:
            progress(f"{name}: starting")
            section = run_one(name, workdir, args)
            sections.append(section)
            print(render_section(section) + "\n", flush=True)
    finally:
        if args.keep_tmp:
            progress(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    env["loadavg_end"] = list(os.getloadavg())
    print("== summary ==")
    print(summary(sections))
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in env['loadavg_end'])} "
          f"(a busy machine makes every ratio noisier)")

    args.results_dir.mkdir(parents=True, exist_ok=True)
    payload = {"started": started.isoformat(), "argv": sys.argv[1:], "environment": env,
               "options": {"size": args.size, "triggers": args.triggers, "quick": args.quick},
               "sections": [s.to_json() for s in sections]}
    out = args.results_dir / f"{started:%Y%m%d-%H%M%S}-{'-'.join(args.names)}.json"
    text = json.dumps(payload, indent=1, default=str)
    out.write_text(text)
    (args.results_dir / "latest.json").write_text(text)
    print(f"results: {out}")
    return 1 if any(s.error for s in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
