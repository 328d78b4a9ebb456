"""The lifecycle promises of the README, written once and run for every flavor through its harness
(tests/e2e/harness.py) under a real scheduler, triggerer, dag-processor and api-server.

Each scenario drives one run per flavor at once (threads: the waits overlap), then asserts per flavor. The
tests observe the remote side directly: the jobs the emulator holds for the task instance and the lines the
steps wrote (one per invocation), not what the operator reports.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil
import pytest

from airflow_stepops.flavors import FLAVORS as REGISTRY

from .dags.conformance_dags import CANCEL_POLL
from .harness import COST_RUN_SECONDS, Harness, harnesses
from .steps import deferral_settled, task_runner_process, terminal

pytestmark = pytest.mark.slow

FLAVORS = tuple(REGISTRY)  # every registered flavor; one without a harness here is skipped
COST_LATE_SECONDS = 5  # how late a max_cost stop may come on a loaded 2-core machine (see docs/limitations.md)
LINES = 40  # remote log lines the results scenario streams while deferred
LATE_EVERY, LATE_SECONDS = 3, 1.0  # every third line reaches the log service a second late, where it can
_WRITES = threading.Lock()  # one API write at a time: SQLite answers concurrent ones "database is locked"


def write(call: Callable[[], Any]) -> Any:
    """An API write, serialised and retried when SQLite was busy (HTTP 500 "Database error")."""
    for attempt in range(5):
        try:
            with _WRITES:
                return call()
        except pytest.fail.Exception as exc:
            if "Database error" not in str(exc) or attempt == 4:
                raise
            time.sleep(1)
    raise AssertionError("unreachable")


@dataclass
class Run:
    """One flavor's run of one scenario: its DAG, the files its steps write, and what the driver saw."""

    h: Harness
    af: Any
    services: Any
    scenario: str
    task_id: str
    folder: Path
    run_id: str = ""
    seen: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None

    @property
    def dag_id(self) -> str:
        return f"conformance_{self.h.flavor}_{self.scenario}"

    @property
    def marker(self) -> Path:
        return self.folder / "marker"

    @property
    def release(self) -> Path:
        return self.folder / "release"

    def trigger(self, run_id: str | None = None, **conf: Any) -> Run:
        conf = {"marker": str(self.marker), "release": str(self.release), "errors": str(self.folder), **conf}
        self.run_id = write(lambda: self.services.trigger(self.dag_id, conf, run_id=run_id))
        threading.Thread(target=self._release_settled, args=(self.run_id,), daemon=True).start()
        return self

    def _release_settled(self, run_id: str, timeout: float = 900) -> None:
        """Create each deferred step's own release file (dags/conformance_dags.py, ``SETTLED``) once the
        scheduler has settled its deferral, until the DAG run ends."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (self.af.dag_run(self.dag_id, run_id) or {}).get("state") in ("success", "failed"):
                return
            for (task_id, map_index), row in self.af.task_instances(self.dag_id, run_id).items():
                release = self.folder / f"settled-{task_id}-{map_index}-{row['try_number']}"
                if row["state"] == "deferred" and not release.exists() and deferral_settled(
                        self.services, self.dag_id, run_id, task_id, row["try_number"], map_index):
                    release.touch()
            time.sleep(0.3)

    def ti(self, task_id: str | None = None, map_index: int = -1) -> dict[str, Any]:
        return self.af.ti(self.dag_id, self.run_id, task_id or self.task_id, map_index)

    def watch(self, until: Callable[[dict[str, Any]], Any], task_id: str | None = None,
              timeout: float = 420) -> dict[str, Any]:
        return self.services.watch_ti(self.dag_id, self.run_id, task_id or self.task_id, until=until, timeout=timeout)

    def log(self, try_number: int = 1, task_id: str | None = None) -> str:
        return self.af.task_log_text(self.dag_id, self.run_id, task_id or self.task_id, try_number)

    def log_entries(self, try_number: int = 1, task_id: str | None = None) -> list[dict[str, Any]]:
        """The structured lines of the task's log (worker and triggerer files)."""
        entries = []
        for line in self.log(try_number, task_id).splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    entries.append(entry)
        return entries

    def jobs(self, task_id: str | None = None) -> list[str]:
        return self.h.jobs(self.af, self.dag_id, self.run_id, task_id or self.task_id)

    def invocations(self) -> list[int]:
        return [int(pid) for pid in self.marker.read_text().split()] if self.marker.exists() else []

    def stored_handle(self) -> dict[str, Any] | None:
        rows = self.af.query("SELECT value FROM task_state_store WHERE dag_id = ? AND run_id = ? AND task_id = ? "
                             "AND map_index = -1 AND key = 'stepops_job'", self.dag_id, self.run_id, self.task_id)
        return json.loads(rows[0]["value"]) if rows else None

    def store_handle(self, handle: dict[str, Any]) -> None:
        """Put ``handle`` in the task state store as the stored job handle of the task instance."""
        with contextlib.closing(sqlite3.connect(self.af.db_path, timeout=60)) as db, db:
            db.execute("UPDATE task_state_store SET value = ? WHERE dag_id = ? AND run_id = ? AND task_id = ? "
                       "AND key = 'stepops_job'", (json.dumps(handle), self.dag_id, self.run_id, self.task_id))

    def forget_handle(self) -> None:
        """What a worker killed between submitting and storing the handle leaves: no stored handle."""
        with contextlib.closing(sqlite3.connect(self.af.db_path, timeout=60)) as db, db:
            db.execute("DELETE FROM task_state_store WHERE dag_id = ? AND run_id = ? AND task_id = ? "
                       "AND key = 'stepops_job'", (self.dag_id, self.run_id, self.task_id))

    def dag_run_over(self, timeout: float = 420) -> str:
        def over() -> str | None:
            self.services.check_alive()
            state = (self.af.dag_run(self.dag_id, self.run_id) or {}).get("state")
            return state if state in ("success", "failed") else None

        return self.af.wait_for(over, timeout=timeout, message=f"{self.dag_id} {self.run_id} to end")

    def check(self) -> None:
        """Fail this flavor's test with what its driver ran into."""
        if self.error is not None:
            raise AssertionError(f"{self.h.flavor}: driving {self.scenario} failed: {self.error!r}") from self.error


@dataclass
class Suite:
    af: Any
    services: Any
    folder: Path
    harnesses: dict[str, Harness]

    def drive(self, scenario: str, task_id: str, driver: Callable[[Run], None],
              variants: tuple[str, ...] = ("",)) -> dict[str, Run]:
        """Run ``driver`` for every flavor (and variant) at once; ``{flavor[/variant]: Run}``."""
        runs = {}
        for flavor, harness in self.harnesses.items():
            for variant in variants:
                key = f"{flavor}/{variant}" if variant else flavor
                folder = self.folder / scenario / key.replace("/", "-")
                folder.mkdir(parents=True)
                runs[key] = Run(harness, self.af, self.services, scenario, task_id, folder, seen={"variant": variant})

        def guarded(run: Run) -> None:
            try:
                driver(run)
            except BaseException as exc:  # pytest.fail raises a BaseException: keep it for the flavor's test
                run.error = exc

        threads = [threading.Thread(target=guarded, args=(run,), daemon=True) for run in runs.values()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return runs

    def run_of(self, runs: dict[str, Run], flavor: str, variant: str = "") -> Run:
        if flavor in self.af.unavailable:
            pytest.fail(f"{flavor}: its emulator could not start: {self.af.unavailable[flavor]}")
        if flavor not in self.harnesses:
            pytest.skip(f"no harness runs the {flavor} flavor here (its extra is not installed, or tests/e2e/harness.py has none)")
        run = runs[f"{flavor}/{variant}" if variant else flavor]
        run.check()
        return run


@pytest.fixture(scope="module")
def suite(airflow_env, airflow_services, tmp_path_factory) -> Suite:
    return Suite(airflow_env, airflow_services, tmp_path_factory.mktemp("conformance"), harnesses(airflow_env))


def flavors(**known: Any) -> list[Any]:
    return [pytest.param(flavor, marks=known[flavor]) if flavor in known else flavor for flavor in FLAVORS]


def held_while_deferred(run: Run, task_id: str) -> Callable[[dict[str, Any]], bool]:
    """Deferred, and the scheduler has settled the deferral (see ``deferral_settled``): safe to let it end."""
    def ready(row: dict[str, Any]) -> bool:
        if terminal(row):
            pytest.fail(f"{task_id} ended before it was deferred: {row['state']}\n{run.log(task_id=task_id)[-3000:]}")
        return row["state"] == "deferred" and deferral_settled(run.services, run.dag_id, run.run_id, task_id, 1)
    return ready


# ---------------------------------------------------------------------------------------------
# results: XCom, ArtifactRef passed on as the value, multiple_outputs, mapping, streamed logs
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def results(suite: Suite) -> dict[str, Run]:
    def drive(run: Run) -> None:
        run.seen["late"] = run.h.late_logs(LATE_EVERY, LATE_SECONDS)  # late, out-of-order arrivals included
        try:
            run.trigger(lines=LINES)
            run.watch(held_while_deferred(run, "produce"), task_id="produce")
            run.release.touch()
            run.seen["state"] = run.dag_run_over()
        finally:
            run.h.late_logs(0, 0)

    return suite.drive("results", "produce", drive)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("flavor", FLAVORS)
def test_results_reach_xcom_and_downstream_steps(suite, results, flavor):
    run = suite.run_of(results, flavor)
    af, dag_id, run_id = run.af, run.dag_id, run.run_id
    failed = [key for key, ti in af.task_instances(dag_id, run_id).items() if ti["state"] != "success"]
    assert run.seen["state"] == "success", {
        key: af.task_log_text(dag_id, run_id, key[0], af.ti(dag_id, run_id, *key)["try_number"], key[1])[-3000:]
        for key in failed}
    # multiple_outputs: one XCom per key; the environment came from the step operator's connection
    produced = af.xcoms(dag_id, run_id, "produce")
    assert produced["answer"] == 42 and produced["env"].startswith("from-"), produced
    assert produced["return_value"] == {"answer": 42, "env": produced["env"]}, produced
    assert [af.xcom(dag_id, run_id, "square", map_index=i) for i in range(2)] == [4, 9]
    # a large non-JSON result stays in the artifact store; the downstream step gets the value itself
    blob = bytes(range(256)) * 400
    ref = af.xcom(dag_id, run_id, "big")
    assert ref["__classname__"].endswith(".ArtifactRef") and ref["__data__"]["type"] == "builtins.bytes", ref
    assert af.xcom(dag_id, run_id, "consume") == {"type": "bytes", "size": len(blob),
                                                  "sha256": hashlib.sha256(blob).hexdigest()}
    # each step ran as one job of the emulator
    for task_id in ("produce", "big", "consume"):
        assert len(run.jobs(task_id)) == 1, (task_id, run.jobs(task_id))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("flavor", FLAVORS)
def test_every_step_records_what_it_cost_and_the_ledger_adds_it_up(suite, results, flavor):
    run = suite.run_of(results, flavor)
    af, dag_id, run_id = run.af, run.dag_id, run.run_id
    billed: dict[str, float] = {}
    for task_id, map_index in af.task_instances(dag_id, run_id):
        summary = af.xcom(dag_id, run_id, task_id, key="stepops_job", map_index=map_index)
        cost, rate = summary["cost"], run.h.price().per_hour
        assert cost["currency"] == "USD" and cost["rate_per_hour"] == pytest.approx(rate), (task_id, cost)
        assert cost["amount"] == pytest.approx(rate * cost["billed_seconds"] / 3600, abs=1e-6), (task_id, cost)
        assert cost["billed_seconds"] >= 1 and summary["cost_url"] == run.h.cost_link, (task_id, summary)
        (charge,) = summary["charges"]  # one attempt of one try
        assert (charge["try"], charge["job_id"], charge["amount"]) == (1, summary["job_id"], cost["amount"]), charge
        billed[task_id] = round(billed.get(task_id, 0.0) + charge["amount"], 9)
    out = subprocess.run([sys.executable, "-m", "airflow_stepops.cli", "cost", "--dag", dag_id, "--by", "task",
                          "--format", "json"], env=af.env, cwd=af.home, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout[out.stdout.index("["):])
    assert {row["task_id"]: row["amount"] for row in rows} == pytest.approx(billed), rows
    assert all(row["currency"] == "USD" and not row["unpriced_attempts"] for row in rows), rows


def _waited_on_the_worker(run: Run, task_id: str, map_index: int = -1) -> None:
    """The try ran and ended in its worker: it never deferred and no trigger ran for it."""
    log = run.af.task_log_text(run.dag_id, run.run_id, task_id, 1, map_index)
    assert "Waiting for job" in log and "on this worker" in log, log[-3000:]
    assert "Pausing task as DEFERRED" not in log and ".log.trigger" not in log, log[-3000:]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("flavor", FLAVORS)
def test_steps_waiting_on_the_worker_give_the_same_results(suite, results, flavor):
    """deferrable=False: the same XComs, multiple_outputs, mapping and ArtifactRef passed on as the value."""
    run = suite.run_of(results, flavor)
    af, dag_id, run_id = run.af, run.dag_id, run.run_id
    waited = [("waited_produce", -1), ("waited_consume", 0), ("waited_consume", 1)]
    states = {key: (af.ti(dag_id, run_id, *key) or {}).get("state") for key in waited}
    assert set(states.values()) == {"success"}, {
        key: af.task_log_text(dag_id, run_id, key[0], 1, key[1])[-3000:] for key, state in states.items()
        if state != "success"}
    for key in waited:
        _waited_on_the_worker(run, *key)
    produced = af.xcoms(dag_id, run_id, "waited_produce")
    assert produced["answer"] == 42 and produced["env"].startswith("from-"), produced  # small JSON, inline
    ref = produced["blob"]  # large, not JSON: an ArtifactRef, handed to the mapped steps as the value itself
    assert ref["__classname__"].endswith(".ArtifactRef") and ref["__data__"]["type"] == "builtins.bytes", ref
    blob = bytes(range(256)) * 400
    expected = {"type": "bytes", "size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    assert [af.xcom(dag_id, run_id, "waited_consume", map_index=i) for i in range(2)] == [
        {"square": 4, **expected}, {"square": 9, **expected}]
    assert len(run.jobs("waited_produce")) == 1, run.jobs("waited_produce")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("flavor", FLAVORS)
def test_remote_lines_stream_while_deferred_none_lost_or_repeated(suite, results, flavor):
    """Late and out-of-order arrivals included, where the service's log pipeline has them."""
    run = suite.run_of(results, flavor)
    log = run.log()
    trigger_part = "".join(part for part in log.split("===== ") if part.startswith("attempt=1.log.trigger"))
    expected = [f"[{flavor}] conformance-line {n:03d}" for n in range(1, LINES + 1)]
    assert [log.count(line) for line in expected] == [1] * LINES, log[-5000:]
    assert all(line in trigger_part for line in expected), trigger_part[-3000:]  # streamed by the triggerer
    if not run.seen["late"]:  # a line that arrives late is shown when it arrives, after later ones
        assert [trigger_part.index(line) for line in expected] == sorted(trigger_part.index(line) for line in expected)


# ---------------------------------------------------------------------------------------------
# the default mode: a step without an explicit deferrable follows [stepops] default_deferrable and
# AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE
# ---------------------------------------------------------------------------------------------
DEFAULTS_DAG = "conformance_default_deferrable"  # one step per flavor (task id: the flavor) + explicit_local
SWITCHES = {"stepops": {"AIRFLOW__STEPOPS__DEFAULT_DEFERRABLE": "False"},
            "operators": {"AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": "false"}}
LOGICAL_DATES = {"stepops": "2026-01-01", "operators": "2026-01-02"}  # tell the runs apart


@dataclass
class SwitchedRun:
    run_id: str
    returncode: int
    output: str

    def task_output(self, task_id: str) -> str:
        """What ``airflow dags test`` printed while it ran this task (it runs them one at a time)."""
        start = self.output.find(f"[DAG TEST] starting task_id={task_id} ")
        end = self.output.find(f"[DAG TEST] end task task_id={task_id} ", start)
        assert start >= 0 and end >= 0, self.output[-5000:]
        return self.output[start:end]


@pytest.fixture(scope="module")
def default_switches(airflow_env) -> dict[str, SwitchedRun]:
    """``airflow dags test`` of the defaults DAG once per switch, with the switch only in its environment.

    The live services share one Airflow configuration and their workers inherit the scheduler's environment,
    so a switch cannot be set for one run there; ``dags test`` runs the same operator code (deciding whether
    to defer in ``execute``) in a process of its own. Airflow itself shows a deferral: it logs "Pausing task
    as DEFERRED" and runs the trigger "in line". One run per switch covers every flavor (its steps run one
    after another) and the two runs overlap.
    """
    found: dict[str, SwitchedRun] = {}

    def run(name: str) -> None:
        result = airflow_env.cli("dags", "test", DEFAULTS_DAG, LOGICAL_DATES[name], timeout=420, check=False,
                                 log_name=f"dags-test-{DEFAULTS_DAG}-{name}", env=SWITCHES[name])
        rows = airflow_env.query("SELECT run_id FROM dag_run WHERE dag_id = ? AND logical_date LIKE ?",
                                 DEFAULTS_DAG, f"{LOGICAL_DATES[name]}%")
        found[name] = SwitchedRun(rows[0]["run_id"] if rows else "", result.returncode, result.stdout)

    threads = [threading.Thread(target=run, args=(name,), daemon=True) for name in SWITCHES]
    for index, thread in enumerate(threads):
        if index:  # each run first writes every DAG of the folder; two first writes collide on dag.dag_id
            airflow_env.wait_for(
                lambda: airflow_env.query("SELECT 1 FROM serialized_dag WHERE dag_id = ?", DEFAULTS_DAG)
                or not threads[0].is_alive(), timeout=300, message=f"{DEFAULTS_DAG} stored by the first run")
        thread.start()
    for thread in threads:
        thread.join()
    return found


@pytest.mark.timeout(900)
@pytest.mark.parametrize("switch", SWITCHES)
@pytest.mark.parametrize("flavor", FLAVORS)
def test_a_step_without_explicit_deferrable_follows_the_default_switches(airflow_env, default_switches, flavor,
                                                                         switch):
    if flavor in airflow_env.unavailable:
        pytest.fail(f"{flavor}: its emulator could not start: {airflow_env.unavailable[flavor]}")
    harness = harnesses(airflow_env).get(flavor)
    if harness is None:
        pytest.skip(f"no harness runs the {flavor} flavor here (its extra is not installed, or tests/e2e/harness.py has none)")
    run = default_switches[switch]
    assert run.returncode == 0 and run.run_id, run.output[-5000:]
    # the control in the same process: a step saying deferrable=True is deferred, as Airflow shows
    explicit = run.task_output("explicit_local")
    assert "Pausing task as DEFERRED" in explicit and "running trigger in line" in explicit, explicit[-3000:]
    output = run.task_output(flavor)
    assert "Pausing task as DEFERRED" not in output and "running trigger in line" not in output, output[-3000:]
    assert "on this worker (deferrable=False)" in output, output[-3000:]
    ti = airflow_env.ti(DEFAULTS_DAG, run.run_id, flavor)
    assert ti["state"] == "success", output[-3000:]
    (job,) = harness.jobs(airflow_env, DEFAULTS_DAG, run.run_id, flavor)
    assert harness.state(airflow_env, job) in ("succeeded", "gone"), harness.state(airflow_env, job)
    assert set(airflow_env.xcom(DEFAULTS_DAG, run.run_id, flavor)) == {"pid"}


# ---------------------------------------------------------------------------------------------
# remote exceptions
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def errors(suite: Suite) -> dict[str, Run]:
    def drive(run: Run) -> None:
        run.trigger()
        run.seen["state"] = run.dag_run_over()

    return suite.drive("errors", "value_error", drive)


def _seen_exception(run: Run, task_id: str) -> dict[str, Any]:
    recorded = run.folder / f"{task_id}.1.json"
    assert run.ti(task_id)["state"] == "failed", run.log(task_id=task_id)[-3000:]
    assert recorded.exists(), f"on_failure_callback did not run\n{run.log(task_id=task_id)[-3000:]}"
    return json.loads(recorded.read_text())


@pytest.mark.timeout(600)
@pytest.mark.parametrize("task_id", ["value_error", "waited_value_error"])  # deferred; deferrable=False
@pytest.mark.parametrize("flavor", FLAVORS)
def test_remote_exception_keeps_its_type_message_and_traceback(suite, errors, flavor, task_id):
    run = suite.run_of(errors, flavor)
    seen = _seen_exception(run, task_id)
    if task_id.startswith("waited_"):
        _waited_on_the_worker(run, task_id)
    assert seen["types"] == ["RemoteStepError", "ValueError"], seen  # `except ValueError` works
    text = seen["text"]
    lines = text.splitlines()  # on several lines, not one repr-quoted line
    assert "ValueError: bad value: first line" in lines[0] and "second line" in lines, text
    assert "Remote traceback:" in lines, text
    assert any(line.strip() == 'raise ValueError("bad value: first line\\nsecond line")'
               for line in text.splitlines()), text


@pytest.mark.timeout(600)
@pytest.mark.parametrize("flavor", FLAVORS)
def test_user_error_worded_like_a_timeout_or_preemption_stays_a_user_error(suite, errors, flavor):
    run = suite.run_of(errors, flavor)
    seen = _seen_exception(run, "worded_error")
    assert seen["types"] == ["RemoteStepError", "RuntimeError"], seen
    assert "timeout: the batch was preempted and its rows evicted" in seen["text"], seen


# ---------------------------------------------------------------------------------------------
# exactly once: a worker killed mid-run, after the job succeeded, before storing the handle
# ---------------------------------------------------------------------------------------------
KILLS = ("mid_run", "after_success", "never_stored")


@pytest.fixture(scope="module")
def kills(suite: Suite) -> dict[str, Run]:
    def drive(run: Run) -> None:
        kind = run.seen["variant"]
        run.trigger()

        def started(row: dict[str, Any]) -> bool:
            if terminal(row):
                pytest.fail(f"the task ended before its worker could be killed: {row['state']}\n{run.log()[-3000:]}")
            return (row["state"] == "running" and row["try_number"] == 1 and bool(run.invocations())
                    and run.stored_handle() is not None)

        row = run.watch(started)
        runner = run.af.wait_for(lambda: task_runner_process(row), timeout=30, message="the task runner process")
        (job,) = run.af.wait_for(run.jobs, timeout=30, message="the job in the emulator")
        run.seen["job"] = job
        if kind != "mid_run":  # frozen: it can neither collect the result nor store anything any more
            runner.send_signal(signal.SIGSTOP)
        if kind == "after_success":
            run.release.touch()
            run.af.wait_for(lambda: run.h.state(run.af, job) == "succeeded", timeout=120, message=f"{job} to succeed")
        if kind == "never_stored":
            run.forget_handle()
            assert run.stored_handle() is None
        runner.send_signal(signal.SIGKILL)
        run.af.wait_for(lambda: run.af.process_gone(runner.pid), timeout=10, message="the task runner to die")
        if kind != "after_success":  # the retry must find the job while it still runs
            assert run.h.state(run.af, job) == "running"

            def retried(row: dict[str, Any]) -> bool:
                return terminal(row) or (row["try_number"] == 2 and "Re-attaching to job" in run.log(2)) or (
                    row["try_number"] == 2 and "Submitted step" in run.log(2))

            run.watch(retried)
            run.release.touch()
        run.seen["final"] = run.watch(terminal)

    return suite.drive("reattach", "once", drive, KILLS)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind", KILLS)
@pytest.mark.parametrize("flavor", FLAVORS)
def test_killed_worker_retry_reattaches_to_the_one_job(suite, kills, flavor, kind):
    run = suite.run_of(kills, flavor, kind)
    job, final, try2 = run.seen["job"], run.seen["final"], run.log(2)
    assert (final["state"], final["try_number"]) == ("success", 2), (final["state"], try2[-5000:])
    assert f"Re-attaching to job {job} of try 1" in try2, try2[-5000:]
    assert "Submitted step" not in try2, try2[-5000:]
    assert run.jobs() == [job]  # one job in the emulator ...
    (pid,) = run.invocations()  # ... and one invocation of the step, whose result is the task's
    assert run.af.xcom(run.dag_id, run.run_id, "once") == {"pid": pid}
    assert run.h.state(run.af, job) == "succeeded"


# ---------------------------------------------------------------------------------------------
# a new run of a finished task is a new job: cleared, or its DAG run re-created under the same run_id
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reruns(suite: Suite) -> dict[str, Run]:
    def drive(run: Run) -> None:
        run.release.touch()
        run_id = f"conformance-rerun-{run.h.flavor}-{run.seen['variant']}-{time.time_ns()}"
        run.trigger(run_id=run_id)
        first = run.watch(terminal)
        assert first["state"] == "success", run.log()[-3000:]
        run.seen["first_jobs"] = run.jobs()
        # as a user clears a finished run: a run the scheduler has not yet marked done may be marked so after
        # the clear, by a scheduler loop that read its task instances before, leaving the cleared one unscheduled
        run.dag_run_over()
        if run.seen["variant"] == "cleared":
            write(lambda: run.services.api("POST", f"/dags/{run.dag_id}/clearTaskInstances", {
                "dry_run": False, "task_ids": [run.task_id], "dag_run_id": run.run_id, "only_failed": False,
                "reset_dag_runs": True}))
            run.seen["final"] = run.watch(lambda row: row["try_number"] == 2 and terminal(row))
        else:  # a running DAG run cannot be deleted; nor one whose task's executor event is still on its way:
            # its key (dag, task, run id, try) is the re-created run's task's, whose try Airflow would then fail
            run.af.wait_for(lambda: run.services.executor_event_seen(run.dag_id, run.run_id, run.task_id),
                            timeout=60, message="the scheduler to receive the first task's executor event")
            write(lambda: run.services.api("DELETE", f"/dags/{run.dag_id}/dagRuns/{run.run_id}", expect=(204,)))
            run.trigger(run_id=run_id)
            run.seen["final"] = run.watch(terminal)

    return suite.drive("reattach", "once", drive, ("cleared", "recreated"))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("flavor", FLAVORS)
def test_clearing_a_successful_task_runs_it_again(suite, reruns, flavor):
    run = suite.run_of(reruns, flavor, "cleared")
    assert (run.seen["final"]["state"], run.seen["final"]["try_number"]) == ("success", 2), run.log(2)[-3000:]
    assert "Submitted step" in run.log(2) and "Re-attaching" not in run.log(2), run.log(2)[-3000:]
    assert len(run.invocations()) == 2
    jobs = run.jobs()
    assert len(jobs) == 2 and jobs[0] in run.seen["first_jobs"], jobs
    assert run.af.xcom(run.dag_id, run.run_id, "once") == {"pid": run.invocations()[1]}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("flavor", FLAVORS)
def test_recreated_run_with_the_same_run_id_gets_a_new_job(suite, reruns, flavor):
    run = suite.run_of(reruns, flavor, "recreated")
    assert run.seen["final"]["state"] == "success", run.log()[-3000:]
    assert len(run.invocations()) == 2, "the re-created run re-used the deleted run's job"
    assert len(run.jobs()) == 2, run.jobs()


# ---------------------------------------------------------------------------------------------
# stopping: marked failed while deferred; Airflow's trigger timeout when no triggerer runs the trigger
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cancels(suite: Suite) -> dict[str, Run]:
    def drive(run: Run) -> None:
        run.trigger()
        line = f"[{run.h.flavor}] conformance-begin"

        def trigger_running(row: dict[str, Any]) -> bool:
            if terminal(row):
                pytest.fail(f"the step ended before it could be marked failed: {row['state']}\n{run.log()[-3000:]}")
            if row["state"] != "deferred" or row["trigger_id"] is None or not run.invocations():
                return False
            claimed = run.af.query('SELECT triggerer_id FROM "trigger" WHERE id = ?', row["trigger_id"])
            return bool(claimed and claimed[0]["triggerer_id"] is not None and line in run.log())

        run.watch(trigger_running)
        (job,) = run.jobs()
        (pid,) = run.invocations()
        run.seen.update(job=job, pid=pid, alive=not run.af.process_gone(pid))
        response = write(lambda: run.services.mark_ti(run.dag_id, run.run_id, run.task_id, "failed"))
        assert [ti["state"] for ti in response["task_instances"]] == ["failed"], response

        def stopped() -> bool:
            return run.h.state(run.af, job) in ("cancelled", "gone") and run.af.process_gone(pid)

        # without the trigger's cleanup the step would sleep on for 10 minutes
        run.af.wait_for(stopped, timeout=60, interval=0.1, message=lambda: f"{job} to be stopped\n{run.log()[-3000:]}")
        run.seen["timed"] = run.watch(terminal, task_id="timed")
        run.seen["unserved"] = run.watch(terminal, task_id="unserved")

    return suite.drive("cancel", "forever", drive)


@pytest.fixture(scope="module")
def costs(suite: Suite) -> dict[str, Run]:
    def drive(run: Run) -> None:
        run.trigger()
        run.seen["over_budget"] = run.watch(terminal)

    return suite.drive("cost", "over_budget", drive)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("flavor", FLAVORS)
def test_mark_failed_while_deferred_stops_the_job(suite, cancels, flavor):
    run = suite.run_of(cancels, flavor)
    assert run.seen["alive"]
    assert run.ti()["state"] == "failed"
    assert "Task killed while deferred: stopping remote job" in run.log(), run.log()[-3000:]
    assert run.jobs() in ([run.seen["job"]], []), run.jobs()  # never a second job
    # the stop goes out within 2 poll intervals of Airflow recording the state (both times from the services'
    # own records, so a slow API write queue under load does not count)
    marked = datetime.fromisoformat(run.ti()["end_date"]).replace(tzinfo=timezone.utc)
    requested = [datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")) for entry in run.log_entries()
                 if entry.get("event", "").startswith("Stop of remote job")]
    assert requested, run.log()[-3000:]
    assert (requested[0] - marked).total_seconds() <= 2 * CANCEL_POLL, (marked, requested)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("flavor", FLAVORS)
def test_airflow_trigger_timeout_stops_the_job_and_raises_step_timeout_error(suite, cancels, flavor):
    """No triggerer serves the step's queue: the trigger that enforces its execution_timeout never runs, and
    Airflow's own trigger timeout (the operator's backstop) fails the task; the operator stops the job then."""
    run = suite.run_of(cancels, flavor)
    log = run.log(task_id="unserved")
    assert "Pausing task as DEFERRED" in log, log[-3000:]
    assert ".log.trigger" not in log, log[-3000:]  # no trigger ran: the backstop fired, not the trigger's deadline
    assert run.seen["unserved"]["state"] == "failed", log[-3000:]
    seen = _seen_exception(run, "unserved")
    assert seen["types"] == ["StepTimeoutError"], seen
    assert "trigger timeout passed" in seen["text"] and "was stopped" in seen["text"], seen
    (job,) = re.findall(r"Submitted step \S+ to \w+ step operator '[^']+' as job (\S+?)\"", log)
    assert run.jobs("unserved") in ([job], []), run.jobs("unserved")  # never a second job; a deleted one is gone
    assert run.h.state(run.af, job) in ("cancelled", "gone"), (job, run.h.state(run.af, job), log[-3000:])
    pid_file = run.folder / "unserved.pid"
    assert pid_file.exists(), f"the step never ran\n{log[-3000:]}"
    pid = int(pid_file.read_text())
    run.af.wait_for(lambda: run.af.process_gone(pid), timeout=30, message=f"{flavor}: the unserved step to stop")


# ---------------------------------------------------------------------------------------------
# preemption: new jobs within the try, resuming from the checkpoint, on-demand at the end of the budget
# ---------------------------------------------------------------------------------------------
def preempt_each(run: Run, times: int) -> None:
    """Preempt the task's jobs as they checkpoint, ``times`` of them (noting whether each was asked for on-demand
    capacity: a preempted Kubernetes Job is deleted), then wait for the task to end."""
    checkpointed = Path(f"{run.marker}.checkpointed")
    preempted: list[str] = run.seen.setdefault("preempted", [])
    for number in range(1, times + 1):
        def ready(row: dict[str, Any], n: int = number) -> bool:  # attempt n's deferral (the n-th) settled
            done = len(checkpointed.read_text().split()) if checkpointed.exists() else 0
            return terminal(row) or (done >= n and any(job not in preempted for job in run.jobs()) and deferral_settled(
                run.services, run.dag_id, run.run_id, run.task_id, 1, deferrals=n))

        run.watch(ready)
        job = next(job for job in run.jobs() if job not in preempted)
        run.seen.setdefault("on_demand", []).append(run.h.on_demand(run.af, job))
        preempted.append(job)
        run.h.preempt(run.af, job)
    run.seen["final"] = run.watch(terminal)


def preempted_twice(suite: Suite, scenario: str, task_id: str) -> dict[str, Run]:
    """Run ``scenario`` on every flavor with preemption, its task's first two jobs preempted."""
    def drive(run: Run) -> None:
        if run.h.preemptible is not None:
            preempt_each(run.trigger(), 2)

    return suite.drive(scenario, task_id, drive)


@pytest.fixture(scope="module")
def preemptions(suite: Suite) -> dict[str, Run]:
    return preempted_twice(suite, "preempt", "resume")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("flavor", [f for f in flavors() if f != "local"])  # a local process is never preempted
def test_preempted_twice_then_succeeds_within_one_try_from_its_checkpoint_on_demand_at_last(suite, preemptions,
                                                                                             flavor):
    run = suite.run_of(preemptions, flavor)
    final = run.seen["final"]
    assert (final["state"], final["try_number"]) == ("success", 1), run.log()[-4000:]
    pids = run.invocations()
    assert len(pids) == 3, pids  # three jobs of one try: the preempted two and the one that finished
    assert run.af.xcom(run.dag_id, run.run_id, "resume") == {"restored": {"pids": pids[:2]}}
    summary = run.af.xcom(run.dag_id, run.run_id, "resume", key="stepops_job")
    last = summary["job_id"]
    assert len({*run.seen["preempted"], last}) == 3 and set(run.jobs()) <= {*run.seen["preempted"], last}, run.jobs()
    assert summary["attempt"] == 3 and summary["on_demand"] is True, summary
    assert [(a["attempt"], a["outcome"], a["on_demand"]) for a in summary["attempts"]] == [
        (1, "preempted", False), (2, "preempted", False)], summary["attempts"]
    assert all(a["lost_seconds"] is not None and a["lost_seconds"] >= 0 for a in summary["attempts"])
    assert [*run.seen["on_demand"], run.h.on_demand(run.af, last)] == [False, False, True]  # what the service
    # was asked for: spot, spot, then on-demand for the budget's last attempt
    assert "of the preemption budget (preemption_retries=2) follows as a new job" in run.log(), run.log()[-3000:]


@pytest.fixture(scope="module")
def budgets(suite: Suite) -> dict[str, Run]:
    return preempted_twice(suite, "budget", "exhausted")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("flavor", [f for f in flavors() if f != "local"])
def test_a_spent_preemption_budget_raises_step_preempted_error_in_the_first_try(suite, budgets, flavor):
    run = suite.run_of(budgets, flavor)
    assert (run.seen["final"]["state"], run.seen["final"]["try_number"]) == ("failed", 1), run.log()[-4000:]
    seen = json.loads((run.folder / "exhausted.1.json").read_text())
    assert seen["types"] == ["StepPreemptedError"] and "preemption_retries=1" in seen["text"], seen
    assert set(run.jobs()) <= set(run.seen["preempted"]) and len(run.invocations()) == 2, run.jobs()  # no third
    assert run.seen["on_demand"] == [False, False]  # on_preemption="retry"


@pytest.fixture(scope="module")
def betweens(suite: Suite) -> dict[str, Run]:
    """A worker killed between storing attempt 2 and storing its job: the stored record says only which attempt
    was on its way (the runner is stopped once the job exists, and the record put back to that moment)."""
    def drive(run: Run) -> None:
        if run.h.preemptible is None:
            return
        run.trigger()
        started = run.watch(lambda row: terminal(row) or (row["state"] == "running" and len(run.jobs()) == 1
                                                          and bool(run.invocations())))
        first = run.jobs()[0]
        run.h.preempt(run.af, first)
        second = run.af.wait_for(lambda: len(run.invocations()) == 2 and next(
            (job for job in run.jobs() if job != first), None), timeout=180, message="attempt 2's job to start")
        runner = run.af.wait_for(lambda: task_runner_process(started), timeout=30, message="the task runner")
        runner.send_signal(signal.SIGSTOP)
        handle = run.af.wait_for(lambda: (h := run.stored_handle()) and h.get("attempt") == 2 and h, timeout=30,
                                 message="attempt 2 to be stored")
        run.store_handle({**{k: v for k, v in handle.items() if k != "job_id"}, "pending": True})
        runner.send_signal(signal.SIGKILL)
        run.seen["jobs"] = [first, second]  # a preempted Kubernetes Job is deleted: the jobs seen
        run.watch(lambda row: terminal(row) or (row["try_number"] == 2 and "Re-attaching to job" in run.log(2)))
        run.release.touch()
        run.seen["final"] = run.watch(terminal)

    return suite.drive("between", "attempts", drive)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("flavor", [f for f in flavors() if f != "local"])
def test_a_worker_killed_between_attempts_leaves_one_live_job(suite, betweens, flavor):
    run = suite.run_of(betweens, flavor)
    first, second = run.seen["jobs"]
    final, try2 = run.seen["final"], run.log(2)
    assert (final["state"], final["try_number"]) == ("success", 2), try2[-5000:]
    assert f"Re-attaching to job {second} of try 1" in try2 and "Submitted step" not in try2, try2[-5000:]
    assert set(run.jobs()) <= {first, second} and second in run.jobs()  # no job of try 2
    assert run.af.xcom(run.dag_id, run.run_id, "attempts") == {"pid": run.invocations()[1]}


# ---------------------------------------------------------------------------------------------
# failover: a list of step operators; capacity failures move on, the step's own errors do not
# ---------------------------------------------------------------------------------------------
def failover(suite: Suite, scenario: str, task_id: str, prepare: Callable[[Run], None]) -> dict[str, Run]:
    def drive(run: Run) -> None:
        if run.h.short_of_capacity is None:
            return
        prepare(run)
        run.trigger()
        run.seen["final"] = run.watch(terminal)

    return suite.drive(scenario, task_id, drive)


@pytest.fixture(scope="module")
def moves(suite: Suite) -> dict[str, Run]:
    return failover(suite, "failover_moved", "moved", lambda run: run.h.deny_capacity(run.dag_id))


@pytest.fixture(scope="module")
def queues(suite: Suite) -> dict[str, Run]:
    return failover(suite, "failover_queued", "moved", lambda run: run.h.hold_queued())


def _moved_on(run: Run, outcomes: set[str]) -> dict[str, Any]:
    assert run.seen["final"]["state"] == "success", run.log()[-4000:]
    summary = run.af.xcom(run.dag_id, run.run_id, "moved", key="stepops_job")
    assert (summary["step_operator"], summary["flavor"], summary["attempt"]) == ("e2e_step_operator", "local", 2)
    (passed,) = summary["attempts"]
    assert (passed["step_operator"], passed["flavor"]) == (run.h.conn_id, run.h.flavor), passed
    assert passed["outcome"] in outcomes, passed
    assert run.af.xcom(run.dag_id, run.run_id, "moved")["flavor"] == "local"
    assert all(run.h.state(run.af, job) != "running" for job in run.jobs()), run.jobs()  # nothing left behind
    return passed


@pytest.mark.timeout(900)
@pytest.mark.parametrize("flavor", [f for f in flavors() if f != "local"])
def test_a_capacity_failure_on_the_first_step_operator_runs_the_step_on_the_next(suite, moves, flavor):
    run = suite.run_of(moves, flavor)
    _moved_on(run, {"insufficient_capacity", "stockout", "quota_exceeded", "unschedulable", "queue_timeout"})
    assert re.search(r"moving on to (step operator )?'e2e_step_operator'", run.log()), run.log()[-3000:]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("flavor", [f for f in flavors() if f != "local"])
def test_a_job_queued_past_max_queue_seconds_moves_on_to_the_next_step_operator(suite, queues, flavor):
    run = suite.run_of(queues, flavor)
    assert _moved_on(run, {"queue_timeout", "unschedulable"})["lost_seconds"] >= 4
    assert len(run.jobs()) <= 1  # the queued job, stopped (a stopped Kubernetes Job is deleted)


@pytest.fixture(scope="module")
def owns(suite: Suite) -> dict[str, Run]:
    return failover(suite, "failover_owned", "raises", lambda run: None)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("flavor", [f for f in flavors() if f != "local"])
def test_the_steps_own_error_on_the_first_step_operator_does_not_fail_over(suite, owns, flavor):
    run = suite.run_of(owns, flavor)
    assert run.seen["final"]["state"] == "failed", run.log()[-4000:]
    seen = json.loads((run.folder / "raises.1.json").read_text())
    assert "ValueError" in seen["types"] and "bad input on the first step operator" in seen["text"], seen
    assert len(run.invocations()) == 1 and len(run.jobs()) <= 1, (run.invocations(), run.jobs())
    assert not suite.harnesses["local"].jobs(run.af, run.dag_id, run.run_id, "raises")  # never on the next one


@pytest.mark.timeout(600)
@pytest.mark.parametrize("flavor", FLAVORS)
def test_a_step_whose_accrued_cost_reaches_max_cost_is_stopped_with_step_cost_limit_error(suite, costs, flavor):
    run = suite.run_of(costs, flavor)
    final, log = run.seen["over_budget"], run.log(task_id="over_budget")
    assert (final["state"], final["try_number"]) == ("failed", 1), log[-3000:]
    seen = _seen_exception(run, "over_budget")
    assert "StepCostLimitError" in seen["types"] and "max_cost" in seen["text"], seen
    jobs = run.jobs("over_budget")  # one job, stopped (a stopped Kubernetes Job is deleted)
    assert len(jobs) <= 1 and all(run.h.state(run.af, job) in ("cancelled", "gone", "failed") for job in jobs), jobs
    pid = int((run.folder / "over_budget.pid").read_text())
    run.af.wait_for(lambda: run.af.process_gone(pid), timeout=30, message=f"{flavor}: the step over budget to stop")
    summary = run.af.xcom(run.dag_id, run.run_id, "over_budget", key="stepops_job")
    limit, cost = run.h.max_cost(COST_RUN_SECONDS), summary["cost"]
    # the trigger learns of the start at a poll: under load the stop may come a few seconds past the limit
    late = cost["rate_per_hour"] * COST_LATE_SECONDS / 3600
    assert 0 < cost["amount"] <= limit + late and cost["billed_seconds"] > 0, (limit, summary)
    assert cost["amount"] == pytest.approx(cost["rate_per_hour"] * cost["billed_seconds"] / 3600, abs=1e-6), cost


@pytest.mark.timeout(600)
@pytest.mark.parametrize("flavor", FLAVORS)
def test_execution_timeout_while_deferred_stops_the_job_and_raises_step_timeout_error(suite, cancels, flavor):
    run = suite.run_of(cancels, flavor)
    assert run.seen["timed"]["state"] == "failed", run.log(task_id="timed")[-3000:]
    seen = _seen_exception(run, "timed")
    assert seen["types"] == ["StepTimeoutError"], seen
    jobs = run.jobs("timed")  # a stopped Kubernetes Job is deleted
    assert len(jobs) <= 1 and all(run.h.state(run.af, job) in ("cancelled", "gone", "failed") for job in jobs), jobs
    pid = int((run.folder / "timed.pid").read_text())
    run.af.wait_for(lambda: run.af.process_gone(pid), timeout=30, message=f"{flavor}: the timed-out step to stop")


@pytest.mark.timeout(120)
def test_services_listen_on_loopback_only(airflow_env, airflow_services):
    pids = {proc.pid for proc in airflow_services.process_tree()}
    listening = [conn for conn in psutil.net_connections(kind="inet")
                 if conn.pid in pids and conn.status == psutil.CONN_LISTEN]
    assert airflow_env.api_port in {conn.laddr.port for conn in listening}, listening
    assert all(conn.laddr.ip in ("127.0.0.1", "::1") for conn in listening), listening
