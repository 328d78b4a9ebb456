"""Step tasks on the ``kubernetes`` flavor, against the session's Kubernetes emulator.

``k8s_step_operator`` is registered by tests/e2e/conftest.py (when the kubernetes extra is installed)
with a kubeconfig of the emulator, namespace ``steps`` and the environment
``{"E2E_FROM_CONN": "from-k8s-connection"}``. Pods run on this host but do not inherit its
environment: the steps write what the tests check into files named by the DAG run's conf.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import dag, task

#: registered by tests/e2e/conftest.py
K8S_STEP_OPERATOR = "k8s_step_operator"


@dag(dag_id="stepops_e2e_k8s_pipeline", schedule=None, catchup=False, tags=["stepops-e2e"])
def stepops_e2e_k8s_pipeline():
    """``airflow dags test``: an upstream XCom into a Kubernetes step, its result into a normal task."""

    @task
    def numbers():
        return [3, 4, 5]

    @task.step_operator(step_operator=K8S_STEP_OPERATOR, poll_interval=0.5)
    def k8s_sum_squares(values, run_id=None):
        import os

        total = sum(v * v for v in values)
        print(f"e2e-k8s-step values={values} total={total} flavor={os.environ.get('STEPOPS_FLAVOR')}", flush=True)
        return {"total": total, "run_id": run_id, "env": os.environ.get("E2E_FROM_CONN"),
                "pid": os.getpid()}

    @task
    def k8s_report(result):
        return f"total={result['total']} env={result['env']}"

    k8s_report(k8s_sum_squares(numbers()))


@dag(dag_id="stepops_e2e_k8s_deferred", schedule=None, catchup=False, tags=["stepops-e2e"])
def stepops_e2e_k8s_deferred():
    # deferrable is left at its default (True): the wait happens in the triggerer
    @task.step_operator(step_operator=K8S_STEP_OPERATOR, poll_interval=0.5)
    def k8s_deferred_step(seconds, run_id=None):
        import os
        import time

        print(f"e2e-k8s-remote-line begin run_id={run_id}", flush=True)
        time.sleep(float(seconds))
        print(f"e2e-k8s-remote-line end env={os.environ.get('E2E_FROM_CONN')}", flush=True)
        return {"answer": 6 * 7, "run_id": run_id, "env": os.environ.get("E2E_FROM_CONN")}

    k8s_deferred_step(seconds="{{ dag_run.conf.get('seconds', 4) }}")


@dag(dag_id="stepops_e2e_k8s_reattach", schedule=None, catchup=False, tags=["stepops-e2e"])
def stepops_e2e_k8s_reattach():
    @task.step_operator(
        step_operator=K8S_STEP_OPERATOR,
        deferrable=False,  # waits on the worker: the test SIGKILLs that worker's task process
        poll_interval=0.5,
        retries=1,
        retry_delay=timedelta(seconds=2),
    )
    def k8s_slow_step(marker, seconds):
        import os
        import time

        with open(marker, "a", encoding="utf-8") as fh:  # one line per invocation of the step
            fh.write(f"{os.getpid()}\n")
        print(f"e2e-k8s-slow-step started pid={os.getpid()}", flush=True)
        time.sleep(float(seconds))
        return {"value": "survived-worker-kill", "pid": os.getpid()}

    k8s_slow_step("{{ dag_run.conf['marker'] }}", "{{ dag_run.conf.get('seconds', 15) }}")


@dag(dag_id="stepops_e2e_k8s_cancel", schedule=None, catchup=False, tags=["stepops-e2e"])
def stepops_e2e_k8s_cancel():
    @task.step_operator(step_operator=K8S_STEP_OPERATOR, poll_interval=0.5)
    def k8s_long_step(pid_file, ignore_sigterm):
        import os
        import signal
        import time

        if ignore_sigterm == "yes":  # the kubelet must escalate to SIGKILL after the grace period
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with open(pid_file + ".tmp", "w", encoding="utf-8") as fh:
            fh.write(str(os.getpid()))
        os.replace(pid_file + ".tmp", pid_file)
        print(f"e2e-k8s-long-step running pid={os.getpid()}", flush=True)
        time.sleep(300)
        return "should never get here"

    k8s_long_step(pid_file="{{ dag_run.conf['pid_file'] }}",
                  ignore_sigterm="{{ dag_run.conf.get('ignore_sigterm', 'no') }}")


stepops_e2e_k8s_pipeline()
stepops_e2e_k8s_deferred()
stepops_e2e_k8s_reattach()
stepops_e2e_k8s_cancel()
