"""Triggerer budget: 1,000 concurrent deferred steps on one event loop, with shared status polling.

A worker process per scenario runs ``LocalStepOperatorTrigger``s the way a triggerer does (all on one asyncio
loop) against realistic local job directories: ``spec.json``, ``launcher.json`` naming a live
process (the worker itself, so the hook sees the launcher alive and the job running), ``child.json``
and a ``step.log``. A separate writer process then finishes the jobs at staggered times by writing
``status.json`` (and a last log line), as real launchers do. Scenarios:

- shared, 100 steps and 1,000 steps: all triggers subscribe to one ``SharedStatusPoller``;
- unshared, 1,000 steps (the baseline): every trigger gets a distinct poll interval, hence its own
  poller, i.e. one status call per step per round, which is what polling without sharing costs.

Status calls are counted by ``SharedStatusPoller.calls``; log reads, batch sizes and the time spent
in each status call are counted by wrapping the hook's methods in the worker process only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    Section,
    airflow_env,
    budget_check,
    cpu_seconds,
    emit,
    fmt_bytes,
    fmt_time,
    median,
    peak_rss_bytes,
    percentile,
    progress,
    ratio,
    reset_peak_rss,
    rss_bytes,
    run_triggers,
    run_worker,
)

INTERVAL = 0.5  # the local hook's default poll interval
START_DELAY = 1.0  # first job finishes this long after the triggers start
SPREAD = 4.0  # jobs finish evenly over this many seconds

WRITER = r"""
import json, os, sys, time
plan = json.load(open(sys.argv[1]))
written = {}
for delay, job_dir in plan["jobs"]:
    pause = plan["t0"] + delay - time.time()
    if pause > 0:
        time.sleep(pause)
    with open(os.path.join(job_dir, "step.log"), "a") as fh:
        fh.write("[stepops] step finished in 1.00s\n")
    now = time.time()
    tmp = os.path.join(job_dir, "status.json.tmp")
    with open(tmp, "w") as fh:
        json.dump({"state": "succeeded", "exit_code": 0, "reason": "", "started_at": plan["t0"],
                   "finished_at": now, "peak_rss_bytes": None}, fh)
    os.replace(tmp, os.path.join(job_dir, "status.json"))
    written[job_dir] = now
json.dump(written, open(sys.argv[2], "w"))
"""


# ---- worker side ------------------------------------------------------------------------------
def make_job_dirs(root: Path, n: int) -> list[dict[str, Any]]:
    """Create ``n`` running-looking local job directories; return their handles."""
    from airflow_stepops.runtime.local_launcher import process_start_time
    from airflow_stepops.runtime.protocol import BOOTSTRAP_FILE, Env

    pid = os.getpid()
    launcher = json.dumps({"pid": pid, "start_time": process_start_time(pid)})
    handles = []
    for i in range(n):
        job_dir = root / f"bench_triggerer-step_{i:05d}-t1-{i:010x}"
        job_dir.mkdir(parents=True)
        spec = {"argv": [sys.executable, str(job_dir / BOOTSTRAP_FILE), "--bundle", str(job_dir / "bundle"),
                         "--output", str(job_dir / "output")],
                "cwd": None, "cpu_ids": [i % 2], "memory_limit_bytes": 1 << 30, "limit_address_space": True,
                "gpus": None, "max_runtime_seconds": None, "nice": 0, "cancel_grace_seconds": 10.0,
                "env": {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", ""),
                        Env.FLAVOR: "local", Env.JOB_DIR: str(job_dir), "PYTHONUNBUFFERED": "1",
                        **{k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                            "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                                            "RAYON_NUM_THREADS", "TF_NUM_INTRAOP_THREADS")}},
                "output_uri": f"file://{job_dir}/output",
                "identity": {"dag_id": "bench_triggerer", "run_id": "bench", "task_id": f"step_{i:05d}",
                             "map_index": -1, "try_number": 1}}
        (job_dir / "spec.json").write_text(json.dumps(spec))
        (job_dir / "launcher.json").write_text(launcher)
        (job_dir / "child.json").write_text(json.dumps({"pid": pid, "started_at": time.time()}))
        (job_dir / "step.log").write_text(f"[stepops] running bench_triggerer.step_{i:05d} on localhost\n")
        handles.append({"flavor": "local", "job_id": job_dir.name, "job_dir": str(job_dir),
                        "output_uri": spec["output_uri"], "conn_id": "stepops_local_default", "try_number": 1})
    return handles


class Counters:
    """Counts status calls (batch sizes, time per call) and log reads by wrapping the hook's methods."""

    def __init__(self) -> None:
        """Zero the counters and wrap the local hook's status and log methods."""
        self.reset()
        from airflow_stepops.hooks.local import LocalStepOperatorHook

        batch, read_logs = LocalStepOperatorHook.aget_statuses, LocalStepOperatorHook.read_logs
        counters = self

        async def counted_batch(hook: Any, handles: list[Any]) -> Any:
            """Time and count one batched status call."""
            t0 = time.perf_counter()
            try:
                return await batch(hook, handles)
            finally:
                counters.batch_seconds.append(time.perf_counter() - t0)
                counters.batch_sizes.append(len(handles))

        def counted_logs(hook: Any, handle: Any, cursor: Any) -> Any:
            """Count one log read."""
            counters.log_reads += 1
            return read_logs(hook, handle, cursor)

        LocalStepOperatorHook.aget_statuses = counted_batch  # type: ignore[method-assign]
        LocalStepOperatorHook.read_logs = counted_logs  # type: ignore[method-assign]

    def reset(self) -> None:
        """Zero all counters."""
        self.batch_seconds: list[float] = []
        self.batch_sizes: list[int] = []
        self.log_reads = 0


def run_scenario(root: Path, n: int, shared: bool, counters: Counters) -> dict[str, Any]:
    """Run ``n`` triggers until every job has finished; return the measurements."""
    from airflow_stepops.triggers.base import SharedStatusPoller
    from airflow_stepops.triggers.local import LocalStepOperatorTrigger

    root.mkdir(parents=True)
    handles = make_job_dirs(root / "jobs", n)
    counters.reset()
    calls_before = SharedStatusPoller.calls
    rss_before = rss_bytes()
    peak_supported = reset_peak_rss()
    cpu_before = cpu_seconds()
    start = time.time() + 0.3  # the writer's clock starts once the triggers are running
    plan = {"t0": start, "jobs": [[START_DELAY + SPREAD * i / max(n - 1, 1), h["job_dir"]]
                                  for i, h in enumerate(handles)]}
    (root / "plan.json").write_text(json.dumps(plan))
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(root / "plan.json"), str(root / "written.json")])
    done: dict[str, tuple[float, str]] = {}

    def record(trigger: LocalStepOperatorTrigger, event: Any) -> None:
        done[trigger.handle["job_dir"]] = (time.time(), event.payload["status"])

    t0 = time.time()
    _, wall = run_triggers(lambda h, p: LocalStepOperatorTrigger(conn_id="stepops_local_default", handle=h,
                                                                 poll_interval=p), handles, INTERVAL, shared, record)
    cpu = cpu_seconds() - cpu_before
    peak = peak_rss_bytes()
    writer.wait(timeout=60)
    written = json.loads((root / "written.json").read_text())
    latencies = [done[d][0] - written[d] for d in written if d in done]
    states = sorted({state for _, state in done.values()})
    shutil.rmtree(root, ignore_errors=True)
    return {
        "n": n, "shared": shared, "wall": wall, "cpu": cpu, "rss_before": rss_before,
        "peak_rss": peak if peak_supported else None, "status_calls": SharedStatusPoller.calls - calls_before,
        "batch_sizes": counters.batch_sizes, "batch_seconds": counters.batch_seconds,
        "log_reads": counters.log_reads, "latencies": latencies, "states": states, "completed": len(done),
        "last_written_after": max(written.values()) - t0, "polling_seconds": max(t for t, _ in done.values()) - t0,
    }


def worker(root: Path, n: int, shared: bool) -> dict[str, Any]:
    """Run one scenario in this (fresh) process, so memory and CPU figures are its own."""
    import logging

    logging.getLogger().setLevel(logging.WARNING)
    return run_scenario(root, n, shared, Counters())


# ---- orchestrator side ------------------------------------------------------------------------
def _per_interval(result: dict[str, Any], value: float) -> float:
    """``value`` per poll interval of the scenario's polling time."""
    return value / (result["polling_seconds"] / INTERVAL)


def run(workdir: Path, *, triggers: int = 1000) -> Section:
    """Run the triggerer benchmark and build its table."""
    section = Section("triggerer", f"{triggers:,} concurrent deferred local steps on one event loop")
    small = max(triggers // 10, 1)
    scenarios = [{"n": small, "shared": True}, {"n": triggers, "shared": True}, {"n": triggers, "shared": False}]
    progress(f"triggerer: {small} and {triggers} shared, {triggers} unshared triggers "
             f"(jobs finish over {START_DELAY + SPREAD:.0f} s)")
    home = workdir / "airflow-home-triggerer"
    results = []
    for i, scenario in enumerate(scenarios):
        results.append(run_worker("benchmarks.bench_triggerer",
                                  ["worker", workdir / f"triggerer-{i}", scenario["n"], int(scenario["shared"])],
                                  env=airflow_env(home)))
    few, shared, unshared = results
    for res in results:
        if res["completed"] != res["n"] or res["states"] != ["succeeded"]:
            raise RuntimeError(f"only {res['completed']}/{res['n']} triggers completed ({res['states']})")

    calls_ratio = ratio(unshared["status_calls"], shared["status_calls"])
    section.add(f"status calls, {triggers:,} steps: shared vs unshared", f"{shared['status_calls']:,}",
                f"{unshared['status_calls']:,}", ratio(shared["status_calls"], unshared["status_calls"]))
    per_few, per_many = _per_interval(few, few["status_calls"]), _per_interval(shared, shared["status_calls"])
    growth = ratio(per_many, per_few)
    section.add(f"status calls per poll interval: {triggers:,} vs {small:,} steps (shared)", f"{per_many:.2f}",
                f"{per_few:.2f}", growth, "~1x (not steps)", budget_check(growth, 1.5, at_most=True))
    section.add(f"status calls per poll interval, {triggers:,} steps: shared vs unshared", f"{per_many:.2f}",
                f"{_per_interval(unshared, unshared['status_calls']):.1f}",
                ratio(per_many, _per_interval(unshared, unshared["status_calls"])))
    section.add("jobs checked per status call (shared vs unshared)",
                f"{median(shared['batch_sizes']):.0f}", f"{median(unshared['batch_sizes']):.0f}")
    section.add("time per status call, incl. thread-pool wait (median)", fmt_time(median(shared["batch_seconds"])),
                fmt_time(median(unshared["batch_seconds"])))
    section.add("log reads (per step per round, both modes)", f"{shared['log_reads']:,}",
                f"{unshared['log_reads']:,}", ratio(shared["log_reads"], unshared["log_reads"]))
    section.add("wall until all complete (shared vs unshared)", fmt_time(shared["wall"]), fmt_time(unshared["wall"]),
                ratio(shared["wall"], unshared["wall"]))
    section.add("detection latency p50 / p95 (shared)",
                f"{fmt_time(median(shared['latencies']))} / {fmt_time(percentile(shared['latencies'], 95))}",
                f"{fmt_time(median(unshared['latencies']))} / {fmt_time(percentile(unshared['latencies'], 95))}")
    section.add("CPU time (shared vs unshared)", f"{fmt_time(shared['cpu'])} ({shared['cpu'] / shared['wall']:.0%})",
                f"{fmt_time(unshared['cpu'])} ({unshared['cpu'] / unshared['wall']:.0%})",
                ratio(shared["cpu"], unshared["cpu"]))
    if shared["peak_rss"] and unshared["peak_rss"]:
        inc_s = shared["peak_rss"] - shared["rss_before"]
        inc_u = unshared["peak_rss"] - unshared["rss_before"]
        section.add("peak RSS increase (shared vs unshared)", fmt_bytes(inc_s), fmt_bytes(inc_u), ratio(inc_s, inc_u))
        section.add("  per step (shared)", fmt_bytes(inc_s / triggers))
    section.notes += [
        f"unshared = each trigger given a distinct poll interval, so each gets its own SharedStatusPoller: "
        f"{calls_ratio:.0f}x the status calls." if calls_ratio else "unshared baseline made no calls",
        f"jobs finished evenly between +{START_DELAY:.0f} s and +{START_DELAY + SPREAD:.0f} s; last status written "
        f"+{shared['last_written_after']:.2f} s, all {triggers:,} events by +{shared['wall']:.2f} s "
        f"(poll interval {INTERVAL} s). Latency = event time - status.json write time.",
        f"RSS before the {triggers:,} triggers: {fmt_bytes(shared['rss_before'])} (Airflow imported). "
        f"{small:,}-step shared run: {few['status_calls']} status calls, CPU {fmt_time(few['cpu'])}, detection "
        f"latency p50 / p95 {fmt_time(median(few['latencies']))} / {fmt_time(percentile(few['latencies'], 95))}.",
        "each scenario runs in its own fresh worker process (CPU and peak RSS are that process's own).",
        "log reads are made per trigger after every status delivery (one thread hop each), so they grow with "
        "the number of steps even when status polling is shared.",
    ]
    section.data = {"scenarios": results, "interval": INTERVAL, "start_delay": START_DELAY, "spread": SPREAD}
    return section


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        emit(worker(Path(sys.argv[2]), int(sys.argv[3]), bool(int(sys.argv[4]))))
