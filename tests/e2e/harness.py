"""One harness per flavor: what the conformance suite needs to know about a backend to run the same lifecycle
scenarios on it. Its step operator connection, the jobs of a task instance as its emulator records them
(read the way the service would answer, not the way the operator reports them) and their state, and how to
preempt a running job. Adding a flavor means adding a harness here (and its emulator to tests/e2e/conftest.py).

States are normalised to ``running``, ``succeeded``, ``failed``, ``cancelled`` and ``gone`` (deleted).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

K8S_NS = "steps"
K8S_LABEL = "stepops.airflow.apache.org"


@dataclass
class Harness:
    flavor: str
    #: the step operator connection; where the flavor has one, its credentials are only in the metadata DB
    conn_id: str
    emulator: Any = None
    #: settings a step needs to be preemptible (spot capacity...), as ``step_operator.<flavor>`` settings;
    #: None: the flavor has no preemption (the scenario does not apply)
    preemptible: dict[str, Any] | None = None

    def jobs(self, af: Any, dag_id: str, run_id: str, task_id: str) -> list[str]:
        """Ids of every job of one task instance (any try), oldest first."""
        raise NotImplementedError

    def state(self, af: Any, job_id: str) -> str:
        raise NotImplementedError

    def preempt(self, af: Any, job_id: str) -> None:
        raise NotImplementedError(f"{self.flavor} has no preemption")


class Local(Harness):
    def jobs(self, af, dag_id, run_id, task_id):
        return [p.name for p in af.job_dirs(dag_id, run_id, task_id)]

    def state(self, af, job_id):
        status = af.jobs_dir / job_id / "status.json"
        if not (af.jobs_dir / job_id).exists():
            return "gone"
        return json.loads(status.read_text())["state"] if status.exists() else "running"


class Kubernetes(Harness):
    def _objects(self, dag_id: str, task_id: str) -> list[dict]:
        selector = f"{K8S_LABEL}/dag-id={dag_id},{K8S_LABEL}/task-id={task_id}"
        return self.emulator.list_objects("jobs", K8S_NS, selector)

    def jobs(self, af, dag_id, run_id, task_id):
        return [j["metadata"]["name"] for j in self._objects(dag_id, task_id)
                if j["metadata"]["annotations"].get(f"{K8S_LABEL}/run-id") == run_id]

    def state(self, af, job_id):
        job = self.emulator.get_object("jobs", K8S_NS, job_id)
        if job is None:
            return "gone"
        done = {c["type"] for c in (job.get("status") or {}).get("conditions") or [] if c["status"] == "True"}
        return "succeeded" if "Complete" in done else "failed" if "Failed" in done else "running"

    def preempt(self, af, job_id):
        step = self.emulator.get_object("jobs", K8S_NS, job_id)["metadata"]["labels"][f"{K8S_LABEL}/step"]
        (pod,) = self.emulator.list_objects("pods", K8S_NS, f"{K8S_LABEL}/step={step}")
        self.emulator.disrupt(K8S_NS, pod["metadata"]["name"], "evicted")


class SageMaker(Harness):
    STATES = {"Completed": "succeeded", "Failed": "failed", "Stopped": "cancelled"}

    def jobs(self, af, dag_id, run_id, task_id):
        client = self.emulator.client("sagemaker")
        found = []
        for job in self.emulator.jobs():
            tags = {t["Key"]: t["Value"] for t in client.list_tags(ResourceArn=job["TrainingJobArn"])["Tags"]}
            if (tags.get("stepops:dag-id"), tags.get("stepops:run-id"), tags.get("stepops:task-id")) == (
                    dag_id, run_id, task_id):
                found.append(job["TrainingJobName"])
        return found

    def state(self, af, job_id):
        return self.STATES.get(self.emulator.describe(job_id)["TrainingJobStatus"], "running")

    def preempt(self, af, job_id):
        """Interrupt the spot job too close to its MaxWaitTimeInSeconds for SageMaker to restart it."""
        job = self.emulator.describe(job_id)
        strike = job["CreationTime"].timestamp() + job["StoppingCondition"]["MaxWaitTimeInSeconds"] - 0.4
        assert time.time() < strike - 1, "the job started too late to be interrupted within its wait budget"
        time.sleep(max(strike - time.time(), 0))
        self.emulator.disrupt(job_id, "spot_interruption")


class Vertex(Harness):
    STATES = {"JOB_STATE_SUCCEEDED": "succeeded", "JOB_STATE_FAILED": "failed", "JOB_STATE_CANCELLED": "cancelled"}

    def jobs(self, af, dag_id, run_id, task_id):  # label values: lower case, at most 63 characters
        wanted = {f"stepops-{key}": re.sub(r"[^a-z0-9_-]", "_", value.lower())[:63]
                  for key, value in (("dag", dag_id), ("run", run_id), ("task", task_id))}
        return [j["name"].rsplit("/", 1)[-1] for j in self.emulator.jobs
                if wanted.items() <= (j.get("labels") or {}).items()]

    def state(self, af, job_id):
        (job,) = [j for j in self.emulator.jobs if j["name"].endswith(f"/{job_id}")]
        return self.STATES.get(job["state"], "running")

    def preempt(self, af, job_id):
        self.emulator.inject("preemption", job_id)


class AzureML(Harness):
    STATES = {"Completed": "succeeded", "Failed": "failed", "Canceled": "cancelled"}

    def jobs(self, af, dag_id, run_id, task_id):
        return [j["name"] for j in self.emulator.jobs if {"stepops-dag": dag_id, "stepops-run": run_id,
                "stepops-task": task_id}.items() <= (j["properties"].get("tags") or {}).items()]

    def state(self, af, job_id):
        (job,) = [j for j in self.emulator.jobs if j["name"] == job_id]
        return self.STATES.get(job["status"], "running")

    def preempt(self, af, job_id):
        self.emulator.inject("preemption", job_id)


class Modal(Harness):
    STATES = {"success": "succeeded", "failure": "failed", "terminated": "cancelled", "timeout": "failed",
              "init_failure": "failed"}

    def jobs(self, af, dag_id, run_id, task_id):  # calls carry no identity: the step prints it first
        line = f"conformance-begin {dag_id} {run_id} {task_id}"
        return [c["id"] for c in self.emulator.calls if line in self.emulator.logs(c["id"])]

    def state(self, af, job_id):
        return self.STATES.get(self.emulator.call(job_id)["state"], "running")

    def preempt(self, af, job_id):
        self.emulator.inject("preemption", job_id)


def harnesses(af: Any) -> dict[str, Harness]:
    """The harness of every flavor whose emulator this session has."""
    found: dict[str, Harness] = {"local": Local("local", "e2e_step_operator")}
    spot_budget = {"max_runtime_in_seconds": 40, "max_wait_time_in_seconds": 40}
    candidates = [(af.k8s, Kubernetes("kubernetes", "k8s_step_operator",
                                      preemptible={"use_spot": True, "require_checkpoint_dir": True})),
                  (af.sm, SageMaker("sagemaker", "sm_step_operator",
                                    preemptible={"use_spot_instances": True, **spot_budget})),
                  (af.vx, Vertex("vertex", "vx_db_step_operator", preemptible={"use_spot": True})),
                  (af.az, AzureML("azureml", "az_db_step_operator", preemptible={"job_tier": "Spot"})),
                  (af.md, Modal("modal", "md_step_operator", preemptible={}))]
    for emulator, harness in candidates:
        if emulator is not None:
            harness.emulator = emulator
            found[harness.flavor] = harness
    return found
