"""One harness per flavor: what the conformance suite needs to know about a backend to run the same lifecycle
scenarios on it. Its step operator connection, the jobs of a task instance as its emulator records them
(read the way the service would answer, not the way the operator reports them) and their state, and how to
preempt a running job. Adding a flavor means adding a harness here (and its emulator to tests/e2e/conftest.py).

tests/e2e/cloud.py has their counterparts on the real services (``make test-cloud FLAVOR=...``).

States are the kit's (``Emulator.state``): ``running``, ``succeeded``, ``failed``, ``cancelled`` and ``gone``
(deleted); a preemption is the kit's ``preemption`` fault.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

from airflow_stepops.prices import Price, Prices
from airflow_stepops.resources import ResourceSettings

K8S_NS = "steps"
K8S_LABEL = "stepops.airflow.apache.org"
#: the ``prices`` of the step operators without a price table (local, Kubernetes): 3.6 an hour, 0.001 a second
PRICES = {"on_demand": {"hour": 3.6}, "spot": {"hour": 1.2}}
#: the run time the cancel scenario's ``over_budget`` step's max_cost pays for (beyond the least the service bills)
COST_RUN_SECONDS = 12


@dataclass
class Harness:
    """The defaults read the emulator through the kit's interface (``airflow_stepops.testing._kit``)."""

    flavor: str
    #: the step operator connection; where the flavor has one, its credentials are only in the metadata DB
    conn_id: str
    emulator: Any = None
    #: settings a step needs to be preemptible (spot capacity...), as ``step_operator.<flavor>`` settings;
    #: None: the flavor has no preemption (the scenario does not apply)
    preemptible: dict[str, Any] | None = None
    #: settings a step needs for ``deny_capacity`` to fail it for want of capacity
    short_of_capacity: dict[str, Any] | None = None
    #: the "Step cost" link of its steps: the service's billing console (None: the service bills nothing itself)
    cost_link: str | None = None

    def price(self) -> Price:
        """What an hour of a step with default settings costs on the step operator (its table's price, or the
        connection's ``PRICES``)."""
        from airflow_stepops.prices import resource_price

        return resource_price(Prices.model_validate(PRICES), spot=False, cpus=None, memory_gib=None)

    def max_cost(self, seconds: float) -> float:
        """A ``max_cost`` that pays for ``seconds`` of run time beyond the least the service bills and what it bills
        to stop a job."""
        from airflow_stepops.flavors import get_flavor

        price, stopping = self.price(), get_flavor(self.flavor).hook().stop_billing_seconds
        return round(float(price.per_hour or 0) * (price.minimum_seconds + stopping + seconds) / 3600, 9)

    def jobs(self, af: Any, dag_id: str, run_id: str, task_id: str) -> list[str]:
        """Ids of every job of one task instance (any try), oldest first."""
        return [self.emulator.job_id(j) for j in self.emulator.jobs if self.owns(j, dag_id, run_id, task_id)]

    def owns(self, job: dict, dag_id: str, run_id: str, task_id: str) -> bool:
        """Whether a job of the emulator's ``jobs`` is of that task instance."""
        raise NotImplementedError

    def state(self, af: Any, job_id: str) -> str:
        return self.emulator.state(job_id)

    def preempt(self, af: Any, job_id: str) -> None:
        self.emulator.inject("preemption", job_id)

    def deny_capacity(self, dag_id: str) -> None:
        """The next job of ``dag_id`` finds no capacity (with the settings ``short_of_capacity``)."""
        raise NotImplementedError

    def hold_queued(self) -> None:
        """The next job waits for capacity for two minutes."""
        self.emulator.inject("slow_start", duration=120)

    def record(self, job_id: str) -> dict:
        """The job as the emulator holds it (its request, as the service was asked)."""
        return next(job for job in self.emulator.jobs if self.emulator.job_id(job) == job_id)

    def on_demand(self, af: Any, job_id: str) -> bool:
        """Whether the job was asked for on-demand capacity (not spot or preemptible)."""
        raise NotImplementedError

    def late_logs(self, every: int, seconds: float) -> bool:
        """From now on every ``every``-th log line (0: none) reaches the log service ``seconds`` late, behind
        later lines; False where the service has no ingestion delay (the log is the process's own stream)."""
        return False


class Local(Harness):
    def jobs(self, af, dag_id, run_id, task_id):
        return [p.name for p in af.job_dirs(dag_id, run_id, task_id)]

    def state(self, af, job_id):
        status = af.jobs_dir / job_id / "status.json"
        if not (af.jobs_dir / job_id).exists():
            return "gone"
        return json.loads(status.read_text())["state"] if status.exists() else "running"

    def preempt(self, af, job_id):
        raise NotImplementedError("local has no preemption")


class Kubernetes(Harness):
    def owns(self, job, dag_id, run_id, task_id):
        meta = job["metadata"]
        wanted = {f"{K8S_LABEL}/dag-id": dag_id, f"{K8S_LABEL}/run-id": run_id, f"{K8S_LABEL}/task-id": task_id}
        return meta["namespace"] == K8S_NS and wanted.items() <= (meta.get("annotations") or {}).items()

    def deny_capacity(self, dag_id):  # no node can take the pod
        self.emulator.inject("unschedulable", message="0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
                             duration=None)

    def hold_queued(self):  # waiting for capacity is a pod no node takes yet (a scheduled one pulling its image got it)
        self.emulator.inject("unschedulable", message="0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
                             duration=120)

    def on_demand(self, af, job_id):  # the spot node selector (the settings' default) is gone
        selector = self.record(job_id)["spec"]["template"]["spec"].get("nodeSelector") or {}
        return selector.get("karpenter.sh/capacity-type") != "spot"


class SageMaker(Harness):
    def owns(self, job, dag_id, run_id, task_id):
        client = self.emulator.client("sagemaker")
        tags = {t["Key"]: t["Value"] for t in client.list_tags(ResourceArn=job["TrainingJobArn"])["Tags"]}
        return (tags.get("stepops:dag-id"), tags.get("stepops:run-id"), tags.get("stepops:task-id")) == (
            dag_id, run_id, task_id)

    def preempt(self, af, job_id):
        """Interrupt the spot job too close to its MaxWaitTimeInSeconds for SageMaker to restart it."""
        job = self.emulator.job(job_id)
        strike = job["CreationTime"].timestamp() + job["StoppingCondition"]["MaxWaitTimeInSeconds"] - 0.4
        assert time.time() < strike - 1, "the job started too late to be interrupted within its wait budget"
        self.emulator.inject("preemption", job_id, after=max(strike - time.time(), 0))

    def late_logs(self, every, seconds):
        self.emulator.configure(late_log_every=every, late_log_delay=seconds)
        return True

    def on_demand(self, af, job_id):
        return not self.emulator.job(job_id).get("EnableManagedSpotTraining")

    def deny_capacity(self, dag_id):  # jobs are named <dag>-<task>-...
        self.emulator.inject("insufficient_capacity", job_prefix=dag_id.replace("_", "-"))

    def price(self):  # the connection's instance_type (tests/e2e/conftest.py)
        from airflow_stepops.prices import machine_price
        from airflow_stepops.settings.sagemaker_instances import INSTANCE_TYPES, PRICES

        return machine_price(PRICES, INSTANCE_TYPES["ml.m5.large"], "ml.m5.large", spot=False)


class Vertex(Harness):
    def owns(self, job, dag_id, run_id, task_id):  # label values: lower case, at most 63 characters
        wanted = {f"stepops-{key}": re.sub(r"[^a-z0-9_-]", "_", value.lower())[:63]
                  for key, value in (("dag", dag_id), ("run", run_id), ("task", task_id))}
        return wanted.items() <= (job.get("labels") or {}).items()

    def late_logs(self, every, seconds):
        self.emulator.late_logs = (every, seconds) if every else None
        return True

    def on_demand(self, af, job_id):
        return (self.record(job_id)["jobSpec"].get("scheduling") or {}).get("strategy") != "SPOT"

    def deny_capacity(self, dag_id):
        self.emulator.inject("stockout", after=0.2)

    def price(self):
        from airflow_stepops.prices import machine_price
        from airflow_stepops.settings.vertex import VertexStepOperatorSettings
        from airflow_stepops.settings.vertex_machines import MACHINE_TYPES, PRICES

        name = VertexStepOperatorSettings().machine_for(ResourceSettings(), None).machine_type
        return machine_price(PRICES, MACHINE_TYPES[name], name, spot=False)


class AzureML(Harness):
    def owns(self, job, dag_id, run_id, task_id):
        return {"stepops-dag": dag_id, "stepops-run": run_id,
                "stepops-task": task_id}.items() <= (job["properties"].get("tags") or {}).items()

    def on_demand(self, af, job_id):
        return (self.record(job_id)["properties"].get("queueSettings") or {}).get("jobTier") != "Spot"

    def deny_capacity(self, dag_id):  # Azure ML fails no job for want of capacity; it refuses one over quota
        self.emulator.inject("quota_exceeded")

    def price(self):
        from airflow_stepops.prices import machine_price
        from airflow_stepops.settings.azureml import AzureMLStepOperatorSettings
        from airflow_stepops.settings.azureml_vms import PRICES

        vm = AzureMLStepOperatorSettings().vm_for(ResourceSettings(), None)
        return machine_price(PRICES, vm, vm.name, spot=False)


class Modal(Harness):
    def owns(self, job, dag_id, run_id, task_id):  # calls carry no identity: the step prints it first
        return f"conformance-begin {dag_id} {run_id} {task_id}" in self.emulator.logs(job["id"])

    def preempt(self, af, job_id):
        # a preemption Modal gives up on (its retriable internal failure): the one Airflow sees. By default
        # Modal restarts a preempted input itself, and the step resumes from its checkpoint in the same try.
        self.emulator.inject("preemption", job_id, restart=False)

    def late_logs(self, every, seconds):
        self.emulator.late_logs(every, seconds)
        return True

    def deny_capacity(self, dag_id):  # Modal fails no call for want of capacity: it stays queued (max_queue_seconds)
        self.emulator.inject("slow_start", duration=120)

    def price(self):  # the default reservation
        from airflow_stepops.settings.modal_prices import function_price

        return function_price({}, None)

    def on_demand(self, af, job_id):  # the options of the function the call was made to
        call = self.emulator.job(job_id)
        return next(f for f in self.emulator.functions if f["id"] == call["function_id"])["nonpreemptible"]


def harnesses(af: Any) -> dict[str, Harness]:
    """The harness of every flavor whose emulator this session has (in a cloud run: its flavor's only)."""
    if af.cloud is not None:  # make test-cloud (tests/e2e/cloud.py)
        return {af.cloud.flavor: af.cloud}
    found: dict[str, Harness] = {"local": Local("local", "e2e_step_operator")}
    spot_budget = {"max_runtime_in_seconds": 40, "max_wait_time_in_seconds": 40}
    vertex = Vertex("vertex", "vx_db_step_operator", preemptible={"use_spot": True}, short_of_capacity={})
    azure = AzureML("azureml", "az_db_step_operator", preemptible={"job_tier": "Spot"}, short_of_capacity={})
    candidates = [(af.k8s, Kubernetes("kubernetes", "k8s_step_operator",
                                      preemptible={"use_spot": True, "require_checkpoint_dir": True},
                                      short_of_capacity={"unschedulable_timeout_seconds": 2})),
                  (af.sm, SageMaker("sagemaker", "sm_step_operator",
                                    preemptible={"use_spot_instances": True, **spot_budget}, short_of_capacity={},
                                    cost_link="https://console.aws.amazon.com/cost-management/home#/cost-explorer")),
                  (af.vx, vertex), (af.az, azure),
                  (af.md, Modal("modal", "md_step_operator", preemptible={},
                                short_of_capacity={"max_queue_seconds": 4}, cost_link="https://modal.com/settings/usage"))]
    if af.vx is not None:
        vertex.cost_link = f"https://console.cloud.google.com/billing/linkedaccount?project={af.vx.project}"
    if af.az is not None:
        azure.cost_link = (f"https://portal.azure.com/#@/resource/subscriptions/{af.az.config.subscription_id}/"
                           f"resourceGroups/{af.az.config.resource_group}/costanalysis")
    for emulator, harness in candidates:
        if emulator is not None:
            harness.emulator = emulator
            found[harness.flavor] = harness
    return found
