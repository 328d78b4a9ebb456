"""Shared helpers: result rows, statistics, formatting, memory probes and worker subprocesses."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESULT_MARKER = "BENCH_RESULT "
GIB = 1 << 30
MIB = 1 << 20


# ---- results ----------------------------------------------------------------------------------
@dataclass
class Row:
    """One line of a benchmark table: a measurement, its baseline, their ratio and the budget."""

    metric: str
    value: str
    baseline: str = ""
    ratio: float | None = None
    budget: str = ""
    met: bool | None = None


@dataclass
class Section:
    """The outcome of one benchmark: table rows, free-text notes and raw data for the JSON file."""

    name: str
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None

    def add(self, *args: Any, **kwargs: Any) -> Row:
        """Append a ``Row`` built from the arguments and return it."""
        row = Row(*args, **kwargs)
        self.rows.append(row)
        return row

    def to_json(self) -> dict[str, Any]:
        """JSON-able form (rows, notes and raw samples)."""
        return {"name": self.name, "title": self.title, "seconds": round(self.seconds, 2), "error": self.error,
                "rows": [asdict(r) for r in self.rows], "notes": self.notes, "data": self.data}


def budget_check(ratio: float | None, limit: float, *, at_most: bool) -> bool | None:
    """Whether ``ratio`` meets ``<= limit`` (``at_most``) or ``>= limit``; None if unknown."""
    if ratio is None:
        return None
    return ratio <= limit if at_most else ratio >= limit


# ---- statistics and formatting ----------------------------------------------------------------
def median(values: Iterable[float]) -> float:
    """Median of the values (NaN when empty)."""
    data = list(values)
    return statistics.median(data) if data else float("nan")


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of the values (NaN when empty)."""
    data = sorted(values)
    if not data:
        return float("nan")
    index = min(len(data) - 1, max(0, round(q / 100 * (len(data) - 1))))
    return data[index]


def ratio(value: float, baseline: float) -> float | None:
    """``value / baseline`` or None when the baseline is zero or missing."""
    if not baseline or baseline != baseline or value != value:
        return None
    return value / baseline


def fmt_time(seconds: float) -> str:
    """Human form of a duration: us, ms or s."""
    if seconds != seconds:
        return "n/a"
    if abs(seconds) < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if abs(seconds) < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def fmt_bytes(n: float) -> str:
    """Human form of a byte count (binary units)."""
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_rate(nbytes: float, seconds: float) -> str:
    """Throughput in MiB/s."""
    return "n/a" if not seconds else f"{nbytes / seconds / MIB:.0f} MiB/s"


def fmt_ratio(value: float | None) -> str:
    """``1.23x``, ``1/646x`` for tiny ratios, or empty."""
    if value is None:
        return ""
    if 0 < value < 0.01:
        return f"1/{1 / value:.0f}x"
    return f"{value:.2f}x"


def parse_size(text: str) -> int:
    """``1GiB``, ``512MiB``, ``1G`` or a byte count: the same sizes ResourceSettings accepts."""
    from airflow_stepops.resources import parse_size as parse

    return parse(text, field="--size")


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain fixed-width text table."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def status_word(met: bool | None) -> str:
    """Budget status as shown in tables."""
    return {True: "MET", False: "MISSED", None: ""}[met]


def render_section(section: Section) -> str:
    """The table and notes of one benchmark."""
    out = [f"== {section.name}: {section.title} ({section.seconds:.0f} s) =="]
    if section.error:
        out.append(f"FAILED: {section.error}")
    if section.rows:
        rows = [(r.metric, r.value, r.baseline, fmt_ratio(r.ratio), r.budget, status_word(r.met))
                for r in section.rows]
        out.append(render_table(("metric", "measured", "baseline", "ratio", "budget", "status"), rows))
    for note in section.notes:
        out.append(f"  * {note}")
    return "\n".join(out)


def progress(message: str) -> None:
    """Progress line on stderr (the tables go to stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- memory probes (Linux /proc; fall back to getrusage) --------------------------------------
def _status_bytes(field_name: str) -> int:
    """A ``kB`` field of /proc/self/status in bytes; where unavailable, the peak RSS getrusage reports."""
    kib = _status_kib(field_name)
    if kib is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return kib * 1024


def _status_kib(field_name: str) -> int | None:
    """A ``kB`` field of /proc/self/status, None where unavailable."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            match = re.search(rf"^{field_name}:\s+(\d+)\s+kB", fh.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return _status_bytes("VmRSS")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size since the last ``reset_peak_rss`` (or since start)."""
    return _status_bytes("VmHWM")


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) so far."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---- worker subprocesses ----------------------------------------------------------------------
def emit(result: Mapping[str, Any]) -> None:
    """Print a worker's result for ``run_worker`` to pick up."""
    print(RESULT_MARKER + json.dumps(result), flush=True)


def airflow_env(home: Path, **extra: str) -> dict[str, str]:
    """Environment for an isolated Airflow: a throw-away AIRFLOW_HOME, no examples, quiet logs.

    Inherited ``AIRFLOW_*`` settings (connections, config overrides) are dropped so the run does not
    depend on the caller's shell.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
    })
    env.update(extra)
    return env


def plain_env() -> dict[str, str]:
    """Environment for workers that do not use Airflow."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    return env


class WorkerError(RuntimeError):
    """A benchmark worker subprocess failed or printed no result."""


def run_worker(module: str, args: Sequence[object], *, env: Mapping[str, str] | None = None,
               timeout: float = 600) -> dict[str, Any]:
    """Run ``python -m module args...`` and return the JSON it emitted with ``emit``."""
    cmd = [sys.executable, "-m", module, *map(str, args)]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=dict(env or plain_env()), capture_output=True, text=True,
                          timeout=timeout, check=False)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-25:])
    raise WorkerError(f"{' '.join(cmd[2:4])} exited with {proc.returncode} and no result:\n{tail}")


# ---- deferred steps: triggers on one event loop, polling shared or not ----------------------------
async def wait_triggers(triggers: Iterable[Any], on_event: Callable[[Any, Any], None] | None = None) -> list[str]:
    """Run the triggers on this event loop, as a triggerer does, until each fires (``on_event(trigger, event)``
    the moment it does); their final statuses."""
    import asyncio

    async def wait_one(trigger: Any) -> str:
        async for event in trigger.run():
            if on_event is not None:
                on_event(trigger, event)
            return str(event.payload["status"])
        return "none"

    return list(await asyncio.gather(*(wait_one(t) for t in list(triggers))))


def run_triggers(make: Callable[[Any, float], Any], handles: list[dict[str, Any]], interval: float,
                 shared: bool, on_event: Callable[[Any, Any], None] | None = None) -> tuple[list[str], float]:
    """Wait for one trigger per handle (``make(handle, poll_interval)``); their statuses and the wall time.
    Unshared: each trigger polls at a slightly different interval, so none shares a poller."""
    import asyncio

    async def main() -> list[str]:
        return await wait_triggers((make(h, interval if shared else interval * (1 + (i + 1) * 1e-9))
                                    for i, h in enumerate(handles)), on_event)

    t0 = time.time()
    states = asyncio.run(main())
    return states, time.time() - t0


def polling_scenarios(workdir: Path, flavor: str, steps: int, what: str) -> tuple[int, list[dict[str, Any]]]:
    """Run ``benchmarks.bench_<flavor> worker`` for N/10 and N shared and N unshared triggers; the small N and
    the three results, every step of which succeeded."""
    small = max(steps // 10, 1)
    progress(f"{flavor}: {small} and {steps} shared, {steps} unshared triggers ({what})")
    home = workdir / f"airflow-home-{flavor}"
    results = [run_worker(f"benchmarks.bench_{flavor}", ["worker", n, int(shared)], env=airflow_env(home))
               for n, shared in [(small, True), (steps, True), (steps, False)]]
    for res in results:
        if res["states"] != ["succeeded"]:
            raise RuntimeError(f"scenario {res['n']} shared={res['shared']}: states {res['states']}")
    return small, results


def polling_rows(section: Section, steps: int, small: int, results: list[dict[str, Any]], interval: float,
                 status_calls: Callable[[dict[str, Any]], int], *log_rows: tuple[str, str]) -> None:
    """The rows of a shared-polling benchmark: status requests per round (N/10 vs N steps) and in all (shared
    vs unshared), then ``(metric, request kind)`` rows of log reads, then all requests and the wall time."""
    few, many, unshared = results

    def per_round(res: dict[str, Any]) -> float:
        return status_calls(res) / max(res["wall"] / interval, 1)

    growth = ratio(per_round(many), per_round(few))
    section.add(f"status requests per poll interval: {steps} vs {small} steps (shared)", f"{per_round(many):.2f}",
                f"{per_round(few):.2f}", growth, "~1x (not steps)", budget_check(growth, 1.5, at_most=True))
    section.add(f"status requests, {steps} steps: shared vs unshared", f"{status_calls(many):,}",
                f"{status_calls(unshared):,}", ratio(status_calls(many), status_calls(unshared)))
    for metric, kind in log_rows:
        section.add(metric, f"{many['requests'].get(kind, 0):,}", f"{unshared['requests'].get(kind, 0):,}")
    section.add("all API requests (shared vs unshared)", f"{many['total']:,}", f"{unshared['total']:,}",
                ratio(many["total"], unshared["total"]))
    section.add("wall until all complete (shared vs unshared)", fmt_time(many["wall"]), fmt_time(unshared["wall"]),
                ratio(many["wall"], unshared["wall"]))
    section.data = {"scenarios": results, "interval": interval}
