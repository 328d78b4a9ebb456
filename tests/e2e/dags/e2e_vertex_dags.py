"""Step tasks on the ``vertex`` flavor, against the session's Vertex AI emulator.

``vx_step_operator`` is registered by tests/e2e/conftest.py (when the gcp extra and fake-gcs-server are
installed) with the emulator's project, location and endpoints, artifact store ``gs://stepops-tests/e2e``,
the labels ``{"team": "e2e"}`` and the environment ``{"E2E_FROM_CONN": "from-vx-connection"}``;
``google_cloud_default`` holds the emulator's service account (``vx_db_step_operator`` is the same with
``google_cloud_e2e_db``, a copy of it kept only in the metadata DB). CustomJobs run on this host as processes of
the test session with a minimal environment (not the host's): the steps write what the tests check into
files named by the DAG run's conf, and where a test must act while they run they wait until it creates the
file the conf names (at most ``WAIT_SECONDS``).
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import dag, task

from airflow_stepops.settings.vertex import VertexStepOperatorSettings

#: registered by tests/e2e/conftest.py; the second one's google connection is kept only in the metadata DB
VX_STEP_OPERATOR = "vx_step_operator"
VX_DB_STEP_OPERATOR = "vx_db_step_operator"
#: the longest a step waits for its test's go-ahead file
WAIT_SECONDS = 120


@dag(dag_id="stepops_e2e_vx_pipeline", schedule=None, catchup=False, tags=["stepops-e2e"])
def stepops_e2e_vx_pipeline():
    """``airflow dags test``: an upstream XCom into a Vertex AI CustomJob step, its result into a normal task."""

    @task
    def vx_numbers():
        return [3, 4, 5]

    @task.step_operator(step_operator=VX_STEP_OPERATOR, poll_interval=0.5)
    def vx_sum_squares(values, run_id=None):
        import os

        total = sum(v * v for v in values)
        print(f"e2e-vx-step values={values} total={total} flavor={os.environ.get('STEPOPS_FLAVOR')} "
              f"job={os.environ.get('CLOUD_ML_JOB_ID')}", flush=True)
        return {"total": total, "run_id": run_id, "env": os.environ.get("E2E_FROM_CONN"),
                "job": os.environ.get("CLOUD_ML_JOB_ID")}

    @task
    def vx_report(result):
        return f"total={result['total']} env={result['env']}"

    vx_report(vx_sum_squares(vx_numbers()))


@dag(dag_id="stepops_e2e_vx_deferred", schedule=None, catchup=False, tags=["stepops-e2e"])
def stepops_e2e_vx_deferred():
    # deferrable is left at its default (True): the wait happens in the triggerer
    @task.step_operator(step_operator=VX_STEP_OPERATOR, poll_interval=0.5)
    def vx_deferred_step(release, run_id=None):
        import os
        import time

        print(f"e2e-vx-remote-line begin run_id={run_id}", flush=True)
        deadline = time.monotonic() + WAIT_SECONDS  # until the test has seen this line in the task log
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.05)
        print(f"e2e-vx-remote-line end env={os.environ.get('E2E_FROM_CONN')}", flush=True)
        return {"answer": 6 * 7, "run_id": run_id, "env": os.environ.get("E2E_FROM_CONN")}

    vx_deferred_step(release="{{ dag_run.conf['release'] }}")


@dag(dag_id="stepops_e2e_vx_reattach", schedule=None, catchup=False, tags=["stepops-e2e"])
def stepops_e2e_vx_reattach():
    @task.step_operator(
        step_operator=VX_STEP_OPERATOR,
        deferrable=False,  # waits on the worker: the test SIGKILLs that worker's task process
        poll_interval=0.5,
        retries=1,
        retry_delay=timedelta(seconds=1),
    )
    def vx_slow_step(marker, release):
        import os
        import time

        with open(marker, "a", encoding="utf-8") as fh:  # one line per invocation of the step
            fh.write(f"{os.getpid()} {os.environ.get('CLOUD_ML_JOB_ID')}\n")
        print(f"e2e-vx-slow-step started pid={os.getpid()}", flush=True)
        deadline = time.monotonic() + WAIT_SECONDS  # until the retry has re-attached
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.05)
        return {"value": "survived-worker-kill", "pid": os.getpid()}

    vx_slow_step("{{ dag_run.conf['marker'] }}", "{{ dag_run.conf['release'] }}")


@dag(dag_id="stepops_e2e_vx_cancel", schedule=None, catchup=False, tags=["stepops-e2e"])
def stepops_e2e_vx_cancel():
    @task.step_operator(step_operator=VX_STEP_OPERATOR, poll_interval=0.5)
    def vx_long_step(pid_file, ignore_sigterm):
        import os
        import signal
        import time

        if ignore_sigterm == "yes":  # the cancel must escalate to SIGKILL after the grace period
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with open(pid_file + ".tmp", "w", encoding="utf-8") as fh:
            fh.write(str(os.getpid()))
        os.replace(pid_file + ".tmp", pid_file)
        print(f"e2e-vx-long-step running pid={os.getpid()}", flush=True)
        time.sleep(300)
        return "should never get here"

    vx_long_step(pid_file="{{ dag_run.conf['pid_file'] }}",
                 ignore_sigterm="{{ dag_run.conf.get('ignore_sigterm', 'no') }}")


@dag(dag_id="stepops_e2e_vx_spot", schedule=None, catchup=False, tags=["stepops-e2e"])
def stepops_e2e_vx_spot():
    @task.step_operator(
        step_operator=VX_STEP_OPERATOR,
        poll_interval=0.5,
        retries=1,  # a preempted try is retried: the new job resumes from the shared checkpoint directory
        retry_delay=timedelta(seconds=1),
        settings={"step_operator.vertex": VertexStepOperatorSettings(use_spot=True)},
    )
    def vx_spot_step(epochs, epoch_seconds, progress, gate, hold_after):
        """Trains ``epochs`` epochs, keeping its progress in ``STEPOPS_CHECKPOINT_DIR`` (under ``/gcs``,
        shared by every try of this task instance). ``progress`` (on this host) gets one line per start
        and per epoch, with the CustomJob's id. After epoch ``hold_after`` it waits for ``<gate>/hold``
        (the test preempts the job meanwhile); resuming from a checkpoint, it first waits for
        ``<gate>/resume``."""
        import json
        import os
        import time

        def wait_for(name):
            deadline = time.monotonic() + WAIT_SECONDS
            while not os.path.exists(os.path.join(gate, name)) and time.monotonic() < deadline:
                time.sleep(0.05)

        job = os.environ["CLOUD_ML_JOB_ID"]
        checkpoint = os.path.join(os.environ["STEPOPS_CHECKPOINT_DIR"], "progress.json")

        def note(line):
            with open(progress, "a", encoding="utf-8") as fh:
                fh.write(f"{line}\n")

        def save(state):
            os.makedirs(os.path.dirname(checkpoint), exist_ok=True)  # no object there yet: no directory
            with open(checkpoint + ".tmp", "w", encoding="utf-8") as fh:
                json.dump(state, fh)
            os.replace(checkpoint + ".tmp", checkpoint)

        if os.path.exists(checkpoint):
            with open(checkpoint, encoding="utf-8") as fh:
                state = json.load(fh)
        else:
            state = {"epoch": 0, "starts": []}
        state["starts"].append({"job": job, "from_epoch": state["epoch"]})
        save(state)
        note(f"start {job} {state['epoch']}")
        print(f"e2e-vx-spot start job={job} from_epoch={state['epoch']}", flush=True)
        if state["epoch"]:
            wait_for("resume")
        for epoch in range(state["epoch"] + 1, int(epochs) + 1):
            time.sleep(float(epoch_seconds))
            state["epoch"] = epoch
            save(state)
            note(f"epoch {job} {epoch}")
            if epoch == int(hold_after):
                wait_for("hold")
        return state

    vx_spot_step("{{ dag_run.conf.get('epochs', 6) }}", "{{ dag_run.conf.get('epoch_seconds', 0.2) }}",
                 "{{ dag_run.conf['progress'] }}", "{{ dag_run.conf['gate'] }}",
                 "{{ dag_run.conf.get('hold_after', 2) }}")


@dag(dag_id="stepops_e2e_vx_db_conn", schedule=None, catchup=False, tags=["stepops-e2e"])
def stepops_e2e_vx_db_conn():
    """A deferred step whose google connection is only in the metadata DB (not an AIRFLOW_CONN_* variable)."""

    @task.step_operator(step_operator=VX_DB_STEP_OPERATOR, poll_interval=0.5)
    def vx_db_conn_step(release, run_id=None):
        import os
        import time

        print(f"e2e-vx-db-conn-step run_id={run_id}", flush=True)
        deadline = time.monotonic() + WAIT_SECONDS
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.05)
        return {"run_id": run_id}

    vx_db_conn_step(release="{{ dag_run.conf['release'] }}")


stepops_e2e_vx_pipeline()
stepops_e2e_vx_deferred()
stepops_e2e_vx_reattach()
stepops_e2e_vx_cancel()
stepops_e2e_vx_spot()
stepops_e2e_vx_db_conn()
