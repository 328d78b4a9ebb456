"""Step tasks on the ``modal`` flavor, against the session's Modal emulator.

``md_step_operator`` is registered by tests/e2e/conftest.py (when the modal client and the modal provider are
installed) with the Modal environment ``main``, the app name prefix ``stepops-e2e`` and the environment
``{"E2E_FROM_CONN": "from-md-connection"}``; its modal connection ``modal_default`` (the emulator's token) is
kept only in the metadata DB. Each step try is one call, with ``spawn``, of the ``run_step`` function of an app
deployed once per set of function options. Calls run on this host as processes of the test session: the steps
write what the tests check into files named by the DAG run's conf, and where a test must act while they run
they wait until it creates the file the conf names (at most ``WAIT_SECONDS``).
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import dag, task

from airflow_stepops.settings.modal import ModalStepOperatorSettings

#: registered by tests/e2e/conftest.py
MD_STEP_OPERATOR = "md_step_operator"
#: the longest a step waits for its test's go-ahead file
WAIT_SECONDS = 120
#: the hook's floor (ModalStepOperatorHook.min_poll_interval)
POLL_SECONDS = 1.0


@dag(dag_id="stepops_e2e_md_pipeline", schedule=None, catchup=False, tags=["stepops-e2e"])
def stepops_e2e_md_pipeline():
    """``airflow dags test``: an upstream XCom into a Modal call, its result into a normal task."""

    @task
    def md_numbers():
        return [3, 4, 5]

    # options of its own: the function of app stepops-e2e-<digest> has them (the tests read its definition)
    @task.step_operator(step_operator=MD_STEP_OPERATOR, poll_interval=POLL_SECONDS, settings={
        "step_operator.modal": ModalStepOperatorSettings(cpu=1.0, memory=512, timeout=300)})
    def md_sum_squares(values, run_id=None):
        import os

        total = sum(v * v for v in values)
        print(f"e2e-md-step values={values} total={total} flavor={os.environ.get('STEPOPS_FLAVOR')} "
              f"task={os.environ.get('MODAL_TASK_ID')}", flush=True)
        return {"total": total, "run_id": run_id, "env": os.environ.get("E2E_FROM_CONN"),
                "task": os.environ.get("MODAL_TASK_ID"), "modal_environment": os.environ.get("MODAL_ENVIRONMENT")}

    @task
    def md_report(result):
        return f"total={result['total']} env={result['env']}"

    md_report(md_sum_squares(md_numbers()))


@dag(dag_id="stepops_e2e_md_deferred", schedule=None, catchup=False, tags=["stepops-e2e"])
def stepops_e2e_md_deferred():
    # deferrable is left at its default (True): the wait happens in the triggerer
    @task.step_operator(step_operator=MD_STEP_OPERATOR, poll_interval=POLL_SECONDS)
    def md_deferred_step(release, run_id=None):
        import os
        import time

        print(f"e2e-md-remote-line begin run_id={run_id}", flush=True)
        deadline = time.monotonic() + WAIT_SECONDS  # until the test has seen this line in the task log
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.05)
        print(f"e2e-md-remote-line end env={os.environ.get('E2E_FROM_CONN')}", flush=True)
        return {"answer": 6 * 7, "run_id": run_id, "env": os.environ.get("E2E_FROM_CONN")}

    md_deferred_step(release="{{ dag_run.conf['release'] }}")


@dag(dag_id="stepops_e2e_md_reattach", schedule=None, catchup=False, tags=["stepops-e2e"])
def stepops_e2e_md_reattach():
    @task.step_operator(
        step_operator=MD_STEP_OPERATOR,
        deferrable=False,  # waits on the worker: the test SIGKILLs that worker's task process
        poll_interval=POLL_SECONDS,
        retries=1,
        retry_delay=timedelta(seconds=1),
        # an app of its own (other options): the tests count the calls of its function
        settings={"step_operator.modal": ModalStepOperatorSettings(timeout=600)},
    )
    def md_slow_step(marker, release):
        import os
        import time

        with open(marker, "a", encoding="utf-8") as fh:  # one line per invocation of the step
            fh.write(f"{os.getpid()} {os.environ.get('MODAL_TASK_ID')}\n")
        print(f"e2e-md-slow-step started pid={os.getpid()}", flush=True)
        deadline = time.monotonic() + WAIT_SECONDS  # until the retry has re-attached
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.05)
        return {"value": "survived-worker-kill", "pid": os.getpid()}

    md_slow_step("{{ dag_run.conf['marker'] }}", "{{ dag_run.conf['release'] }}")


@dag(dag_id="stepops_e2e_md_cancel", schedule=None, catchup=False, tags=["stepops-e2e"])
def stepops_e2e_md_cancel():
    @task.step_operator(step_operator=MD_STEP_OPERATOR, poll_interval=POLL_SECONDS)
    def md_long_step(pid_file, ignore_sigterm):
        import os
        import signal
        import time

        if ignore_sigterm == "yes":  # the cancel must escalate to SIGKILL
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with open(pid_file + ".tmp", "w", encoding="utf-8") as fh:
            fh.write(str(os.getpid()))
        os.replace(pid_file + ".tmp", pid_file)
        print(f"e2e-md-long-step running pid={os.getpid()}", flush=True)
        time.sleep(300)
        return "should never get here"

    md_long_step(pid_file="{{ dag_run.conf['pid_file'] }}",
                 ignore_sigterm="{{ dag_run.conf.get('ignore_sigterm', 'no') }}")


@dag(dag_id="stepops_e2e_md_db_conn", schedule=None, catchup=False, tags=["stepops-e2e"])
def stepops_e2e_md_db_conn():
    """A deferred step whose modal connection (``modal_default``) is only in the metadata DB."""

    @task.step_operator(step_operator=MD_STEP_OPERATOR, poll_interval=POLL_SECONDS)
    def md_db_conn_step(release, run_id=None):
        import os
        import time

        print(f"e2e-md-db-conn-step run_id={run_id}", flush=True)
        deadline = time.monotonic() + WAIT_SECONDS
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.05)
        return {"run_id": run_id}

    md_db_conn_step(release="{{ dag_run.conf['release'] }}")


stepops_e2e_md_pipeline()
stepops_e2e_md_deferred()
stepops_e2e_md_reattach()
stepops_e2e_md_cancel()
stepops_e2e_md_db_conn()
