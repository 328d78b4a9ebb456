"""Modal flavor: what deferred steps cost Modal's control plane, against polling through the public API.

A worker process starts the Modal emulator and spawns N step calls through the flavor's hook (deploy once,
``spawn``, record), each sleeping a few seconds. Then, on one event loop as in a triggerer:

- flavor: ``ModalStepOperatorTrigger``s share one poller; each round reads every waiting call's output
  (``FunctionGetOutputs``, timeout 0) and asks its inputs (``FunctionCallGetInfo``) only until the call
  is seen running, and reads new log lines of running calls (``AppGetLogs`` after the last entry id); a
  finished call's result is collected into the artifact store and its record dropped;
- public API (the baseline): each round, per call, ``FunctionCall.get(timeout=0)`` and ``get_call_graph()``
  (to tell queued from running) and ``logs.fetch`` of the new lines: what the public methods make natural.

Modal has no list of calls changed since a time, so status reads grow with the number of steps in both;
the benchmark reports by how much the flavor reduces them, and what the triggerer's process spends.
"""

from __future__ import annotations

import asyncio
import resource
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.common import Section, airflow_env, emit, fmt_time, progress, ratio, run_worker, wait_triggers

INTERVAL = 1.0  # poll interval of the scenario (the flavor's default is 10 s; shorter keeps the run short)
SLEEP = 6.0  # seconds each call runs

STATUS = {"FunctionGetOutputs", "FunctionGetCallGraph", "FunctionCallGetInfo"}
LOGS = {"AppFetchLogs", "AppCountLogs", "AppGetLogs"}


def _sleep(seconds: float) -> str:
    import time

    print("started", flush=True)
    time.sleep(seconds)
    return "done"


def _spawn(n: int, workdir: Path) -> list[dict[str, Any]]:
    from airflow_stepops.artifacts import store_path
    from airflow_stepops.bundle import StepIdentity, build_meta, pickle_payload, write_bundle
    from airflow_stepops.hooks.base import StepSpec
    from airflow_stepops.hooks.modal import ModalStepOperatorHook
    from airflow_stepops.resources import ResourceSettings
    from airflow_stepops.settings.modal import ModalStepOperatorSettings

    hook = ModalStepOperatorHook("md_bench")
    handles = []
    for index in range(n):
        identity = StepIdentity("bench_modal", "run", f"step_{index:05d}", -1, 1)
        prefix = identity.prefix(store_path(f"file://{workdir}/store"))
        spec = StepSpec(identity=identity, bundle_uri=str(prefix / "bundle"), output_uri=str(prefix / "output"),
                        resources=ResourceSettings(), settings=ModalStepOperatorSettings(timeout=600))
        meta = build_meta(identity, multiple_outputs=False, max_result_bytes=10**9, inline_result_max_bytes=48_000,
                          task_label=f"bench_modal.step_{index:05d}")
        write_bundle(store_path(spec.bundle_uri), pickle_payload(_sleep, [SLEEP], {}), meta)
        handles.append(hook.submit(spec))
    return handles


async def _flavor(handles: list[dict[str, Any]]) -> list[str]:
    from airflow_stepops.triggers.modal import ModalStepOperatorTrigger

    return await wait_triggers(ModalStepOperatorTrigger(conn_id="md_bench", handle=h, poll_interval=INTERVAL)
                               for h in handles)


async def _public(handles: list[dict[str, Any]]) -> list[str]:
    from datetime import datetime, timezone

    import modal

    client = modal.Client.from_env()

    async def wait_one(handle: dict[str, Any]) -> str:
        call = modal.FunctionCall.from_id(handle["job_id"], client=client)
        since = datetime.fromtimestamp(handle["spawned_at"] - 60, timezone.utc)
        while True:
            try:
                await call.get.aio(timeout=0)
                return "succeeded"
            except TimeoutError:
                pass
            await call.get_call_graph.aio()
            async for entry in call.logs.fetch.aio(since=since):
                since = max(since, entry.timestamp)
            await asyncio.sleep(INTERVAL)

    return list(await asyncio.gather(*(wait_one(h) for h in handles)))


def worker(n: int, mode: str) -> dict[str, Any]:
    """Run one scenario with its own emulator; return RPC counts, timings and the CPU the waiting took."""
    import json
    import logging
    import os
    import tempfile

    from airflow_stepops.testing.modal import ModalEmulator

    logging.getLogger().setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-modal-") as tmp, ModalEmulator(stop_grace_period=1) as md:
        os.environ.update(md.env())
        os.environ["AIRFLOW_CONN_MODAL_DEFAULT"] = md.airflow_connection()
        os.environ["AIRFLOW_CONN_MD_BENCH"] = json.dumps({"conn_type": "stepops_modal", "extra": {
            "environment": "main", "app_name": "bench"}})
        handles = _spawn(n, Path(tmp))
        from airflow_stepops.artifacts import store_path

        # Airflow discovers its filesystems on the first object-storage write of a process (about 1 s of
        # CPU): paid once per triggerer, so not counted here
        with (store_path(f"file://{tmp}") / "warm").open("wb") as warm:
            warm.write(b"")
        before = len(md.requests)
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.time()
        states = asyncio.run(_flavor(handles) if mode == "flavor" else _public(handles))
        wall = time.time() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        served = md.requests[before:]
    counts = Counter(served)
    return {"n": n, "mode": mode, "wall": wall, "states": sorted(set(states)), "requests": dict(counts),
            "status": sum(v for k, v in counts.items() if k in STATUS),
            "logs": sum(v for k, v in counts.items() if k in LOGS), "total": len(served),
            "cpu_seconds": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)}


def run(workdir: Path, *, steps: int = 20) -> Section:
    """Run the scenarios and build the table."""
    section = Section("modal", f"{steps} deferred Modal steps: control-plane RPCs, flavor vs public API polling")
    progress(f"modal: {steps} calls waited on by the flavor's triggers, then by public-API polling "
             f"(calls run {SLEEP:.0f} s)")
    home = workdir / "airflow-home-modal"
    flavor, public = (run_worker("benchmarks.bench_modal", ["worker", steps, mode], env=airflow_env(home))
                      for mode in ("flavor", "public"))
    for res in (flavor, public):
        if res["states"] != ["succeeded"]:
            raise RuntimeError(f"scenario {res['mode']}: states {res['states']}")

    def per_step_round(res: dict[str, Any], key: str) -> float:
        return res[key] / max(res["wall"] / INTERVAL, 1) / steps

    section.add("status RPCs per step per poll round (flavor vs public API)",
                f"{per_step_round(flavor, 'status'):.2f}", f"{per_step_round(public, 'status'):.2f}",
                ratio(flavor["status"], public["status"]))
    section.add("log RPCs per step per poll round (count, then fetch when there is something)",
                f"{per_step_round(flavor, 'logs'):.2f}", f"{per_step_round(public, 'logs'):.2f}",
                ratio(per_step_round(flavor, "logs"), per_step_round(public, "logs")))
    section.add("all RPCs while waiting", f"{flavor['total']:,}", f"{public['total']:,}",
                ratio(flavor["total"], public["total"]))
    section.add("CPU of the waiting process", fmt_time(flavor["cpu_seconds"]), fmt_time(public["cpu_seconds"]),
                ratio(flavor["cpu_seconds"], public["cpu_seconds"]))
    section.add("wall until all complete", fmt_time(flavor["wall"]), fmt_time(public["wall"]),
                ratio(flavor["wall"], public["wall"]))
    section.notes += [
        f"poll interval {INTERVAL:.0f} s; each call sleeps {SLEEP:.0f} s; RPCs counted by the emulator.",
        "the flavor's waiting also collects each result into the artifact store (the baseline does not).",
        "Modal lists no calls changed since a time, so status reads stay one per waiting call per round "
        "(the flavor asks a call's inputs only until it runs); the DESIGN budget of status calls "
        "growing with backends, not steps, cannot be met on Modal.",
    ]
    section.data = {"scenarios": [flavor, public], "interval": INTERVAL, "sleep": SLEEP}
    return section


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        emit(worker(int(sys.argv[2]), sys.argv[3]))
