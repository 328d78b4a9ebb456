"""Step tasks on the ``azureml`` flavor, against the session's Azure ML emulator.

``az_step_operator`` is registered by tests/e2e/conftest.py (when the azure extra, adlfs and Azurite are
installed) with the emulator's workspace, artifact store ``azureml://datastores/workspaceblobstore/paths/e2e``
(workers reach its container through the ``azurite_storage`` connection), the tags ``{"team": "e2e"}`` and the
environment ``{"E2E_FROM_CONN": "from-az-connection"}``; its azure connection does not exist, so
DefaultAzureCredential finds the emulator's managed identity (``az_db_step_operator`` is the same with
``azure_e2e_db``, an azure connection kept only in the metadata DB). Command jobs run on this host as processes
of the test session with a minimal environment (not the host's): the steps write what the tests check into
files named by the DAG run's conf, and where a test must act while they run they wait until it creates the
file the conf names (at most ``WAIT_SECONDS``).
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import dag, task

#: registered by tests/e2e/conftest.py; the second one's azure connection is kept only in the metadata DB
AZ_STEP_OPERATOR = "az_step_operator"
AZ_DB_STEP_OPERATOR = "az_db_step_operator"
#: the longest a step waits for its test's go-ahead file
WAIT_SECONDS = 120


@dag(dag_id="stepops_e2e_az_pipeline", schedule=None, catchup=False, tags=["stepops-e2e"])
def stepops_e2e_az_pipeline():
    """``airflow dags test``: an upstream XCom into an Azure ML command job step, its result into a normal task."""

    @task
    def az_numbers():
        return [3, 4, 5]

    @task.step_operator(step_operator=AZ_STEP_OPERATOR, poll_interval=0.5)
    def az_sum_squares(values, run_id=None):
        import os

        total = sum(v * v for v in values)
        print(f"e2e-az-step values={values} total={total} flavor={os.environ.get('STEPOPS_FLAVOR')} "
              f"job={os.environ.get('AZUREML_RUN_ID')}", flush=True)
        return {"total": total, "run_id": run_id, "env": os.environ.get("E2E_FROM_CONN"),
                "job": os.environ.get("AZUREML_RUN_ID")}

    @task
    def az_report(result):
        return f"total={result['total']} env={result['env']}"

    az_report(az_sum_squares(az_numbers()))


@dag(dag_id="stepops_e2e_az_deferred", schedule=None, catchup=False, tags=["stepops-e2e"])
def stepops_e2e_az_deferred():
    # deferrable is left at its default (True): the wait happens in the triggerer
    @task.step_operator(step_operator=AZ_STEP_OPERATOR, poll_interval=0.5)
    def az_deferred_step(release, run_id=None):
        import os
        import time

        print(f"e2e-az-remote-line begin run_id={run_id}", flush=True)
        deadline = time.monotonic() + WAIT_SECONDS  # until the test has seen this line in the task log
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.05)
        print(f"e2e-az-remote-line end env={os.environ.get('E2E_FROM_CONN')}", flush=True)
        return {"answer": 6 * 7, "run_id": run_id, "env": os.environ.get("E2E_FROM_CONN")}

    az_deferred_step(release="{{ dag_run.conf['release'] }}")


@dag(dag_id="stepops_e2e_az_reattach", schedule=None, catchup=False, tags=["stepops-e2e"])
def stepops_e2e_az_reattach():
    @task.step_operator(
        step_operator=AZ_STEP_OPERATOR,
        deferrable=False,  # waits on the worker: the test SIGKILLs that worker's task process
        poll_interval=0.5,
        retries=1,
        retry_delay=timedelta(seconds=1),
    )
    def az_slow_step(marker, release):
        import os
        import time

        with open(marker, "a", encoding="utf-8") as fh:  # one line per invocation of the step
            fh.write(f"{os.getpid()} {os.environ.get('AZUREML_RUN_ID')}\n")
        print(f"e2e-az-slow-step started pid={os.getpid()}", flush=True)
        deadline = time.monotonic() + WAIT_SECONDS  # until the retry has re-attached
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.05)
        return {"value": "survived-worker-kill", "pid": os.getpid()}

    az_slow_step("{{ dag_run.conf['marker'] }}", "{{ dag_run.conf['release'] }}")


@dag(dag_id="stepops_e2e_az_cancel", schedule=None, catchup=False, tags=["stepops-e2e"])
def stepops_e2e_az_cancel():
    @task.step_operator(step_operator=AZ_STEP_OPERATOR, poll_interval=0.5)
    def az_long_step(pid_file, ignore_sigterm):
        import os
        import signal
        import time

        if ignore_sigterm == "yes":  # the cancel must escalate to SIGKILL after the grace period
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with open(pid_file + ".tmp", "w", encoding="utf-8") as fh:
            fh.write(str(os.getpid()))
        os.replace(pid_file + ".tmp", pid_file)
        print(f"e2e-az-long-step running pid={os.getpid()}", flush=True)
        time.sleep(300)
        return "should never get here"

    az_long_step(pid_file="{{ dag_run.conf['pid_file'] }}",
                 ignore_sigterm="{{ dag_run.conf.get('ignore_sigterm', 'no') }}")


@dag(dag_id="stepops_e2e_az_db_conn", schedule=None, catchup=False, tags=["stepops-e2e"])
def stepops_e2e_az_db_conn():
    """A deferred step whose azure connection is only in the metadata DB (not an AIRFLOW_CONN_* variable)."""

    @task.step_operator(step_operator=AZ_DB_STEP_OPERATOR, poll_interval=0.5)
    def az_db_conn_step(release, run_id=None):
        import os
        import time

        print(f"e2e-az-db-conn-step run_id={run_id}", flush=True)
        deadline = time.monotonic() + WAIT_SECONDS
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.05)
        return {"run_id": run_id}

    az_db_conn_step(release="{{ dag_run.conf['release'] }}")


stepops_e2e_az_pipeline()
stepops_e2e_az_deferred()
stepops_e2e_az_reattach()
stepops_e2e_az_cancel()
stepops_e2e_az_db_conn()
