"""The polling trigger shared by every flavor.

Status polling is shared: all triggers of one backend (same hook class and step operator) in a
triggerer process subscribe to one ``SharedStatusPoller``, which asks the backend about all their
jobs in one ``aget_statuses`` call per round. A thousand deferred steps cost one status call per
round, not a thousand. Log lines are read per job and written to the task log as they appear.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Coroutine
from typing import Any, ClassVar, TypedDict, TypeVar

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_stepops.exceptions import StepOperatorConfigError
from airflow_stepops.flavors import get_flavor
from airflow_stepops.hooks.base import JobHandle, JobState, JobStatus, StepOperatorHook

LOG_TAIL_LINES = 40
MAX_CONSECUTIVE_POLL_ERRORS = 10
#: log reads after a job ended, to drain what it still has (each read is capped by the hook)
MAX_FINAL_LOG_READS = 20
#: the trigger stops a job this long before the run time max_cost leaves it, so that stopping it (and the service's
#: rounding up of billed time) does not carry its charge past the limit; the backend's own limit is the exact one
COST_STOP_MARGIN_SECONDS = 2.0
_T = TypeVar("_T")


class StepEvent(TypedDict):
    """The payload of a step trigger's one event, which ``StepOperator.execute_complete`` reads."""

    status: str  # a JobState value, "timeout" or "cost_limit" (the trigger stopped the job), "error" (it lost track)
    message: str
    handle: JobHandle
    log_tail: list[str]  # the last remote log lines, for the error message
    details: dict[str, Any]  # the final JobStatus.details


async def _keeping_cancel_message(call: Coroutine[Any, Any, _T]) -> _T:
    """Await a backend call so that a cancellation reaches this trigger with its message intact.

    The triggerer tells a user's mark-failed apart from its own shutdown by the cancel message and calls
    ``on_kill`` only for the first. Client libraries may re-raise a bare ``CancelledError`` instead: asgiref's
    ``sync_to_async`` (which ``AwsBaseHook.get_async_conn`` awaits) does, and the remote job would then run on.
    Awaited through a shield, the cancellation lands here with its message; the call is cancelled after."""
    task = asyncio.ensure_future(call)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.cancel()
        raise


class SharedStatusPoller:
    """One polling loop per backend per event loop, fanning statuses out to subscribed triggers."""

    _pollers: ClassVar[dict[tuple[Any, ...], SharedStatusPoller]] = {}
    #: status calls made by all pollers of this process (benchmarks read it)
    calls: ClassVar[int] = 0

    def __init__(self, key: tuple[Any, ...], hook: StepOperatorHook, interval: float) -> None:
        self.key = key
        self.hook = hook
        self.interval = interval
        self.subscribers: dict[int, tuple[JobHandle, asyncio.Queue[JobStatus | BaseException]]] = {}
        self._next_token = 0
        self._task: asyncio.Task[None] | None = None
        self._delay = 0.0

    @classmethod
    def for_hook(cls, hook: StepOperatorHook, interval: float) -> SharedStatusPoller:
        loop = asyncio.get_running_loop()
        key = (id(loop), hook.polling_key(), interval)
        poller = cls._pollers.get(key)
        if poller is None:
            poller = cls._pollers[key] = cls(key, hook, interval)
        return poller

    def subscribe(self, handle: JobHandle) -> tuple[int, asyncio.Queue[JobStatus | BaseException]]:
        token = self._next_token
        self._next_token += 1
        queue: asyncio.Queue[JobStatus | BaseException] = asyncio.Queue()
        self.subscribers[token] = (handle, queue)
        self._delay = 0.0  # a new job: poll fast again for a moment
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"stepops-poller-{self.key[1]}")
        return token, queue

    def unsubscribe(self, token: int) -> None:
        self.subscribers.pop(token, None)
        if not self.subscribers:
            self._pollers.pop(self.key, None)
            if self._task is not None and self._task is not asyncio.current_task():
                self._task.cancel()

    async def _run(self) -> None:
        while self.subscribers:
            batch = list(self.subscribers.items())
            try:
                SharedStatusPoller.calls += 1
                statuses: list[JobStatus | BaseException] = list(
                    await self.hook.aget_statuses([handle for _, (handle, _) in batch])
                )
                if len(statuses) != len(batch):
                    raise RuntimeError(f"{type(self.hook).__name__}.aget_statuses returned {len(statuses)} "
                                       f"statuses for {len(batch)} jobs")
            except Exception as exc:  # delivered to every waiting trigger
                statuses = [exc] * len(batch)
            for (token, (_, queue)), status in zip(batch, statuses):
                if token in self.subscribers:
                    queue.put_nowait(status)
            await asyncio.sleep(self._next_delay())

    def _next_delay(self) -> float:
        """Poll quickly right after a job was submitted, then back off to the interval: short steps
        finish without waiting a whole interval, long ones cost no more calls than plain polling."""
        self._delay = min(self.interval, max(self._delay * 2, self.hook.min_poll_interval))
        return self._delay


class StepOperatorTrigger(BaseTrigger):
    """Waits for one remote step, streaming its log lines into the task log."""

    #: a flavor's trigger names only this; the hook it polls with derives from it
    flavor: ClassVar[str] = ""
    hook_class_path: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "flavor" in cls.__dict__:
            cls.hook_class_path = get_flavor(cls.flavor).hook_class

    def __init__(
        self,
        *,
        conn_id: str,
        handle: JobHandle,
        poll_interval: float = 5.0,
        deadline: float | None = None,
        log_cursor: Any = None,
        hook_class: str | None = None,
    ) -> None:
        super().__init__()
        self.conn_id = conn_id
        self.handle = handle
        self.poll_interval = poll_interval
        self.deadline = deadline
        self.log_cursor = log_cursor
        self.hook_class = hook_class or self.hook_class_path
        self._started_at: float | None = None  # when the job started, as its status says (or earliest it could)
        self._statuses = 0  # statuses this trigger has seen

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {"conn_id": self.conn_id, "handle": self.handle, "poll_interval": self.poll_interval,
             "deadline": self.deadline, "log_cursor": self.log_cursor, "hook_class": self.hook_class},
        )

    def get_hook(self) -> StepOperatorHook:
        from airflow_stepops.flavors import _import

        return _import(self.hook_class)(step_operator_conn_id=self.conn_id)

    async def get_ready_hook(self) -> StepOperatorHook:
        """The hook with its connection already read. In the triggerer a synchronous connection
        lookup only works from the task that runs ``run()`` itself; the shared poller and ``on_kill``
        run elsewhere, so the lookup is done here, in a thread, before they use the hook."""
        hook = self.get_hook()
        await asyncio.to_thread(lambda: hook.config)
        return hook

    async def _stream_logs(self, hook: StepOperatorHook, cursor: Any, tail: deque[str]) -> Any:
        cursor, _ = await self._read_logs_once(hook, cursor, tail)
        return cursor

    async def _read_logs_once(self, hook: StepOperatorHook, cursor: Any, tail: deque[str]) -> tuple[Any, int]:
        try:
            lines, cursor = await _keeping_cancel_message(hook.aread_logs(self.handle, cursor))
        except Exception as exc:
            self.log.warning("Could not read remote logs of %s: %s", self.handle.get("job_id"), exc)
            return cursor, 0
        for line in lines:
            tail.append(line)
            self.log.info("[%s] %s", self.handle.get("flavor", "remote"), line)
        return cursor, len(lines)

    async def _drain_logs(self, hook: StepOperatorHook, cursor: Any, tail: deque[str]) -> Any:
        """Everything the finished job still has to say (reads are capped per call), waiting once for the
        lines its log service may still ingest after the end (``log_settle_seconds``)."""
        settled = not hook.log_settle_seconds
        for _ in range(MAX_FINAL_LOG_READS):
            cursor, count = await self._read_logs_once(hook, cursor, tail)
            if not count:
                if settled:
                    break
                await asyncio.sleep(hook.log_settle_seconds)
                settled = True
        return cursor

    async def _collect(self, hook: StepOperatorHook) -> None:
        """Secure the job's output now, while the backend still has it (e.g. a pod log)."""
        try:
            await asyncio.to_thread(hook.collect_output, self.handle)
        except Exception as exc:
            self.log.warning("Could not collect the output of %s yet: %s", self.handle.get("job_id"), exc)

    def _event(self, status: str, message: str, tail: deque[str], details: dict[str, Any] | None = None
               ) -> TriggerEvent:
        details = dict(details or {})
        if self._started_at is not None and not details.get("started_at"):
            details["started_at"] = self._started_at
        if status in ("timeout", "error", "cost_limit"):  # the trigger's own word: what it knows of the run
            details.setdefault("finished_at", time.time())
            if self._started_at is None and not self._statuses:  # it may have run: its charge is unknown, not 0
                details["start_unknown"] = True
        event = StepEvent(status=status, message=message, handle=self.handle, log_tail=list(tail), details=details)
        return TriggerEvent(event)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            hook = await self.get_ready_hook()
        except StepOperatorConfigError as exc:
            yield self._event("error", str(exc), deque())
            return
        poller = SharedStatusPoller.for_hook(hook, self.poll_interval)
        token, queue = poller.subscribe(self.handle)
        cursor = self.log_cursor
        tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        errors = 0
        # a job may wait for capacity this long (from its submission, so a restarted triggerer keeps the clock)
        max_queue = self.handle.get("max_queue_seconds")
        queued_since = float(self.handle.get("submitted_at") or time.time())
        started = False
        # the run time max_cost leaves this attempt, counted from its start (as the service bills it)
        cost_seconds = (self.handle.get("cost") or {}).get("limit_seconds")
        cost_deadline: float | None = None
        try:
            while True:
                ends = [d for d in (self.deadline, cost_deadline) if d is not None]
                remaining = min(ends) - time.time() if ends else None
                try:
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError
                    # (shielded: Python 3.11's wait_for drops a cancellation that meets a status at once)
                    status = await _keeping_cancel_message(asyncio.wait_for(queue.get(), timeout=remaining))
                except TimeoutError:
                    yield await self._stop_at_limit(hook, cost_deadline, cursor, tail)
                    return
                if isinstance(status, StepOperatorConfigError):  # will not heal by waiting
                    yield self._event("error", str(status), tail)
                    return
                if isinstance(status, BaseException):
                    errors += 1
                    self.log.warning("Status poll failed (%d/%d): %s", errors, MAX_CONSECUTIVE_POLL_ERRORS, status)
                    if errors >= MAX_CONSECUTIVE_POLL_ERRORS:
                        yield self._event("error", f"status polling failed repeatedly: {status!r}", tail)
                        return
                    continue
                errors = 0
                self._statuses += 1
                # a job that ran is no longer waiting for capacity, whatever it reports now (a SageMaker spot job
                # restarting after an interruption is queued again, with its start time)
                was_queued = self._statuses > 1 and not started
                started = started or status.state is not JobState.QUEUED or bool(status.details.get("started_at"))
                if started and self._started_at is None:
                    # without the service's start time: now, if this trigger saw it queued; else (a restarted
                    # triggerer) the earliest it can have started, its submission
                    self._started_at = float(status.details.get("started_at") or (
                        time.time() if was_queued else self.handle.get("submitted_at") or time.time()))
                if self._started_at is not None and cost_seconds is not None and cost_deadline is None:
                    cost_deadline = self._started_at + max(
                        float(cost_seconds) - COST_STOP_MARGIN_SECONDS, 1.0)
                if max_queue is not None and not started and time.time() - queued_since > max_queue:
                    yield await self._queue_timeout(hook, status, float(max_queue), cursor, tail)
                    return
                if status.state is not JobState.QUEUED:
                    cursor = await self._stream_logs(hook, cursor, tail)
                if status.state.terminal:
                    if status.details.get("stop_job"):  # failed fast: the backend would keep trying
                        self.log.error("Step %s cannot run: %s; stopping it", self.handle.get("job_id"),
                                       status.message)
                        await asyncio.shield(hook.acancel(self.handle))
                    cursor = await self._drain_logs(hook, cursor, tail)
                    if status.state in (JobState.SUCCEEDED, JobState.FAILED) and not status.details.get("stop_job"):
                        await self._collect(hook)
                    yield self._event(status.state.value, status.message, tail, details=status.details)
                    return
        finally:
            poller.unsubscribe(token)

    async def _stop_at_limit(self, hook: StepOperatorHook, cost_deadline: float | None, cursor: Any,
                             tail: deque[str]) -> TriggerEvent:
        """The execution_timeout passed, or the run time ``max_cost`` leaves the attempt: stop the job."""
        cost = cost_deadline is not None and (self.deadline is None or cost_deadline <= self.deadline)
        what = "its accrued cost reached max_cost" if cost else "the step ran past its execution_timeout"
        self.log.error("Step %s: %s: stopping the remote job", self.handle.get("job_id"), what)
        await asyncio.shield(hook.acancel(self.handle))
        await self._stream_logs(hook, cursor, tail)
        if not cost:
            return self._event("timeout", f"{what} and was stopped", tail)
        limit = self.handle.get("cost") or {}
        spent = f", after {limit['spent_before']:g} spent by earlier attempts" if limit.get("spent_before") else ""
        return self._event("cost_limit", f"{what} ({limit.get('limit_seconds')} s of run time{spent}) and was stopped",
                           tail, details={"started_at": self._started_at, "finished_at": time.time()})

    async def _queue_timeout(self, hook: StepOperatorHook, status: JobStatus, max_queue: float, cursor: Any,
                             tail: deque[str]) -> TriggerEvent:
        """The job waited for capacity longer than ``max_queue_seconds``: stop it and report a capacity failure
        (FAILED, reason ``queue_timeout``), as a failed job is reported."""
        message = (f"the job waited for capacity longer than max_queue_seconds={max_queue:g} "
                   f"({status.message or 'queued'}) and was stopped")
        self.log.error("Step %s: %s", self.handle.get("job_id"), message)
        await asyncio.shield(hook.acancel(self.handle))
        await self._stream_logs(hook, cursor, tail)
        details = {**status.details, "reason": "queue_timeout", "max_queue_seconds": max_queue}
        return self._event(JobState.FAILED.value, message, tail, details=details)

    async def on_kill(self) -> None:
        """Mark-failed / clear of a deferred step (Airflow >= 3.3): stop the remote job."""
        self.log.info("Task killed while deferred: stopping remote job %s", self.handle.get("job_id"))
        # the triggerer may cancel on_kill itself soon after; the stop request must still go out
        hook = await self.get_ready_hook()

        async def stop() -> None:
            await hook.acancel(self.handle)
            self.log.info("Stop of remote job %s requested", self.handle.get("job_id"))

        await asyncio.shield(stop())

