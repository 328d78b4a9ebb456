"""Step tasks on the ``sagemaker`` flavor, against the session's SageMaker emulator.

``sm_step_operator`` is registered by tests/e2e/conftest.py (when moto and boto3 are installed) with
the emulator's region, artifact store ``s3://stepops-tests/e2e``, default instance type ``ml.m5.large``
and the environment ``{"E2E_FROM_CONN": "from-sm-connection"}``; ``aws_default`` points at the
emulator. Training jobs run on this host as processes of the test session with a minimal environment
(not the host's): the steps write what the tests check into files named by the DAG run's conf.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import dag, task

from airflow_stepops.settings.sagemaker import SageMakerStepOperatorSettings

#: registered by tests/e2e/conftest.py
SM_STEP_OPERATOR = "sm_step_operator"
#: the spot step's stopping condition: MaxWaitTimeInSeconds == MaxRuntimeInSeconds, so an interruption
#: near the end of the wait budget leaves no time to restart (tests/e2e/test_sagemaker.py relies on it)
SPOT_SECONDS = 12


@dag(dag_id="stepops_e2e_sm_pipeline", schedule=None, catchup=False, tags=["stepops-e2e"])
def stepops_e2e_sm_pipeline():
    """``airflow dags test``: an upstream XCom into a SageMaker step, its result into a normal task."""

    @task
    def sm_numbers():
        return [3, 4, 5]

    @task.step_operator(step_operator=SM_STEP_OPERATOR, poll_interval=0.5)
    def sm_sum_squares(values, run_id=None):
        import os

        total = sum(v * v for v in values)
        print(f"e2e-sm-step values={values} total={total} flavor={os.environ.get('STEPOPS_FLAVOR')} "
              f"job={os.environ.get('TRAINING_JOB_NAME')}", flush=True)
        return {"total": total, "run_id": run_id, "env": os.environ.get("E2E_FROM_CONN"),
                "job": os.environ.get("TRAINING_JOB_NAME")}

    @task
    def sm_report(result):
        return f"total={result['total']} env={result['env']}"

    sm_report(sm_sum_squares(sm_numbers()))


@dag(dag_id="stepops_e2e_sm_deferred", schedule=None, catchup=False, tags=["stepops-e2e"])
def stepops_e2e_sm_deferred():
    # deferrable is left at its default (True): the wait happens in the triggerer
    @task.step_operator(step_operator=SM_STEP_OPERATOR, poll_interval=0.5)
    def sm_deferred_step(seconds, run_id=None):
        import os
        import time

        print(f"e2e-sm-remote-line begin run_id={run_id}", flush=True)
        time.sleep(float(seconds))
        print(f"e2e-sm-remote-line end env={os.environ.get('E2E_FROM_CONN')}", flush=True)
        return {"answer": 6 * 7, "run_id": run_id, "env": os.environ.get("E2E_FROM_CONN")}

    sm_deferred_step(seconds="{{ dag_run.conf.get('seconds', 4) }}")


@dag(dag_id="stepops_e2e_sm_reattach", schedule=None, catchup=False, tags=["stepops-e2e"])
def stepops_e2e_sm_reattach():
    @task.step_operator(
        step_operator=SM_STEP_OPERATOR,
        deferrable=False,  # waits on the worker: the test SIGKILLs that worker's task process
        poll_interval=0.5,
        retries=1,
        retry_delay=timedelta(seconds=2),
    )
    def sm_slow_step(marker, seconds):
        import os
        import time

        with open(marker, "a", encoding="utf-8") as fh:  # one line per invocation of the step
            fh.write(f"{os.getpid()} {os.environ.get('TRAINING_JOB_NAME')}\n")
        print(f"e2e-sm-slow-step started pid={os.getpid()}", flush=True)
        time.sleep(float(seconds))
        return {"value": "survived-worker-kill", "pid": os.getpid()}

    sm_slow_step("{{ dag_run.conf['marker'] }}", "{{ dag_run.conf.get('seconds', 15) }}")


@dag(dag_id="stepops_e2e_sm_cancel", schedule=None, catchup=False, tags=["stepops-e2e"])
def stepops_e2e_sm_cancel():
    @task.step_operator(step_operator=SM_STEP_OPERATOR, poll_interval=0.5)
    def sm_long_step(pid_file, ignore_sigterm):
        import os
        import signal
        import time

        if ignore_sigterm == "yes":  # StopTrainingJob must escalate to SIGKILL after the grace period
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with open(pid_file + ".tmp", "w", encoding="utf-8") as fh:
            fh.write(str(os.getpid()))
        os.replace(pid_file + ".tmp", pid_file)
        print(f"e2e-sm-long-step running pid={os.getpid()}", flush=True)
        time.sleep(300)
        return "should never get here"

    sm_long_step(pid_file="{{ dag_run.conf['pid_file'] }}",
                 ignore_sigterm="{{ dag_run.conf.get('ignore_sigterm', 'no') }}")


@dag(dag_id="stepops_e2e_sm_spot", schedule=None, catchup=False, tags=["stepops-e2e"])
def stepops_e2e_sm_spot():
    @task.step_operator(
        step_operator=SM_STEP_OPERATOR,
        poll_interval=0.5,
        retries=1,  # a preempted try is retried: the new job resumes from the shared checkpoints
        retry_delay=timedelta(seconds=1),
        settings={"step_operator.sagemaker": SageMakerStepOperatorSettings(
            use_spot_instances=True, max_runtime_in_seconds=SPOT_SECONDS, max_wait_time_in_seconds=SPOT_SECONDS)},
    )
    def sm_spot_step(epochs, epoch_seconds, progress):
        """Trains ``epochs`` epochs, keeping its progress in the checkpoint directory (synced to S3 and
        restored into every new job of this task instance). ``progress`` (on this host) gets one line per
        start and per epoch, with the training job's name."""
        import json
        import os
        import time

        job = os.environ["TRAINING_JOB_NAME"]
        checkpoint = os.path.join(os.environ["STEPOPS_CHECKPOINT_DIR"], "progress.json")

        def note(line):
            with open(progress, "a", encoding="utf-8") as fh:
                fh.write(f"{line}\n")

        def save(state):
            os.makedirs(os.path.dirname(checkpoint), exist_ok=True)
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
        print(f"e2e-sm-spot start job={job} from_epoch={state['epoch']}", flush=True)
        for epoch in range(state["epoch"] + 1, int(epochs) + 1):
            time.sleep(float(epoch_seconds))
            state["epoch"] = epoch
            save(state)
            note(f"epoch {job} {epoch}")
        return state

    sm_spot_step("{{ dag_run.conf.get('epochs', 26) }}", "{{ dag_run.conf.get('epoch_seconds', 0.5) }}",
                 "{{ dag_run.conf['progress'] }}")


stepops_e2e_sm_pipeline()
stepops_e2e_sm_deferred()
stepops_e2e_sm_reattach()
stepops_e2e_sm_cancel()
stepops_e2e_sm_spot()
