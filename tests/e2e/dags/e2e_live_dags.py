"""DAGs the end-to-end tests run through a real scheduler, triggerer and api-server.

Every step writes what the tests need to check into files named by the DAG run's conf (a marker
file with one line per invocation of the step, a pid file), so the tests observe the remote side
directly instead of trusting what the operator reports.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import dag, task

from airflow_stepops.settings.local import LocalStepOperatorSettings

#: registered by tests/e2e/conftest.py with extras {"environment": {"E2E_FROM_CONN": ...}}
E2E_STEP_OPERATOR = "e2e_step_operator"


@dag(dag_id="stepops_e2e_deferred", schedule=None, catchup=False, tags=["stepops-e2e"])
def stepops_e2e_deferred():
    # deferrable is left at its default (True): the wait happens in the triggerer
    @task.step_operator(step_operator=E2E_STEP_OPERATOR, poll_interval=0.5)
    def deferred_step(seconds, run_id=None):
        import os
        import time

        print(f"e2e-remote-line begin run_id={run_id} pid={os.getpid()}", flush=True)
        time.sleep(float(seconds))
        print(f"e2e-remote-line end env={os.environ.get('E2E_FROM_CONN')}", flush=True)
        return {"answer": 6 * 7, "run_id": run_id, "env": os.environ.get("E2E_FROM_CONN")}

    deferred_step(seconds="{{ dag_run.conf.get('seconds', 6) }}")


@dag(dag_id="stepops_e2e_reattach", schedule=None, catchup=False, tags=["stepops-e2e"])
def stepops_e2e_reattach():
    @task.step_operator(
        step_operator="local_step_operator",
        deferrable=False,  # waits on the worker: the test SIGKILLs that worker's task process
        poll_interval=0.5,
        retries=1,
        retry_delay=timedelta(seconds=2),
    )
    def slow_step(marker, seconds):
        import os
        import time

        with open(marker, "a", encoding="utf-8") as fh:  # one line per invocation of the step
            fh.write(f"{os.getpid()}\n")
        print(f"e2e-slow-step started pid={os.getpid()}", flush=True)
        time.sleep(float(seconds))
        return {"value": "survived-worker-kill", "pid": os.getpid()}

    slow_step("{{ dag_run.conf['marker'] }}", "{{ dag_run.conf.get('seconds', 15) }}")


@dag(dag_id="stepops_e2e_cancel", schedule=None, catchup=False, tags=["stepops-e2e"])
def stepops_e2e_cancel():
    @task.step_operator(
        step_operator="local_step_operator",
        poll_interval=0.5,
        settings={"step_operator.local": LocalStepOperatorSettings(cancel_grace_period_seconds=2)},
    )
    def long_step(pid_file, ignore_sigterm):
        import os
        import signal
        import time

        if ignore_sigterm == "yes":  # makes the launcher escalate to SIGKILL after the grace period
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with open(pid_file + ".tmp", "w", encoding="utf-8") as fh:
            fh.write(str(os.getpid()))
        os.replace(pid_file + ".tmp", pid_file)
        print(f"e2e-long-step running pid={os.getpid()}", flush=True)
        time.sleep(300)
        return "should never get here"

    long_step(pid_file="{{ dag_run.conf['pid_file'] }}",
              ignore_sigterm="{{ dag_run.conf.get('ignore_sigterm', 'no') }}")


stepops_e2e_deferred()
stepops_e2e_reattach()
stepops_e2e_cancel()
