"""What the end-to-end tests of every flavor ask of a running Airflow: TI states, the step task's runner
process and whether the scheduler has settled a deferral."""

from __future__ import annotations

import psutil

TERMINAL_TI_STATES = frozenset({"success", "failed", "upstream_failed", "skipped", "removed"})


def terminal(row: dict) -> bool:
    return row["state"] in TERMINAL_TI_STATES


def deferral_settled(services, dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int = -1,
                     deferrals: int = 1) -> bool:
    """The scheduler has processed the executor's "success" of the worker that deferred this try.

    Until then the trigger must not fire: Airflow 3.3's scheduler fails the try ("state mismatch") when that
    event arrives after the trigger fired and the TI was queued again for resuming (seen when a job ended
    ~1.5 s after deferring; apache/airflow#66374, #71580, #72716). Tests hold their steps until this is
    true before letting them end (``Run.trigger`` releases every deferred step of a run once it is).
    """
    return services.executor_event_seen(dag_id, run_id, task_id, try_number, map_index, times=deferrals)


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
