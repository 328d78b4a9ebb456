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
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from .harness import Harness, harnesses
from .steps import deferral_settled, task_runner_process, terminal

pytestmark = pytest.mark.slow

FLAVORS = ("local", "kubernetes", "sagemaker", "vertex", "azureml", "modal")
LINES = 40  # remote log lines the results scenario streams while deferred
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
        return self

    def ti(self, task_id: str | None = None, map_index: int = -1) -> dict[str, Any]:
        return self.af.ti(self.dag_id, self.run_id, task_id or self.task_id, map_index)

    def watch(self, until: Callable[[dict[str, Any]], Any], task_id: str | None = None,
              timeout: float = 420) -> dict[str, Any]:
        return self.services.watch_ti(self.dag_id, self.run_id, task_id or self.task_id, until=until, timeout=timeout)

    def log(self, try_number: int = 1, task_id: str | None = None) -> str:
        return self.af.task_log_text(self.dag_id, self.run_id, task_id or self.task_id, try_number)

    def jobs(self, task_id: str | None = None) -> list[str]:
        return self.h.jobs(self.af, self.dag_id, self.run_id, task_id or self.task_id)

    def invocations(self) -> list[int]:
        return [int(pid) for pid in self.marker.read_text().split()] if self.marker.exists() else []

    def stored_handle(self) -> dict[str, Any] | None:
        rows = self.af.query("SELECT value FROM task_state_store WHERE dag_id = ? AND run_id = ? AND task_id = ? "
                             "AND map_index = -1 AND key = 'stepops_job'", self.dag_id, self.run_id, self.task_id)
        return json.loads(rows[0]["value"]) if rows else None

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
            pytest.skip(f"the {flavor} extra is not installed in this environment")
        run = runs[f"{flavor}/{variant}" if variant else flavor]
        run.check()
        return run


@pytest.fixture(scope="module")
def suite(airflow_env, airflow_services, tmp_path_factory) -> Suite:
    return Suite(airflow_env, airflow_services, tmp_path_factory.mktemp("conformance"), harnesses(airflow_env))


def xfail(reason: str, *flavors: str) -> dict[str, Any]:
    """``{flavor: xfail mark}`` for known defects, to spread into a flavor parametrisation."""
    return {flavor: pytest.mark.xfail(strict=True, reason=reason) for flavor in flavors}


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
        run.trigger(lines=LINES)
        run.watch(held_while_deferred(run, "produce"), task_id="produce")
        run.release.touch()
        run.seen["state"] = run.dag_run_over()

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
def test_remote_lines_stream_while_deferred_none_lost_or_repeated(suite, results, flavor):
    run = suite.run_of(results, flavor)
    log = run.log()
    trigger_part = "".join(part for part in log.split("===== ") if part.startswith("attempt=1.log.trigger"))
    expected = [f"[{flavor}] conformance-line {n:03d}" for n in range(1, LINES + 1)]
    assert [log.count(line) for line in expected] == [1] * LINES, log[-5000:]
    assert all(line in trigger_part for line in expected), trigger_part[-3000:]  # streamed by the triggerer
    assert [trigger_part.index(line) for line in expected] == sorted(trigger_part.index(line) for line in expected)


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
@pytest.mark.parametrize("flavor", FLAVORS)
def test_remote_exception_keeps_its_type_message_and_traceback(suite, errors, flavor):
    run = suite.run_of(errors, flavor)
    seen = _seen_exception(run, "value_error")
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
# stopping: marked failed while deferred
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

    return suite.drive("cancel", "forever", drive)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("flavor", FLAVORS)
def test_mark_failed_while_deferred_stops_the_job(suite, cancels, flavor):
    run = suite.run_of(cancels, flavor)
    assert run.seen["alive"]
    assert run.ti()["state"] == "failed"
    assert "Task killed while deferred: stopping remote job" in run.log(), run.log()[-3000:]
    assert run.jobs() in ([run.seen["job"]], []), run.jobs()  # never a second job


# ---------------------------------------------------------------------------------------------
# preemption: StepPreemptedError, and the retry sees what the preempted try checkpointed
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def preemptions(suite: Suite) -> dict[str, Run]:
    def drive(run: Run) -> None:
        if run.h.preemptible is None:
            return
        run.trigger()
        line = f"[{run.h.flavor}] conformance-checkpointed"
        run.watch(lambda row: terminal(row) or line in run.log())
        (job,) = run.jobs()
        run.seen["job"] = job
        run.h.preempt(run.af, job)
        # the retry finds its checkpoint and returns at once: hold it until its deferral is settled (a job that
        # ends ~1 s after deferring, as on the Kubernetes emulator, hits the race deferral_settled describes)
        run.watch(lambda row: terminal(row) or (row["try_number"] == 2 and row["state"] == "deferred" and
                  deferral_settled(run.services, run.dag_id, run.run_id, run.task_id, 2)))
        run.release.touch()
        run.seen["final"] = run.watch(lambda row: row["try_number"] == 2 and terminal(row))

    return suite.drive("preempt", "resume", drive)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("flavor", [f for f in flavors() if f != "local"])  # a local process is never preempted
def test_preempted_step_raises_step_preempted_error_and_the_retry_sees_its_checkpoint(suite, preemptions, flavor):
    run = suite.run_of(preemptions, flavor)
    final = run.seen["final"]
    assert final["state"] == "success", run.log(1)[-3000:] + run.log(2)[-3000:]
    first = json.loads((run.folder / "resume.1.json").read_text())
    assert first["types"] == ["StepPreemptedError"], first
    pids = run.invocations()
    assert len(pids) == 2, pids  # try 1's job, then try 2's: a new job, not the preempted one again
    assert run.af.xcom(run.dag_id, run.run_id, "resume") == {"restored": {"pid": pids[0]}}
    jobs = run.jobs()
    assert len(jobs) == 2 and jobs[0] == run.seen["job"], jobs


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
