"""What the end-to-end tests of every flavor ask of a running Airflow: TI states, the step task's runner
process and whether the scheduler has settled a deferral."""

from __future__ import annotations

import psutil

TERMINAL_TI_STATES = frozenset({"success", "failed", "upstream_failed", "skipped", "removed"})


def terminal(row: dict) -> bool:
    return row["state"] in TERMINAL_TI_STATES


def deferral_settled(services, dag_id: str, run_id: str, task_id: str, try_number: int) -> bool:
    """The scheduler has processed the executor's "success" of the worker that deferred this try.

    Until then the trigger must not fire: Airflow 3.3's scheduler tolerates that event arriving after the
    trigger put the TI back to ``scheduled``, not after it was ``queued`` again for resuming; then it logs
    "state mismatch" and fails the try without resuming it (seen when a job ended ~1.5 s after deferring).
    Tests hold their step until this is true before letting it end.
    """
    key = f"TaskInstanceKey(dag_id='{dag_id}', task_id='{task_id}', run_id='{run_id}', try_number={try_number},"
    text = services.log_path("scheduler").read_text(errors="replace")
    return any("Received executor event with state success" in line and key in line for line in text.splitlines())


def task_runner_process(ti_row: dict) -> psutil.Process | None:
    """The task runner process of a TI, forked by its supervisor.

    LocalExecutor's worker process runs the supervisor, titled ``airflow worker -- LocalExecutor: <ti
    id>``; the task runner it forks (where ``execute()`` runs) retitles itself ``airflow worker -- <ti id>``.
    """
    ti_id = ti_row["id"].replace("-", "")
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if (cmdline.startswith("airflow worker -- ") and "LocalExecutor" not in cmdline
                and ti_id in cmdline.replace("-", "")):
            found.append(proc)
    assert len(found) <= 1, found
    if found:
        supervisor = " ".join(found[0].parent().cmdline())
        assert supervisor.startswith("airflow worker -- LocalExecutor:"), supervisor
    return found[0] if found else None
