"""``StepOperator``: the whole lifecycle of one step, shared by every flavor.

prepare (validate, bundle) -> submit exactly once (or re-attach) -> wait (deferred by default, the
same trigger code polls in-process when ``deferrable=False``) -> finish (result, remote error or
preemption) -> stop the remote job on kill, mark-failed and timeouts.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, cast

from airflow.sdk import BaseOperator

from airflow_stepops.argcheck import check_literal_args_picklable, check_step_callable
from airflow_stepops.capacity import CapacityPolicy
from airflow_stepops.exceptions import (
    StepCapacityError,
    StepCostLimitError,
    StepFailedError,
    StepOperatorConfigError,
    StepPreemptedError,
    StepTimeoutError,
    rebuild_remote_error,
)
from airflow_stepops.flavors import get_flavor
from airflow_stepops.links import StepCostLink, StepJobLink
from airflow_stepops.resources import ResourceSettings
from airflow_stepops.runtime.protocol import Env
from airflow_stepops.settings.step import StepSettings, parse_step_settings

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_stepops.bundle import StepIdentity
    from airflow_stepops.hooks.base import JobHandle, StepOperatorHook, StepSpec
    from airflow_stepops.triggers.base import StepEvent

#: task_state_store key of the current job handle (kept across retries of one task instance)
STATE_KEY = "stepops_job"
#: task_state_store key of the run key: unique to this incarnation of the dag run, stable across its tries
RUN_KEY = "stepops_run_key"
#: XCom key with flavor, job id and console URL (read by the extra link)
XCOM_JOB_KEY = "stepops_job"
#: ``next_method`` of a task Airflow resumes only to fail it, and the ``error`` it gives when the trigger timed out
TRIGGER_FAIL = "__fail__"
TRIGGER_TIMEOUT = "Trigger timeout"
#: Airflow's trigger timeout passes this long after the step's execution_timeout
DEFER_TIMEOUT_MARGIN_SECONDS = 30
#: how a list of step operators is ordered: as given, or by the step's price on each
FAILOVER_ORDERS = ("given", "cheapest")


def _default_deferrable() -> bool:
    """Deferrable unless switched off: ``[stepops] default_deferrable`` or an explicit
    ``AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE`` (the generated airflow.cfg always spells out
    ``[operators] default_deferrable = false``, so only the environment variable shows intent)."""
    explicit = os.environ.get("AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE")
    if explicit is not None:
        return explicit.strip().lower() in ("1", "true", "t", "yes", "y", "on")
    from airflow_stepops._compat import airflow_conf

    return airflow_conf().getboolean("stepops", "default_deferrable", fallback=True)


class StepOperator(BaseOperator):
    """Run ``python_callable`` on a registered step operator instead of on this worker.

    :param python_callable: the function to run remotely (pickled with cloudpickle)
    :param op_args: positional arguments (templated; XComArgs resolved on the worker)
    :param op_kwargs: keyword arguments (templated)
    :param step_operator: id of an Airflow connection of type ``stepops_<flavor>``
    :param settings: ZenML-style dict: ``{"resources": ResourceSettings(...),
        "step_operator.<flavor>": <Flavor>StepOperatorSettings(...)}``
    :param resources: shorthand for ``settings["resources"]``
    :param deferrable: wait in the triggerer (default True, honouring ``[operators] default_deferrable``)
    :param poll_interval: seconds between status polls (default: the flavor's own, e.g. 0.5 for local)
    :param preemption_retries, on_preemption, max_queue_seconds, max_cost: the capacity and cost policy
        (``airflow_stepops.capacity``), over the flavor's settings of the same names
    :param failover_order: ``"given"`` (default) tries a list of step operators in its order, ``"cheapest"`` in the
        order of their prices for the step (those without a known price last)
    """

    #: set by flavor subclasses; None means "whatever flavor the connection has"
    flavor: ClassVar[str | None] = None

    template_fields: Sequence[str] = ("op_args", "op_kwargs")
    template_fields_renderers = {"op_args": "py", "op_kwargs": "py"}
    shallow_copy_attrs: Sequence[str] = ("python_callable",)
    operator_extra_links = (StepJobLink(), StepCostLink())
    ui_color = "#d8e8f8"
    # class-level defaults: per-instance assignment through BaseOperator.__setattr__ costs parse time
    _handle: JobHandle | None = None
    _hook: StepOperatorHook | None = None
    _state_store: Any = None
    step_settings: StepSettings
    step_operators: list[str]
    capacity: CapacityPolicy
    failover_order: str
    deferrable: bool | None
    poll_interval: float | None

    def __init__(
        self,
        *,
        python_callable: Callable[..., Any],
        op_args: Collection[Any] | None = None,
        op_kwargs: Mapping[str, Any] | None = None,
        step_operator: str | Sequence[str] | None = None,
        settings: Mapping[str, Any] | None = None,
        resources: ResourceSettings | Mapping[str, Any] | None = None,
        deferrable: bool | None = None,
        poll_interval: float | None = None,
        preemption_retries: int | None = None,
        on_preemption: str | None = None,
        max_queue_seconds: float | None = None,
        max_cost: float | None = None,
        failover_order: str = "given",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not callable(python_callable):
            raise StepOperatorConfigError(f"python_callable: expected a function, got {type(python_callable).__name__}")
        check_step_callable(python_callable)
        candidates = _candidates(step_operator, self.flavor)
        if poll_interval is not None and poll_interval <= 0:
            raise StepOperatorConfigError(f"poll_interval: must be > 0 seconds, got {poll_interval!r}")
        if failover_order not in FAILOVER_ORDERS:
            raise StepOperatorConfigError(f"failover_order: {failover_order!r} is not one of "
                                          f"{', '.join(map(repr, FAILOVER_ORDERS))}")
        self.python_callable = python_callable
        self.op_args: Collection[Any] = list(op_args or [])
        self.op_kwargs: Mapping[str, Any] = dict(op_kwargs or {})
        self.step_operator = candidates[0]
        # plain attribute writes: BaseOperator.__setattr__ bookkeeping is only needed for template
        # fields and reassigned init arguments, and it is a noticeable share of DAG parse time
        object.__setattr__(self, "step_operators", candidates)
        object.__setattr__(self, "capacity", _capacity_arguments(preemption_retries=preemption_retries,
                                                                 on_preemption=on_preemption,
                                                                 max_queue_seconds=max_queue_seconds,
                                                                 max_cost=max_cost))
        object.__setattr__(self, "failover_order", failover_order)
        object.__setattr__(self, "step_settings", parse_step_settings(settings, resources, flavor=self.flavor))
        for flavor in self.step_settings.by_flavor:  # a missing or malformed requirements file: a DAG import error
            self.requirements_text(flavor)
        object.__setattr__(self, "deferrable", deferrable)
        object.__setattr__(self, "poll_interval", poll_interval)
        if not kwargs.get("_airflow_mapped_validation_only"):
            check_literal_args_picklable(python_callable, self.op_args, self.op_kwargs)

    # ---- prepare ----------------------------------------------------------------------------
    def requirements_text(self, flavor: str) -> str:
        """The ``requirements`` of the step's ``flavor`` settings as the text its job installs; a requirements file
        is read relative to the DAG file's folder."""
        value = getattr(self.step_settings.by_flavor.get(flavor), "requirements", None)
        if not value:
            return ""
        from airflow_stepops.requirements import requirements_text

        folder = self.dag.folder if self.has_dag() else None
        try:
            return requirements_text(value, folder)
        except ValueError as exc:
            raise StepOperatorConfigError(f"settings['step_operator.{flavor}'].{exc}") from None

    def get_hook(self, step_operator: str | None = None) -> StepOperatorHook:
        """The hook of ``step_operator`` (default: the step's first), bound to its connection (validated)."""
        if self._hook is not None and step_operator in (None, self._hook.step_operator_conn_id):
            return self._hook
        conn_id = step_operator or self.step_operator
        hooks: dict[str, StepOperatorHook] = self.__dict__.setdefault("_hooks", {})
        if conn_id not in hooks:
            from airflow_stepops.connections import load_config

            flavor, config = load_config(conn_id, self.flavor)
            hooks[conn_id] = get_flavor(flavor).hook()(step_operator_conn_id=conn_id, config=config)
        if conn_id == self.step_operator:
            self._hook = hooks[conn_id]
        return hooks[conn_id]

    def policy(self, hook: StepOperatorHook) -> CapacityPolicy:
        """The capacity policy on ``hook``'s step operator: the arguments over its flavor's settings."""
        return self.capacity.over(self.step_settings.for_flavor(hook.flavor))

    def check_step_operators(self, identity: StepIdentity) -> None:
        """Before anything is submitted: every step operator of the step exists, the step's settings are for their
        flavors, where a preemption may escalate to on-demand capacity, that step operator can provide it, and the
        step fits in its ``max_cost`` there. Logs what each attempt may cost, and orders the step operators by
        price when ``failover_order="cheapest"``."""
        from airflow_stepops.cost import describe, estimate

        hooks = [self.get_hook(conn) for conn in self.step_operators]
        self.step_settings.check_flavors({hook.step_operator_conn_id: hook.flavor for hook in hooks})
        rates: dict[str, tuple[str, float]] = {}
        cheapest = self.failover_order == "cheapest" and len(hooks) > 1
        for index, hook in enumerate(hooks):
            policy, spec = self.policy(hook), self.build_spec(hook, identity, [], priced=True)
            if index or cheapest:  # the first one's request is built before its bundle is written
                hook.build_request(spec)
            self.check_cost(hook, spec)
            self.log.info("Cost on step operator %r: %s", hook.step_operator_conn_id, describe(estimate(hook, spec)))
            if spec.price is not None and spec.price.per_hour is not None:
                rates[hook.step_operator_conn_id] = (spec.price.currency, spec.price.per_hour)
            if policy.on_demand_after(policy.retries, hook.spot(spec)):
                escalated = self.build_spec(hook, identity, [], preemptions=policy.retries, priced=True)
                hook.check_on_demand(escalated)
                self.check_cost(hook, escalated)
                self.log.info("Cost on step operator %r once escalated to on-demand capacity: %s",
                              hook.step_operator_conn_id, describe(estimate(hook, escalated)))
        if cheapest:  # those without a price, or priced in another currency than the first priced one, last
            currency = next((rates[conn][0] for conn in self.step_operators if conn in rates), "")
            order = sorted(self.step_operators, key=lambda conn: (rates.get(conn, ("", 0.0))[0] != currency,
                                                                  rates.get(conn, ("", 0.0))[1]))
            self.log.info("Step operators in the order of their prices for the step: %s", ", ".join(order))
            object.__setattr__(self, "step_operators", order)

    def check_cost(self, hook: StepOperatorHook, spec: StepSpec, spent: float = 0.0) -> None:
        """Refuse (StepCostLimitError) an attempt ``max_cost`` cannot pay for: its price is unknown, or what is left
        of the limit does not cover the service's minimum charge."""
        limit = self.policy(hook).max_cost
        if limit is None or spec.price is None:
            return
        where = f"step operator {hook.step_operator_conn_id!r}"
        if spec.price.per_hour is None:
            raise StepCostLimitError(
                f"max_cost={limit:g}: the price of the step on {where} is unknown ({spec.price.unknown}); the step "
                "is not run rather than run without its cost limit")
        if not spec.cost_seconds:
            left = f"what is left of max_cost={limit:g} after earlier attempts ({limit - spent:.6f})" if spent \
                else f"max_cost={limit:g}"
            stopping = f", and {hook.stop_billing_seconds} s billed while it is stopped" if hook.stop_billing_seconds \
                else ""
            raise StepCostLimitError(
                f"{left} does not pay for the least the step can be billed on {where}: "
                f"{spec.price.basis} at {spec.price.per_hour:g} {spec.price.currency}/h, billed per "
                f"{spec.price.increment_seconds} s, at least {max(spec.price.minimum_seconds, 1)} s{stopping}")

    def call_arguments(self, context: Context) -> tuple[list[Any], dict[str, Any]]:
        """Arguments for the callable; the decorated variant adds context-keyed parameters."""
        return list(self.op_args), dict(self.op_kwargs)

    @property
    def task_label(self) -> str:
        return f"{self.dag_id}.{self.task_id}" if self.has_dag() else self.task_id

    def build_spec(self, hook: StepOperatorHook, identity: StepIdentity, refs: list[Any],
                   preemptions: int = 0, spent: float = 0.0, priced: bool = False) -> StepSpec:
        """The step's spec on ``hook``'s step operator; after ``preemptions`` preemptions it may be on-demand. Priced
        (``spec.price``) when asked or under ``max_cost``, which with ``spent`` by earlier attempts gives the attempt
        its runtime (``spec.cost_seconds``)."""
        from airflow_stepops.hooks.base import StepSpec

        prefix = identity.prefix(hook.artifact_root())
        timeout = self.execution_timeout
        spec = StepSpec(identity=identity, bundle_uri=str(prefix / "bundle"), output_uri=str(prefix / "output"),
                        resources=self.step_settings.resources, settings=self.step_settings.for_flavor(hook.flavor),
                        refs=refs, task_label=self.task_label,
                        timeout_seconds=timeout.total_seconds() if timeout else None)
        policy = self.policy(hook)
        spec.max_queue_seconds = policy.max_queue_seconds
        spec.on_demand = bool(preemptions) and policy.on_demand_after(preemptions, hook.spot(spec))
        if priced or policy.max_cost is not None:
            spec.price = hook.price(spec)
        if policy.max_cost is not None and spec.price is not None:  # what the service bills to stop it kept back
            spec.cost_seconds = max(spec.price.seconds_within(policy.max_cost - spent) - hook.stop_billing_seconds,
                                    0) or None
        return spec

    def write_step_bundle(self, context: Context, hook: StepOperatorHook, identity: StepIdentity,
                          preemptions: int = 0, spent: float = 0.0) -> StepSpec:
        from airflow_stepops.bundle import build_meta, pickle_payload, replace_refs, write_bundle

        args, kwargs = self.call_arguments(context)
        refs: list[Any] = []
        args, kwargs = replace_refs(args, refs), replace_refs(kwargs, refs)
        spec = self.build_spec(hook, identity, refs, preemptions, spent, priced=True)
        self.check_cost(hook, spec, spent)
        payload = pickle_payload(self.python_callable, args, kwargs)
        meta = build_meta(identity, multiple_outputs=bool(self.multiple_outputs),
                          max_result_bytes=hook.config.max_result_bytes,
                          inline_result_max_bytes=hook.config.inline_result_max_bytes, task_label=self.task_label,
                          requirements=self.requirements_text(hook.flavor))
        hook.prepare(spec)  # the whole backend request, validated before anything is written or started
        hook.check_store()
        from airflow_stepops.artifacts import store_path

        write_bundle(store_path(spec.bundle_uri), payload, meta)
        self.log.info("Wrote step bundle (%d bytes, %d input artifact(s)) to %s", len(payload), len(refs),
                      spec.bundle_uri)
        return spec

    # ---- submit exactly once ----------------------------------------------------------------
    def _reattachable(self, hook: StepOperatorHook, handle: JobHandle, *, allow_succeeded: bool) -> bool:
        # a failing status call raises: submitting a second job while the first may run is worse
        status = hook.get_status(handle)
        from airflow_stepops.hooks.base import JobState

        if not status.state.terminal or (allow_succeeded and status.state is JobState.SUCCEEDED):
            self.log.info("Re-attaching to job %s of try %s (%s)", handle.get("job_id"),
                          handle.get("try_number"), status.state.value)
            return True
        return False

    def find_or_submit(self, context: Context) -> JobHandle:
        """The job to wait for: an earlier try's still worth it, else attempt 1 of this try (exactly once)."""
        from airflow_stepops.bundle import StepIdentity

        store = context.get("task_state_store")  # type: ignore[call-overload]
        identity = StepIdentity.from_context(context, _run_key(store, context))
        handle = self._earlier_job(context, _stored_handle(store), identity)
        if handle is None:
            self.check_step_operators(identity)
            return self._attempt(context, identity, candidate=0, attempt=1, preemptions=0, history=[])
        handle = {**handle, "attached_by_try": identity.try_number}
        if store is not None:  # an older try still being killed must not stop it now
            store.set(STATE_KEY, cast(Any, handle))
        return handle

    def _earlier_job(self, context: Context, previous: JobHandle | None, identity: StepIdentity) -> JobHandle | None:
        """An earlier try's job still worth waiting for: the stored one (or, when the worker died between storing
        an attempt and storing its job, the job of that attempt found by its deterministic name), else (no stored
        handle: Airflow < 3.3, or the worker died between submit and storing it) one found by its name."""
        if previous is not None and previous.get("conn_id") in self.step_operators:
            hook = self.get_hook(previous["conn_id"])
            if previous.get("pending"):
                attempt = identity.for_try(int(previous.get("try_number") or identity.try_number)).with_attempt(
                    int(previous.get("attempt") or 1))
                found = hook.find_job(attempt)
                if found is None:
                    return None
                previous = cast("JobHandle", {**{k: v for k, v in previous.items() if k != "pending"}, **found,
                                              "cost": self._cost_of(context, hook, attempt, previous)})
            return previous if self._reattachable(hook, previous, allow_succeeded=True) else None
        hook = self.get_hook()
        for try_number in range(identity.try_number - 1, 0, -1):
            earlier = hook.find_job(identity.for_try(try_number))
            if earlier and self._reattachable(hook, earlier, allow_succeeded=False):
                return cast("JobHandle", {**earlier, "conn_id": self.step_operator, "candidate": 0, "attempt": 1})
        return None

    def _cost_of(self, context: Context, hook: StepOperatorHook, identity: StepIdentity, place: JobHandle
                 ) -> dict[str, Any]:
        """The price of the attempt ``place`` stood for (re-attaching to its job after its worker died before the job
        was stored), and its share of max_cost, as its submission computed them."""
        from airflow_stepops.cost import handle_cost, spent

        charges = spent(self._charges(context, place.get("history") or []))
        spec = self.build_spec(hook, identity, [], int(place.get("preemptions") or 0), charges, priced=True)
        return handle_cost(spec, self.policy(hook).max_cost, charges, hook.max_runtime(spec))

    def _attempt(self, context: Context, identity: StepIdentity, *, candidate: int, attempt: int, preemptions: int,
                 history: list[dict[str, Any]]) -> JobHandle:
        """Submit (or find: exactly once) attempt ``attempt`` of this try on step operator ``candidate``; a step
        operator that refuses it for want of capacity passes it on to the next one."""
        from airflow_stepops.cost import spent
        from airflow_stepops.exceptions import StepCapacityError

        store = context.get("task_state_store")  # type: ignore[call-overload]
        conn_id = self.step_operators[candidate]
        hook = self.get_hook(conn_id)
        identity = identity.with_attempt(attempt)
        place = {"conn_id": conn_id, "candidate": candidate, "attempt": attempt, "preemptions": preemptions,
                 "history": history, "try_number": identity.try_number, "order": list(self.step_operators)}
        if store is not None:  # a worker dying before the job is stored leaves this: the next try looks it up
            store.set(STATE_KEY, cast(Any, {**place, "pending": True, "flavor": hook.flavor}))
        try:
            handle = self._job_of_this_try(context, hook, identity, preemptions, spent(self._charges(context, history)))
        except StepCapacityError as exc:
            record = {"attempt": attempt, "step_operator": conn_id, "flavor": hook.flavor, "job_id": None,
                      "outcome": exc.reason, "message": str(exc)[:500]}
            if candidate + 1 < len(self.step_operators):
                self.log.warning("Step operator %r has no capacity for the step (%s): %s; moving on to %r", conn_id,
                                 exc.reason, exc, self.step_operators[candidate + 1])
                return self._attempt(context, identity, candidate=candidate + 1, attempt=attempt + 1,
                                     preemptions=preemptions, history=[*history, record])
            if preemptions < self.policy(hook).retries:  # the last step operator: as its jobs' capacity failures
                self.log.warning("Step operator %r has no capacity for the step (%s): %s; trying it again as attempt "
                                 "%d", conn_id, exc.reason, exc, attempt + 1)
                return self._attempt(context, identity, candidate=candidate, attempt=attempt + 1,
                                     preemptions=preemptions + 1, history=[*history, record])
            raise StepCapacityError(f"{exc} ({_passed_over([*history, record])})", exc.reason) from exc
        handle = cast("JobHandle", {**handle, **place, "attached_by_try": identity.try_number})
        if store is not None:
            store.set(STATE_KEY, cast(Any, handle))
        return handle

    def _job_of_this_try(self, context: Context, hook: StepOperatorHook, identity: StepIdentity,
                         preemptions: int = 0, spent: float = 0.0) -> JobHandle:
        from airflow_stepops.cost import handle_cost

        found = hook.find_job(identity)
        spec = None if found is not None else self.write_step_bundle(context, hook, identity, preemptions, spent)
        if spec is None:  # the job of this attempt exists: its price as the attempt was submitted
            spec = self.build_spec(hook, identity, [], preemptions, spent, priced=True)
        cost = handle_cost(spec, self.policy(hook).max_cost, spent, hook.max_runtime(spec))
        if found is not None:
            self.log.info("Job %s of this try already exists: re-attaching", found.get("job_id"))
            return cast("JobHandle", {**found, "cost": cost})
        # the hook puts max_queue_seconds in the handle where the trigger, not the service, enforces it
        handle = {**hook.submit(spec), "submitted_at": time.time(), "on_demand": spec.on_demand, "cost": cost,
                  "inputs": [ref.uri for ref in spec.refs]}  # for lineage
        self.log.info("Submitted step %s to %s step operator %r as job %s%s", self.task_label, hook.flavor,
                      hook.step_operator_conn_id, handle.get("job_id"),
                      f" (attempt {identity.attempt}{', on-demand' if spec.on_demand else ''})"
                      if identity.attempt > 1 else "")
        return cast("JobHandle", handle)

    # ---- the lifecycle ----------------------------------------------------------------------
    def execute(self, context: Context) -> Any:
        object.__setattr__(self, "_state_store", context.get("task_state_store"))  # type: ignore[call-overload]
        return self._wait(context, self.find_or_submit(context))

    def _wait(self, context: Context, handle: JobHandle) -> Any:
        """Wait for ``handle``'s job: deferred (the trigger), or here polling with the same code."""
        self._follow_order(handle)
        hook = self.get_hook(handle.get("conn_id"))
        self._handle = handle
        self._record(context, hook, handle, {}, final=False)
        trigger = self.make_trigger(hook, handle, context)
        deferrable = _default_deferrable() if self.deferrable is None else self.deferrable
        if deferrable:
            self._warn_if_no_trigger_on_kill()
            self.defer(trigger=trigger, method_name="execute_complete", timeout=self._defer_timeout(trigger))
        self.log.info("Waiting for job %s on this worker (deferrable=False)", handle.get("job_id"))
        try:
            event = asyncio.run(_first_event(trigger))
        except BaseException:
            self.log.warning("Stopping remote job %s", handle.get("job_id"))
            self._cancel_quietly(hook, handle)
            raise
        return self.execute_complete(context, event)

    def _next_attempt(self, context: Context, hook: StepOperatorHook, event: StepEvent) -> JobHandle | None:
        """The job that follows a preempted one (within the preemption budget) or one that found no capacity (on
        the next step operator, else within the budget), or None when the event is the step's outcome."""
        from airflow_stepops.bundle import StepIdentity
        from airflow_stepops.hooks.base import CAPACITY_REASONS

        handle, status, details = event["handle"], event["status"], event.get("details") or {}
        capacity = status == "failed" and details.get("reason") in CAPACITY_REASONS
        if status != "preempted" and not capacity:
            return None
        record = _attempt_record(hook, handle, event)
        history = [*(handle.get("history") or []), record]
        candidate, attempt = int(handle.get("candidate") or 0), int(handle.get("attempt") or 1)
        preemptions = int(handle.get("preemptions") or 0)
        store = context.get("task_state_store")  # type: ignore[call-overload]
        identity = StepIdentity.from_context(context, _run_key(store, context))
        if capacity and candidate + 1 < len(self.step_operators):
            self.log.warning("Job %s on %r found no capacity (%s): %s; moving on to step operator %r",
                             handle.get("job_id"), hook.step_operator_conn_id, record["outcome"],
                             event.get("message"), self.step_operators[candidate + 1])
            return self._attempt(context, identity, candidate=candidate + 1, attempt=attempt + 1,
                                 preemptions=preemptions, history=history)
        budget = self.policy(hook).retries
        if preemptions >= budget:
            handle["history"] = history  # the summary lists every attempt
            return None
        self.log.warning("Job %s was %s (%s) after %ss; attempt %d of the preemption budget (preemption_retries="
                         "%d) follows as a new job, resuming from %s", handle.get("job_id"),
                         "preempted" if status == "preempted" else "short of capacity", event.get("message"),
                         record.get("lost_seconds"), preemptions + 1, budget, Env.CHECKPOINT_DIR)
        return self._attempt(context, identity, candidate=candidate, attempt=attempt + 1,
                             preemptions=preemptions + 1, history=history)

    def make_trigger(self, hook: StepOperatorHook, handle: JobHandle, context: Context) -> Any:
        deadline = None
        if self.execution_timeout is not None:
            start = getattr(context["ti"], "start_date", None)
            begun = start.timestamp() if start else time.time()
            deadline = begun + self.execution_timeout.total_seconds()
        trigger_cls = get_flavor(hook.flavor).trigger()
        return trigger_cls(conn_id=hook.step_operator_conn_id, handle=handle,
                           poll_interval=self.poll_interval or hook.default_poll_interval, deadline=deadline)

    @staticmethod
    def _defer_timeout(trigger: Any) -> Any:
        if trigger.deadline is None:
            return None
        from datetime import timedelta

        # the trigger stops the job itself at the deadline; Airflow's own timeout is the backstop when no
        # triggerer ran it in time (resume_execution stops the job then), before the backends' own time limit
        # (execution_timeout + 60 s) stops it as a failure
        return timedelta(seconds=max(trigger.deadline - time.time(), 0) + DEFER_TIMEOUT_MARGIN_SECONDS)

    def _warn_if_no_trigger_on_kill(self) -> None:
        from airflow.triggers.base import BaseTrigger

        if not hasattr(BaseTrigger, "on_kill"):
            self.log.warning(
                "This Airflow has no trigger on_kill (added in 3.3): marking this deferred step failed "
                "will not stop its remote job; upgrade Airflow or run with deferrable=False"
            )

    def execute_complete(self, context: Context, event: StepEvent) -> Any:
        # read leniently: an event a trigger of an older release sent may lack the newer keys
        handle, status, details = event["handle"], event["status"], event.get("details") or {}
        self._handle = handle
        self._follow_order(handle)
        hook = self.get_hook(handle.get("conn_id"))
        self._charge(context, hook, handle, details)  # the attempt ended: its charge is kept whatever follows
        following = self._next_attempt(context, hook, event)
        if following is not None:
            return self._wait(context, following)
        from airflow_stepops.artifacts import store_path
        from airflow_stepops.bundle import read_outcome

        lost: StepFailedError | None = None  # the backend's own word on an output it cannot return
        if status in ("succeeded", "failed"):
            try:
                hook.collect_output(handle)
            except StepFailedError as exc:
                lost = exc
            except Exception:
                self.log.exception("Could not collect the output of job %s", handle.get("job_id"))
        if status == "succeeded":
            outcome = read_outcome(store_path(handle["output_uri"]))
            if outcome is None or not outcome.ok:
                self._forget_job(context)  # a retry must run the step again, not replay this
                if lost is not None:
                    raise lost
                raise StepFailedError(
                    f"job {handle.get('job_id')} succeeded but left no result in {handle['output_uri']}"
                    + _tail(event)
                )
            self.log.info("Step ran as %s job %s on %s in %ss; result: %s", hook.flavor, handle.get("job_id"),
                          outcome.info.get("host"), outcome.info.get("duration_seconds"),
                          _summary(outcome.value))
            self._record(context, hook, handle, details)
            self._forget_job(context)  # a cleared task must run again, not re-use this job
            from airflow_stepops.artifacts import ArtifactRef

            self.__dict__["_result_uri"] = outcome.value.uri if isinstance(outcome.value, ArtifactRef) \
                else handle["output_uri"]
            return outcome.value
        self._record(context, hook, handle, details)
        message = event.get("message") or ""
        cost = handle.get("cost") or {}
        if status == "cost_limit" or (status == "failed" and details.get("reason") == "timed_out"
                                      and cost.get("backend_limit_is_cost")):
            raise StepCostLimitError(
                f"job {handle.get('job_id')} was stopped at max_cost={cost.get('max_cost'):g}: {message}; the step is "
                "not retried (a retry would spend it again)" + _tail(event))
        if status == "timeout":
            raise StepTimeoutError(f"{message} (job {handle.get('job_id')})" + _tail(event))
        if status == "failed" and details.get("reason") == "timed_out":
            raise StepTimeoutError(f"job {handle.get('job_id')}: {message}" + _tail(event))
        if status == "preempted":
            raise StepPreemptedError(
                f"job {handle.get('job_id')} was preempted by {hook.flavor}: {message}; the preemption budget is spent "
                f"(preemption_retries={self.policy(hook).retries}, {len(handle.get('history') or [])} attempts: "
                f"{_passed_over(handle.get('history') or [])}); raise preemption_retries, set on_preemption="
                "'on_demand_last', or add a step operator to the list" + _tail(event)
            )
        from airflow_stepops.hooks.base import CAPACITY_REASONS

        if status == "failed" and details.get("reason") in CAPACITY_REASONS:
            raise StepCapacityError(f"job {handle.get('job_id')} on {hook.step_operator_conn_id!r} found no capacity: "
                                    f"{message}; {_passed_over(handle.get('history') or [])}" + _tail(event),
                                    str(details["reason"]))
        if status == "failed":
            outcome = read_outcome(store_path(handle["output_uri"]))
            if outcome is not None and outcome.error:
                err = outcome.error
                raise rebuild_remote_error(err.get("type", "Exception"), err.get("message", ""),
                                           err.get("traceback", ""))
            raise StepFailedError(f"job {handle.get('job_id')} failed: {message}" + _tail(event))
        if status == "cancelled":
            raise StepFailedError(f"job {handle.get('job_id')} was cancelled: {message}" + _tail(event))
        # status "error": we lost track of the job; stop it rather than let it run unobserved
        self._cancel_quietly(hook, handle)
        raise StepFailedError(f"waiting for job {handle.get('job_id')} failed: {message}" + _tail(event))

    def _follow_order(self, handle: JobHandle) -> None:
        """The step operators in the order the step's first attempt chose (``failover_order="cheapest"``)."""
        if handle.get("order"):
            object.__setattr__(self, "step_operators", list(handle["order"]))

    @staticmethod
    def _forget_job(context: Context) -> None:
        store = context.get("task_state_store")  # type: ignore[call-overload]
        if store is not None:
            store.delete(STATE_KEY)

    def resume_execution(self, next_method: str, next_kwargs: dict[str, Any] | None, context: Context) -> Any:
        if next_method != TRIGGER_FAIL:
            return super().resume_execution(next_method, next_kwargs, context)
        # Airflow ended the deferral without an event of the trigger: its own trigger timeout passed (the
        # backstop to the execution_timeout the trigger enforces: no triggerer ran the trigger in time) or the
        # trigger crashed. Airflow does not call a trigger's on_kill then, so the job still runs: stop it here.
        handle = _stored_handle(context.get("task_state_store"))  # type: ignore[call-overload]
        job_id = handle.get("job_id") if handle is not None else None
        if handle is not None and job_id:
            self._handle = handle
            self.log.warning("The deferral ended without the trigger reporting on job %s: stopping it", job_id)
            hook = self.get_hook(handle.get("conn_id"))
            self._cancel_quietly(hook, handle)
            self._charge(context, hook, handle, {"start_unknown": True})  # it may have run: counted, unpriced
        if (next_kwargs or {}).get("error") != TRIGGER_TIMEOUT:
            return super().resume_execution(next_method, next_kwargs, context)
        stopped = f"remote job {job_id} was stopped" if job_id else "no stored job to stop"
        raise StepTimeoutError(
            f"Airflow's trigger timeout passed before the trigger reported on the step (no triggerer ran it in "
            f"time: is one running, serving task queue {self.queue!r}?); {stopped}"
        )

    def _record(self, context: Context, hook: StepOperatorHook, handle: JobHandle, details: dict[str, Any],
                final: bool = True) -> None:
        """Flavor, job id, console URL and (when finished) durations: XCom for the extra link, and the log."""
        info = {"flavor": hook.flavor, "step_operator": hook.step_operator_conn_id, "job_id": handle.get("job_id"),
                "console_url": hook.console_url(handle), **{k: v for k, v in details.items() if v is not None}}
        if handle.get("attempt", 1) > 1 or handle.get("history"):
            info.update(attempt=handle.get("attempt", 1), on_demand=bool(handle.get("on_demand")),
                        attempts=list(handle.get("history") or []))
        submitted, started, finished = handle.get("submitted_at"), details.get("started_at"), details.get("finished_at")
        if submitted and started:
            info["queued_seconds"] = round(max(started - submitted, 0.0), 3)
        if started and finished:
            info["run_seconds"] = round(finished - started, 3)
        if final:
            info.update(self._costs(context, hook, handle, details), cost_url=hook.cost_url(handle))
        elif (charges := self._charges(context, [])):  # a try that ends before its summary still shows them
            info["charges"] = charges
            self.log.info("Step job summary: %s", info)
        context["ti"].xcom_push(key=XCOM_JOB_KEY, value=info)

    def _costs(self, context: Context, hook: StepOperatorHook, handle: JobHandle, details: dict[str, Any]
               ) -> dict[str, Any]:
        """``cost``: what this try's attempts were billed (the last one's rate and billed time); ``charges``: every
        attempt of every try of the task instance (earlier tries' kept in the task state store), which
        ``stepops cost`` adds up."""
        from airflow_stepops.cost import total

        charges = self._charges(context, handle.get("history") or [], self.__dict__.get("_last_charge"))
        try_number = int(handle.get("attached_by_try") or handle.get("try_number") or 1)
        mine = [c for c in charges if c.get("try") == try_number]
        last = next((c for c in charges if c.get("job_id") == handle.get("job_id")), {})
        cost = total(mine) | {k: v for k, v in last.items() if k in ("rate_per_hour", "basis")}
        amount = cost.get("amount")
        self.log.info("Step cost: %s", f"{amount:.6f} {cost['currency']} ({len(mine)} attempt(s), "
                      f"{cost['billed_seconds']} s billed)" if isinstance(amount, float) else f"{amount} "
                      f"({cost.get('why') or cost.get('by_currency')})")
        return {"cost": cost, "charges": charges}

    def _charge(self, context: Context, hook: StepOperatorHook, handle: JobHandle, details: dict[str, Any]) -> None:
        """Keep the charge of the attempt of ``handle``, which ended, in the task state store."""
        from airflow_stepops.cost import attempt_charge, record_charge

        found = attempt_charge(handle, hook.flavor, details, float(details.get("finished_at") or time.time()))
        self.__dict__["_last_charge"] = found
        record_charge(context.get("task_state_store"), found)  # type: ignore[call-overload]

    @staticmethod
    def _charges(context: Context, history: list[dict[str, Any]], last: dict[str, Any] | None = None
                 ) -> list[dict[str, Any]]:
        """Every ended attempt's charge of the task instance: the task state store's; without one (Airflow < 3.3)
        this try's: the attempts the handle carries and ``last``."""
        from airflow_stepops.cost import stored_charges

        store = context.get("task_state_store")  # type: ignore[call-overload]
        if store is not None:
            return stored_charges(store)
        found = [{"try": r.get("try"), **{k: r.get(k) for k in ("attempt", "step_operator", "flavor", "job_id",
                                                                "on_demand", "ended_at")}, **(r.get("cost") or {})}
                 for r in history]
        return [*found, last] if last else found

    # ---- OpenLineage (read by its provider, when installed) ----------------------------------
    def _channels(self) -> list[str]:
        """Data a step's settings hand its job directly (SageMaker's ``input_channels``)."""
        return [uri for settings in self.step_settings.by_flavor.values()
                for uri in (getattr(settings, "input_channels", None) or {}).values()]

    def get_openlineage_facets_on_start(self) -> Any:
        from airflow_stepops.lineage import operator_lineage

        return operator_lineage(None, inputs=self._channels())

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        from airflow_stepops.lineage import operator_lineage

        result = self.__dict__.get("_result_uri")
        return operator_lineage(self._handle, inputs=self._channels(), outputs=[result] if result else [])

    def get_openlineage_facets_on_failure(self, task_instance: Any) -> Any:
        from airflow_stepops.lineage import operator_lineage

        return operator_lineage(self._handle, inputs=self._channels())

    def _cancel_quietly(self, hook: StepOperatorHook, handle: JobHandle) -> None:
        try:
            hook.cancel(handle)
        except Exception:
            self.log.exception("Could not stop remote job %s", handle.get("job_id"))

    def on_kill(self) -> None:
        if self._handle is None:
            return
        if not self._still_owns_job():
            self.log.info("Task killed, but a newer try has taken over job %s: leaving it running",
                          self._handle.get("job_id"))
            return
        self.log.info("Task killed: stopping remote job %s", self._handle.get("job_id"))
        self._cancel_quietly(self.get_hook(self._handle.get("conn_id")), self._handle)

    def _still_owns_job(self) -> bool:
        """False when a newer try of this task instance re-attached to our job in the meantime."""
        store, handle = self._state_store, self._handle
        mine = handle.get("attached_by_try") if handle else None
        if store is None or handle is None or mine is None:
            return True
        try:
            current = store.get(STATE_KEY)
        except Exception:
            return True
        return not (isinstance(current, dict) and current.get("job_id") == handle.get("job_id")
                    and (current.get("attached_by_try") or 0) > mine)


def _candidates(value: Any, flavor: str | None) -> list[str]:
    """The step operators of a step, in the order they are tried: one id, or a list of them."""
    if value is None:
        if flavor is None:
            raise StepOperatorConfigError(
                "step_operator: required; give the id of a registered step operator (an Airflow "
                "connection of type stepops_<flavor>), e.g. step_operator='local_step_operator', or a list of them "
                "tried in order when one has no capacity, e.g. ['sagemaker_gpu', 'vertex_gpu']"
            )
        return [get_flavor(flavor).default_conn_id]
    names = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else []
    if not names or not all(isinstance(name, str) and name for name in names):
        raise StepOperatorConfigError(
            f"step_operator: expected the id of a registered step operator or a non-empty list of them (tried in "
            f"order when one has no capacity), got {value!r}")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise StepOperatorConfigError(f"step_operator: {twice[0]!r} is listed twice; give each step operator once")
    return names


def _capacity_arguments(**arguments: Any) -> CapacityPolicy:
    from pydantic import ValidationError

    from airflow_stepops.settings.base import format_validation_error

    given = {k: v for k, v in arguments.items() if v is not None}
    try:
        return CapacityPolicy(**given)
    except ValidationError as err:
        raise StepOperatorConfigError(format_validation_error(err, "arguments").replace("arguments.", "")) from None


def _attempt_record(hook: StepOperatorHook, handle: JobHandle, event: StepEvent) -> dict[str, Any]:
    """One attempt of the step for its summary: where it ran, how it ended, the time it lost and what it cost."""
    from airflow_stepops.cost import charge

    details = event.get("details") or {}
    began = details.get("started_at") or handle.get("submitted_at")
    ended = details.get("finished_at") or time.time()
    ran_on = {k: v for k, v in details.items() if k not in ("reason", "started_at", "finished_at", "stop_job")
              and isinstance(v, (str, int, float, bool))}
    return {"try": int(handle.get("attached_by_try") or handle.get("try_number") or 1),
            "attempt": handle.get("attempt", 1), "step_operator": hook.step_operator_conn_id, "flavor": hook.flavor,
            "job_id": handle.get("job_id"), "on_demand": bool(handle.get("on_demand")),
            "outcome": details.get("reason") or event["status"], "message": str(event.get("message") or "")[:500],
            "ran_on": ran_on, "lost_seconds": round(max(ended - began, 0.0), 1) if began else None,
            "ended_at": round(ended, 3), "cost": charge(handle, details, ended=ended)}


def _passed_over(history: list[dict[str, Any]]) -> str:
    return "; ".join(f"attempt {r.get('attempt')} on {r.get('step_operator')!r}: {r.get('outcome')}"
                     for r in history) or "no earlier attempt"


def _stored_handle(store: Any) -> JobHandle | None:
    value = store.get(STATE_KEY) if store is not None else None
    return cast("JobHandle", value) if isinstance(value, dict) else None


def _run_key(store: Any, context: Context) -> str:
    """A key unique to this incarnation of the dag run and stable across its tries and workers.

    It lives in the task state store, whose rows Airflow deletes with their dag run, so a run deleted and
    re-created with the same run_id (or a reset metadata DB) gets a new key. Without a task state store
    (Airflow < 3.3) the run's start date stands in for it.
    """
    if store is not None:
        key = store.get(RUN_KEY)
        if not (isinstance(key, str) and key):
            key = uuid.uuid4().hex[:12]
            store.set(RUN_KEY, key)
        return key
    dag_run = context.get("dag_run")
    started = getattr(dag_run, "start_date", None) or getattr(dag_run, "run_after", None)
    return hashlib.sha256(started.isoformat().encode()).hexdigest()[:12] if started else ""


async def _first_event(trigger: Any) -> StepEvent:
    async for event in trigger.run():
        return event.payload
    raise StepFailedError("the trigger ended without an event")


def _tail(event: StepEvent) -> str:
    lines = event.get("log_tail") or []
    return ("\nLast remote log lines:\n" + "\n".join(lines)) if lines else ""


def _summary(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."
