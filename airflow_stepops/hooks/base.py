"""The contract every flavor's hook fulfils: submit / status / cancel / logs, sync and async.

Hooks are the only modules that talk to a backend. The operator and the trigger work only with
``StepSpec``, job handles (JSON dicts) and ``JobStatus``, so the lifecycle is written once.
"""

from __future__ import annotations

import asyncio
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from typing import Any, ClassVar, TypedDict, TypeVar

from airflow.sdk import BaseHook

from airflow_stepops.artifacts import ArtifactRef, check_bucket, default_local_store, store_path
from airflow_stepops.bundle import StepIdentity
from airflow_stepops.exceptions import StepOperatorConfigError
from airflow_stepops.flavors import get_flavor
from airflow_stepops.prices import Price, Prices, overrides
from airflow_stepops.resources import ResourceSettings
from airflow_stepops.settings.base import BaseStepOperatorConfig, BaseStepOperatorSettings, ContainerStepSettings


class _JobKeys(TypedDict):
    flavor: str
    job_id: str


class JobHandle(_JobKeys, total=False):
    """A submitted job as JSON: kept in the task state store and in the trigger's kwargs, so it must
    outlive the process that made it. The first group is what the shared lifecycle reads."""

    output_uri: str
    conn_id: str
    try_number: int
    submitted_at: float  # set by the operator
    attached_by_try: int  # set by the operator: the try that waits on the job now
    attempt: int  # set by the operator: the attempt within the try (preemptions and failover start new ones)
    candidate: int  # set by the operator: the index of the step operator in the step's list
    on_demand: bool  # the attempt runs on on-demand capacity
    preemptions: int  # set by the operator: preemptions (and capacity failures) before this attempt
    history: list[dict[str, Any]]  # set by the operator: the attempts before this one, for the summary
    cost: dict[str, Any]  # set by the operator: the attempt's price and its share of max_cost (cost.AttemptCost)
    order: list[str]  # set by the operator: the step operators in the order they are tried
    inputs: list[str]  # set by the operator: the URIs of the artifacts the step reads (lineage)
    max_queue_seconds: float | None  # the trigger stops a job queued longer (no service mechanism for it)
    spot: bool
    instance_type: str | None
    # kubernetes
    namespace: str
    step: str
    transport: str
    unschedulable_timeout: float
    start_timeout: float
    memory_limit: str | None
    # sagemaker, vertex
    region: str
    name: str
    project: str
    location: str
    machine_type: str | None
    # azureml
    job_tier: str | None
    compute: str | None
    studio_url: str | None
    # local
    job_dir: str
    host: str
    # modal
    app_name: str
    spawned_at: float
    spawn_key: str
    function_id: str | None
    environment: str | None
    timeout: int
    gpu: Any
    memory: int | None
    step_digest: str


#: ``JobStatus.details["reason"]`` of a job that failed for want of capacity (state FAILED): the service had none,
#: the quota was spent, the pod could not be scheduled, or the job stayed queued past ``max_queue_seconds``. Nothing
#: of the step ran: with a list of step operators, the step moves on to the next one. A job that lost its capacity
#: while running is PREEMPTED (reason "preempted") instead.
CAPACITY_REASONS = frozenset({"insufficient_capacity", "stockout", "quota_exceeded", "unschedulable", "queue_timeout"})


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    PREEMPTED = "preempted"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self not in (JobState.QUEUED, JobState.RUNNING)


@dataclass
class JobStatus:
    state: JobState
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state.value, "message": self.message, "details": self.details}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobStatus:
        return cls(JobState(data["state"]), data.get("message", ""), data.get("details") or {})


@dataclass
class StepSpec:
    """Everything a backend needs to run one step; built by the operator, rendered by the hook."""

    identity: StepIdentity
    bundle_uri: str
    output_uri: str
    resources: ResourceSettings
    settings: BaseStepOperatorSettings
    refs: list[ArtifactRef] = field(default_factory=list)
    task_label: str = ""
    #: the task's execution_timeout: Airflow enforces it, backends may add it as their own backstop
    timeout_seconds: float | None = None
    #: run on on-demand capacity even where the settings ask for spot (escalation after preemptions)
    on_demand: bool = False
    #: how long the job may wait for capacity before it counts as a capacity failure (None: no limit of ours)
    max_queue_seconds: float | None = None
    #: the attempt's price (set by the operator where it needs it: max_cost, estimates)
    price: Price | None = field(default=None, repr=False, compare=False)
    #: the longest this attempt may run within what ``max_cost`` leaves it (None: no max_cost)
    cost_seconds: int | None = None
    #: the validated backend request, built once by ``StepOperatorHook.prepare``
    request: Any = field(default=None, repr=False, compare=False)


    def backstop(self, limit: float | None, *, timeout_margin: int | None = 60) -> int | None:
        """The runtime limit a backend enforces, the smallest of: ``limit`` (the settings' or the service's own),
        the task's execution_timeout plus ``timeout_margin`` (Airflow enforces it; the backend's copy stops the
        step when Airflow cannot; None: not added) and the runtime ``max_cost`` leaves the attempt."""
        timeout = math.ceil(self.timeout_seconds) + timeout_margin if self.timeout_seconds and \
            timeout_margin is not None else None
        found = [int(value) for value in (limit, timeout, self.cost_seconds) if value]
        return min(found) if found else None


_Settings = TypeVar("_Settings", bound=BaseStepOperatorSettings)


def with_queue_limit(handle: JobHandle, spec: StepSpec) -> JobHandle:
    """``handle`` carrying the step's ``max_queue_seconds``, which the trigger enforces while the job is queued."""
    if spec.max_queue_seconds is not None:
        handle["max_queue_seconds"] = spec.max_queue_seconds
    return handle


def capacity_failure(message: str, reason: str, details: dict[str, Any] | None = None) -> JobStatus:
    """A job that failed for want of capacity (nothing of the step ran): FAILED with ``reason`` in
    ``CAPACITY_REASONS``."""
    if reason not in CAPACITY_REASONS:
        raise ValueError(f"reason {reason!r} is not one of {sorted(CAPACITY_REASONS)}")
    return JobStatus(JobState.FAILED, message, {**(details or {}), "reason": reason})


def settings_as(spec: StepSpec, model: type[_Settings]) -> _Settings:
    """The step's settings as the hook's flavor reads them (the operator picked them for this flavor)."""
    if not isinstance(spec.settings, model):
        raise StepOperatorConfigError(f"settings: expected {model.__name__}, got {type(spec.settings).__name__}")
    return spec.settings


class StepOperatorHook(BaseHook, ABC):
    """Base hook of one flavor, bound to a registered step operator (an Airflow connection).

    A flavor implements the abstract methods; a hook class missing one cannot be instantiated."""

    #: a flavor's hook names only this; Airflow's conn_type, default_conn_name and hook_name derive from it
    flavor: ClassVar[str] = ""
    conn_name_attr = "step_operator_conn_id"
    default_conn_name = ""
    conn_type = ""
    hook_name = ""
    #: seconds between status polls unless the task sets poll_interval
    default_poll_interval: ClassVar[float] = 10.0
    #: first poll delay after a new job; doubles up to the poll interval (cloud APIs: no fast start)
    min_poll_interval: ClassVar[float] = 10.0
    #: seconds a stopped job may still be billed while the service stops it: ``max_cost`` keeps them in reserve
    stop_billing_seconds: ClassVar[int] = 0

    @property
    def log_settle_seconds(self) -> float:
        """Seconds a log service may still deliver lines after the job ended (ingestion delay): the trigger
        reads once more after this long before it reports the end, so late last lines are not lost."""
        return 0.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A flavor's hook (one that names its flavor) implements the whole contract, checked as it is
        defined rather than when a step first runs."""
        super().__init_subclass__(**kwargs)
        missing = sorted(name for name in StepOperatorHook.__abstractmethods__
                         if getattr(getattr(cls, name), "__isabstractmethod__", False))
        if cls.flavor and missing:
            raise TypeError(f"{cls.__qualname__} (flavor {cls.flavor!r}) does not implement the hook contract: "
                            f"{', '.join(missing)} missing")
        if "flavor" in cls.__dict__:
            flavor = get_flavor(cls.flavor)
            cls.conn_type, cls.default_conn_name, cls.hook_name = (flavor.conn_type, flavor.default_conn_id,
                                                                   flavor.hook_name)

    def __init__(self, step_operator_conn_id: str | None = None,
                 config: BaseStepOperatorConfig | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step_operator_conn_id = step_operator_conn_id or self.default_conn_name
        if config is not None:
            self.__dict__["config"] = config

    @cached_property
    def config(self) -> BaseStepOperatorConfig:
        from airflow_stepops.connections import load_config

        return load_config(self.step_operator_conn_id, self.flavor)[1]

    def image(self, spec: StepSpec) -> str | None:
        """The image the step runs in: the configured one, else the flavor's default for the workers' Python
        (None: the flavor runs no image of ours)."""
        configured = getattr(spec.settings, "image", None) or getattr(self.config, "image", None)
        return configured or (self.default_image(spec) if isinstance(spec.settings, ContainerStepSettings) else None)

    def default_image(self, spec: StepSpec) -> str:
        """Docker Hub's slim image of the workers' Python; a flavor whose service cannot pull it says otherwise."""
        from airflow_stepops.images import python_image

        return python_image()

    def spot(self, spec: StepSpec) -> bool:
        """Whether the step's request runs on spot/preemptible capacity when ``spec.on_demand`` is False (the
        default escalation policy depends on it)."""
        return False

    def check_on_demand(self, spec: StepSpec) -> None:
        """Refuse (StepOperatorConfigError) a step whose escalation to on-demand capacity this step operator cannot
        honour as configured, before anything is submitted."""

    def price(self, spec: StepSpec) -> Price:
        """What an hour of the attempt ``spec`` describes costs on this step operator (spot or on-demand as it
        runs): the connection's ``prices`` where they name it, else the flavor's table; ``Price.missing`` (with the
        reason) where neither knows."""
        return Price.missing(f"the {self.flavor} flavor has no price table")

    def prices(self) -> Prices | None:
        """The connection's ``prices`` (read from their file where they name one)."""
        from pydantic import ValidationError

        from airflow_stepops.settings.base import format_validation_error

        try:
            return overrides(self.config.prices)
        except ValidationError as err:
            raise StepOperatorConfigError(format_validation_error(err, f"{self.step_operator_conn_id}: prices")) \
                from None
        except ValueError as exc:
            raise StepOperatorConfigError(f"{self.step_operator_conn_id}: {exc}") from None

    def max_runtime(self, spec: StepSpec) -> int | None:
        """The longest the backend lets the attempt run (its request's limit; None: none)."""
        return spec.backstop(spec.settings.max_runtime_in_seconds)

    def requirements_cache(self, spec: StepSpec) -> str | None:
        """A directory the job sees that outlives it, where installed requirements wait for the next job with the
        same ones (``Env.REQUIREMENTS_CACHE``); None where the backend keeps nothing between jobs."""
        return None

    def install_plan(self, spec: StepSpec, requirements: str) -> dict[str, Any]:
        """What the job installs before the step runs, for ``stepops render``."""
        import cloudpickle

        cache = self.requirements_cache(spec)
        from airflow_stepops.runtime.protocol import masked

        return {"requirements": [line for line in masked(requirements).splitlines() if line.strip()],
                "cloudpickle": f"{cloudpickle.__version__}, installed when the image has none or another minor "
                               "version",
                "cache": cache or "none: this step operator keeps nothing between jobs, each job installs"}

    def artifact_root(self) -> Any:
        """Where bundles and results go; no network (``stepops render`` builds a spec with it)."""
        return store_path(self.config.artifact_store or default_local_store())

    def check_store(self) -> None:
        """Refuse a store whose bucket or container does not exist, before anything is written to it."""
        check_bucket(self.artifact_root())

    # ---- to implement per flavor ------------------------------------------------------------
    @abstractmethod
    def build_request(self, spec: StepSpec) -> Any:
        """The backend request ``submit`` sends, validated: a bad setting raises StepOperatorConfigError."""

    @abstractmethod
    def find_job(self, identity: StepIdentity) -> JobHandle | None:
        """The job of exactly this identity (same try) if it exists: re-attach instead of submitting."""

    @abstractmethod
    def submit(self, spec: StepSpec) -> JobHandle:
        """Start the job of ``prepare(spec)``; the operator has looked for an existing one already."""

    @abstractmethod
    def get_status(self, handle: JobHandle) -> JobStatus: ...

    @abstractmethod
    def cancel(self, handle: JobHandle) -> None: ...

    def prepare(self, spec: StepSpec) -> Any:
        """The step's request, built and validated once per submission: the operator prepares it before
        anything is written or started, ``submit`` sends the same one."""
        if spec.request is None:
            spec.request = self.build_request(spec)
        return spec.request

    def render(self, spec: StepSpec) -> dict[str, Any]:
        """The exact request that ``submit`` would send, as JSON (for ``stepops render``)."""
        return dict(self.build_request(spec))

    def read_logs(self, handle: JobHandle, cursor: Any) -> tuple[list[str], Any]:
        """New log lines since ``cursor`` and the cursor to pass next time (``aread_logs`` runs it in a
        thread unless the flavor reads its logs asynchronously)."""
        return [], cursor

    def console_url(self, handle: JobHandle) -> str | None:
        return None

    def cost_url(self, handle: JobHandle) -> str | None:
        """The service's billing console, where the job's charges show (None: the service bills nothing itself)."""
        return None

    def collect_output(self, handle: JobHandle) -> None:
        """Bring a finished job's output into the artifact store, for backends that return it
        some other way (the Kubernetes pod log); the operator calls it before reading the result."""

    # ---- async side, used by triggers; default to the sync calls in a thread ----------------
    async def aget_statuses(self, handles: list[JobHandle]) -> list[JobStatus | BaseException]:
        """Status of many jobs at once, in order: shared polling calls this once per round per
        backend. A job whose status cannot be read gets its exception in its place."""
        return list(await asyncio.gather(*(asyncio.to_thread(self.get_status, h) for h in handles),
                                         return_exceptions=True))

    async def acancel(self, handle: JobHandle) -> None:
        await asyncio.to_thread(self.cancel, handle)

    async def aread_logs(self, handle: JobHandle, cursor: Any) -> tuple[list[str], Any]:
        return await asyncio.to_thread(self.read_logs, handle, cursor)

    def polling_key(self) -> tuple[Any, ...]:
        """Triggers whose hooks share this key share one status-polling loop."""
        return (type(self).__module__, type(self).__qualname__, self.step_operator_conn_id)
