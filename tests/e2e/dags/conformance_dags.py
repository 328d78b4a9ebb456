"""The conformance suite's DAGs: the same scenarios for every flavor, ``conformance_<flavor>_<scenario>``.

The flavors and their step operator connections come from ``STEPOPS_E2E_FLAVORS`` (set by
tests/e2e/conftest.py from tests/e2e/harness.py). Steps run where their flavor's emulator runs them, on this
host with their own environment: they write what the tests check into files named by the DAG run's conf
(``marker``: one line per invocation) and, where a test must act while they run, wait until it creates the
``release`` file. Every step prints ``conformance-begin <dag> <run> <task>`` first, which identifies its job
in emulators whose jobs carry no identity.
"""

from __future__ import annotations

import functools
import json
import os
from datetime import timedelta

from airflow.sdk import dag, task

FLAVORS: dict[str, dict] = json.loads(os.environ.get("STEPOPS_E2E_FLAVORS", "{}"))
POLL = 0.5
#: the poll interval of the step the cancel scenario marks failed: the stop must go out within two of them
CANCEL_POLL = 3.0
#: a task queue no triggerer serves (the session's triggerer consumes only ``default``): a step deferring from it
#: waits until Airflow's own trigger timeout fails it
NO_TRIGGERER_QUEUE = "conformance-no-triggerer"
MARKER = "{{ dag_run.conf.get('marker', '') }}"
RELEASE = "{{ dag_run.conf.get('release', '') }}"
#: a step's own release file, which the test creates once the scheduler has settled the step's deferral (a
#: trigger firing sooner meets an Airflow 3.3 race that fails the try: tests/e2e/steps.py, deferral_settled)
SETTLED = ("{% if dag_run.conf.get('errors') %}{{ dag_run.conf['errors'] }}/settled-{{ ti.task_id }}-"
           "{{ ti.map_index }}-{{ ti.try_number }}{% endif %}")


def record_exception(context):
    """on_failure_callback: what the task saw of the remote exception, for the test to read."""
    from airflow_stepops import (
        RemoteStepError,
        StepCostLimitError,
        StepFailedError,
        StepPreemptedError,
        StepTimeoutError,
    )

    exc = context["exception"]
    kinds = {"ValueError": ValueError, "RuntimeError": RuntimeError, "RemoteStepError": RemoteStepError,
             "StepFailedError": StepFailedError, "StepTimeoutError": StepTimeoutError,
             "StepPreemptedError": StepPreemptedError, "StepCostLimitError": StepCostLimitError}
    seen = {"types": sorted(name for name, cls in kinds.items() if isinstance(exc, cls)), "text": str(exc)}
    out = context["dag_run"].conf["errors"]
    with open(f"{out}/{context['ti'].task_id}.{context['ti'].try_number}.json", "w", encoding="utf-8") as fh:
        json.dump(seen, fh)


def conformance(flavor: str, conn_id: str, settings: dict | None, short: dict | None = None,
                max_cost: float | None = None) -> None:
    prefix = f"conformance_{flavor}"
    step = functools.partial(task.step_operator, step_operator=conn_id, poll_interval=POLL)

    def _begin(dag_id, task_id, marker, release, run_id):
        """The steps' prologue (nested: pickled by value): identify the job, note the call, wait to go on."""
        import os
        import time

        print(f"conformance-begin {dag_id} {run_id} {task_id}", flush=True)
        # the files are the test host's: a step on a real service (make test-cloud) sees neither
        if marker and os.path.isdir(os.path.dirname(marker)):
            with open(marker, "a", encoding="utf-8") as fh:
                fh.write(f"{os.getpid()}\n")
        deadline = time.monotonic() + 300
        while (release and os.path.isdir(os.path.dirname(release)) and not os.path.exists(release)
               and time.monotonic() < deadline):
            time.sleep(0.2)

    def _checkpointed(marker):
        """Note, beside the marker, that this invocation has checkpointed (the test preempts it then)."""
        import os

        print("conformance-checkpointed", flush=True)
        if marker and os.path.isdir(os.path.dirname(marker)):
            with open(f"{marker}.checkpointed", "a", encoding="utf-8") as fh:
                fh.write(f"{os.getpid()}\n")

    @dag(dag_id=f"{prefix}_results", schedule=None, catchup=False, tags=["stepops-conformance"])
    def results():
        """Small JSON to XCom, multiple_outputs, a large non-JSON result passed on as the value, mapping,
        remote log lines streamed while deferred; and the same results from steps that wait on the worker
        (``waited_*``, deferrable=False)."""

        @step(multiple_outputs=True)
        def produce(marker, release, lines, run_id=None):
            import os
            import time

            _begin(f"{prefix}_results", "produce", marker, release, run_id)
            for n in range(1, int(lines) + 1):
                print(f"conformance-line {n:03d}", flush=True)
                time.sleep(0.05)
            return {"answer": 42, "env": os.environ.get("E2E_FROM_CONN")}

        @step
        def big(settled, run_id=None):
            _begin(f"{prefix}_results", "big", "", settled, run_id)
            return bytes(range(256)) * 400  # 100 KiB, not JSON: an ArtifactRef in XCom

        @step
        def consume(blob, settled, run_id=None):
            import hashlib

            _begin(f"{prefix}_results", "consume", "", settled, run_id)
            return {"type": type(blob).__name__, "size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}

        @step
        def square(x, settled, run_id=None):
            _begin(f"{prefix}_results", "square", "", settled, run_id)
            return x * x

        @step(multiple_outputs=True, deferrable=False)
        def waited_produce(run_id=None):
            import os

            _begin(f"{prefix}_results", "waited_produce", "", "", run_id)
            return {"answer": 42, "env": os.environ.get("E2E_FROM_CONN"), "blob": bytes(range(256)) * 400}

        @step(deferrable=False)
        def waited_consume(blob, x, run_id=None):
            import hashlib

            _begin(f"{prefix}_results", "waited_consume", "", "", run_id)
            return {"square": x * x, "type": type(blob).__name__, "size": len(blob),
                    "sha256": hashlib.sha256(blob).hexdigest()}

        produce(MARKER, RELEASE, "{{ dag_run.conf.get('lines', 40) }}")
        square.partial(settled=SETTLED).expand(x=[2, 3])
        consume(big(SETTLED), SETTLED)
        # waiting on the worker: few tasks (each holds a worker slot for its whole run)
        waited_consume.partial(blob=waited_produce()["blob"]).expand(x=[2, 3])

    @dag(dag_id=f"{prefix}_errors", schedule=None, catchup=False, tags=["stepops-conformance"])
    def errors():
        """Remote exceptions, and user errors whose words sound like the backend's."""

        @step(on_failure_callback=record_exception)
        def value_error(settled, run_id=None):
            _begin(f"{prefix}_errors", "value_error", "", settled, run_id)
            raise ValueError("bad value: first line\nsecond line")

        @step(on_failure_callback=record_exception)
        def worded_error(settled, run_id=None):
            _begin(f"{prefix}_errors", "worded_error", "", settled, run_id)
            raise RuntimeError("timeout: the batch was preempted and its rows evicted")

        @step(on_failure_callback=record_exception, deferrable=False)
        def waited_value_error(run_id=None):
            _begin(f"{prefix}_errors", "waited_value_error", "", "", run_id)
            raise ValueError("bad value: first line\nsecond line")

        value_error(SETTLED)
        worded_error(SETTLED)
        waited_value_error()

    @dag(dag_id=f"{prefix}_reattach", schedule=None, catchup=False, tags=["stepops-conformance"])
    def reattach():
        """Waits on the worker (the tests kill it) and retries once."""

        @step(deferrable=False, retries=1, retry_delay=timedelta(seconds=2))
        def once(marker, release, run_id=None):
            import os

            _begin(f"{prefix}_reattach", "once", marker, release, run_id)
            return {"pid": os.getpid()}

        once(MARKER, RELEASE)

    @dag(dag_id=f"{prefix}_cancel", schedule=None, catchup=False, tags=["stepops-conformance"])
    def cancel():
        """Steps that run until stopped: by marking them failed, by their execution_timeout, by Airflow's trigger
        timeout (the backstop when no triggerer runs the trigger that enforces the execution_timeout)."""

        @step(poll_interval=CANCEL_POLL)
        def forever(marker, run_id=None):
            import time

            _begin(f"{prefix}_cancel", "forever", marker, "", run_id)
            time.sleep(600)

        @step(execution_timeout=timedelta(seconds=45), on_failure_callback=record_exception)
        def timed(pid_file, run_id=None):
            import os
            import time

            _begin(f"{prefix}_cancel", "timed", "", "", run_id)
            with open(pid_file, "w", encoding="utf-8") as fh:
                fh.write(str(os.getpid()))
            time.sleep(600)

        @step(execution_timeout=timedelta(seconds=45), queue=NO_TRIGGERER_QUEUE, on_failure_callback=record_exception)
        def unserved(pid_file, run_id=None):
            import os
            import time

            _begin(f"{prefix}_cancel", "unserved", "", "", run_id)
            with open(pid_file, "w", encoding="utf-8") as fh:
                fh.write(str(os.getpid()))
            time.sleep(600)

        forever(MARKER)
        timed("{{ dag_run.conf.get('errors', '') }}/timed.pid")
        unserved("{{ dag_run.conf.get('errors', '') }}/unserved.pid")

    @dag(dag_id=f"{prefix}_cost", schedule=None, catchup=False, tags=["stepops-conformance"])
    def cost():
        """Runs until its accrued cost reaches max_cost (about 12 s of run time, at the step operator's prices)."""

        @step(max_cost=max_cost, on_failure_callback=record_exception)
        def over_budget(pid_file, run_id=None):
            import os
            import time

            _begin(f"{prefix}_cost", "over_budget", "", "", run_id)
            with open(pid_file, "w", encoding="utf-8") as fh:
                fh.write(str(os.getpid()))
            time.sleep(600)

        over_budget("{{ dag_run.conf.get('errors', '') }}/over_budget.pid")

    @dag(dag_id=f"{prefix}_preempt", schedule=None, catchup=False, tags=["stepops-conformance"])
    def preempt():
        """Checkpoints its invocation, then waits to be preempted; the third attempt returns the checkpoint. With a
        budget of two preemptions and spot capacity, that attempt runs on-demand (``on_demand_last``)."""

        @step(preemption_retries=2, settings={f"step_operator.{flavor}": settings or {}})
        def resume(marker, settled, run_id=None):
            import json
            import os
            import time

            _begin(f"{prefix}_preempt", "resume", marker, settled, run_id)
            path = os.path.join(os.environ["STEPOPS_CHECKPOINT_DIR"], "state.json")
            state = {"pids": []}
            if os.path.exists(path):
                with open(path, encoding="utf-8") as fh:
                    state = json.load(fh)
            if len(state["pids"]) >= 2:
                # this attempt's deferral is the try's third, which SETTLED does not cover: outlast the seconds in
                # which Airflow 3.3 fails a trigger firing right after a deferral (tests/e2e/steps.py)
                time.sleep(8)
                return {"restored": state}
            state["pids"].append(os.getpid())
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as fh:
                json.dump(state, fh)
            _checkpointed(marker)
            time.sleep(600)

        resume(MARKER, SETTLED)

    @dag(dag_id=f"{prefix}_budget", schedule=None, catchup=False, tags=["stepops-conformance"])
    def budget():
        """Waits to be preempted, past a budget of one preemption on the same capacity."""

        @step(preemption_retries=1, on_preemption="retry", on_failure_callback=record_exception,
              settings={f"step_operator.{flavor}": settings or {}})
        def exhausted(marker, settled, run_id=None):
            import time

            _begin(f"{prefix}_budget", "exhausted", marker, settled, run_id)
            _checkpointed(marker)
            time.sleep(600)

        exhausted(MARKER, SETTLED)

    @dag(dag_id=f"{prefix}_between", schedule=None, catchup=False, tags=["stepops-conformance"])
    def between():
        """Waits on its worker (so the test can kill the worker while an attempt runs) for the release file."""

        @step(deferrable=False, retries=1, retry_delay=timedelta(seconds=1),
              settings={f"step_operator.{flavor}": settings or {}})
        def attempts(marker, release, run_id=None):
            import os

            _begin(f"{prefix}_between", "attempts", marker, release, run_id)
            print("conformance-checkpointed", flush=True)
            return {"pid": os.getpid()}

        attempts(MARKER, RELEASE)

    #: this flavor's step operator first, then the local one
    candidates = [conn_id, "e2e_step_operator"]

    def failover_dags() -> None:
        """``failover_moved``: no capacity on this flavor's step operator, the step runs on the next one;
        ``failover_queued``: queued past max_queue_seconds, likewise; ``failover_owned``: the step's own error on
        the first step operator fails it there."""

        def runs_here(scenario, task_id):
            def fn(marker, settled, run_id=None):
                import os
                import time

                _begin(f"{prefix}_{scenario}", task_id, marker, settled, run_id)
                # the step's second deferral (on the next step operator) is not one SETTLED covers: outlast the
                # seconds in which Airflow 3.3 fails a trigger firing right after a deferral (tests/e2e/steps.py)
                time.sleep(8)
                return {"pid": os.getpid(), "flavor": os.environ.get("STEPOPS_FLAVOR")}
            fn.__name__ = task_id
            return fn

        def moved_dag(scenario, **extra):
            @dag(dag_id=f"{prefix}_{scenario}", schedule=None, catchup=False, tags=["stepops-conformance"])
            def moves():
                step(step_operator=candidates, **extra)(runs_here(scenario, "moved"))(MARKER, SETTLED)

            moves()

        moved_dag("failover_moved", settings={f"step_operator.{flavor}": short or {}})
        moved_dag("failover_queued", max_queue_seconds=4)

        @dag(dag_id=f"{prefix}_failover_owned", schedule=None, catchup=False, tags=["stepops-conformance"])
        def owned():
            @step(step_operator=candidates, on_failure_callback=record_exception)
            def raises(marker, settled, run_id=None):
                _begin(f"{prefix}_failover_owned", "raises", marker, settled, run_id)
                raise ValueError("bad input on the first step operator")

            raises(MARKER, SETTLED)

        owned()

    for factory in (results, errors, reattach, cancel, cost) + ((preempt, budget, between) if settings is not None else ()):
        factory()
    if short is not None:
        failover_dags()


def default_deferrable(flavors: dict[str, dict]) -> None:
    """``conformance_default_deferrable``: one step per flavor without an explicit ``deferrable`` (task id: the
    flavor), which follows the default switches, and ``explicit_local``, which says ``deferrable=True``. Run
    only with ``airflow dags test`` under different environments (never unpaused)."""
    dag_id = "conformance_default_deferrable"

    def returns_its_pid(task_id):
        def step_fn(run_id=None):
            import os

            print(f"conformance-begin {dag_id} {run_id} {task_id}", flush=True)
            return {"pid": os.getpid()}
        return step_fn

    @dag(dag_id=dag_id, schedule=None, catchup=False, tags=["stepops-conformance"])
    def defaults():  # `dags test` runs the tasks one at a time
        for flavor, spec in flavors.items():
            task.step_operator(task_id=flavor, step_operator=spec["conn_id"], poll_interval=POLL)(
                returns_its_pid(flavor))()
        if "local" in flavors:
            task.step_operator(task_id="explicit_local", step_operator=flavors["local"]["conn_id"],
                               poll_interval=POLL, deferrable=True)(returns_its_pid("explicit_local"))()

    defaults()


for _flavor, _spec in FLAVORS.items():
    conformance(_flavor, _spec["conn_id"], _spec.get("preemptible"), _spec.get("short"), _spec.get("max_cost"))
default_deferrable(FLAVORS)
