"""Function calls and their one input, as the server tracks them for ``.spawn()`` / ``.remote()``.

A call is ``pending`` (queued: no task), ``running`` (a task, i.e. a container process, works on its
input), then ``success``, ``failure``, ``init_failure``, ``timeout`` or ``terminated``; a preempted input that
is restarted goes back to ``pending`` and runs again on a new task. The output is a
``FunctionGetOutputsItem`` whose ``GenericResult`` is what the client's ``_process_result`` reads; it stays
readable (``clear_on_success=False``) unless a reader asks to clear it on success, as ``.remote()`` does.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from modal_proto import api_pb2

from airflow_stepops.testing.modal._ids import lookup, new_id, new_input_id

GR = api_pb2.GenericResult
#: end state -> the result status an output carries
END_STATUS = {"success": GR.GENERIC_STATUS_SUCCESS, "failure": GR.GENERIC_STATUS_FAILURE,
              "init_failure": GR.GENERIC_STATUS_INIT_FAILURE, "timeout": GR.GENERIC_STATUS_TIMEOUT,
              "terminated": GR.GENERIC_STATUS_TERMINATED}
STATE_OF_STATUS = {v: k for k, v in END_STATUS.items()}
TERMINAL = frozenset(END_STATUS)


@dataclass
class Call:
    """One function call with one input (``.spawn()`` / ``.remote()``)."""

    id: str
    input_id: str
    function_id: str
    app_id: str
    function_name: str
    module_name: str
    environment: str
    ranked: list[api_pb2.Function]
    function_input: api_pb2.FunctionInput
    invocation_type: int
    created_at: float
    state: str = "pending"
    history: list[str] = field(default_factory=lambda: ["pending"])
    task_ids: list[str] = field(default_factory=list)
    task_id: str | None = None
    gpu: str | None = None
    gpu_count: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    attempts: int = 0
    exception: str | None = None
    output: api_pb2.FunctionGetOutputsItem | None = None
    output_cleared: bool = False
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def over(self) -> bool:
        return self.state in TERMINAL

    def start(self, task_id: str, gpu: str | None, count: int) -> None:
        with self.lock:
            self.state, self.task_id, self.gpu, self.gpu_count = "running", task_id, gpu, count
            self.task_ids.append(task_id)
            self.attempts += 1
            self.started_at = self.started_at or time.time()
            self.history.append("running")

    def requeue(self) -> None:
        """A preempted input that is restarted waits for a new task."""
        with self.lock:
            self.state, self.task_id = "pending", None
            self.history.append("pending")

    def finish(self, state: str, result: api_pb2.GenericResult, data_format: int = api_pb2.DATA_FORMAT_PICKLE,
               exit_code: int | None = None) -> bool:
        """End the call with ``result`` (False when it was over already)."""
        with self.lock:
            if self.state in TERMINAL:
                return False
            now = time.time()
            self.output = api_pb2.FunctionGetOutputsItem(
                result=result, idx=0, input_id=self.input_id, data_format=data_format, task_id=self.task_id or "",
                input_started_at=self.started_at or 0.0, output_created_at=now, retry_count=max(self.attempts - 1, 0))
            self.state, self.finished_at, self.exit_code = state, now, exit_code
            self.exception = result.exception or None
            self.history.append(state)
            return True

    def age(self, seconds: float) -> None:
        """Move every time of the call ``seconds`` into the past, as if it had been made that long ago."""
        with self.lock:
            self.created_at -= seconds
            self.started_at = self.started_at - seconds if self.started_at else self.started_at
            self.finished_at = self.finished_at - seconds if self.finished_at else self.finished_at
            if self.output is not None:
                self.output.input_started_at -= seconds if self.output.input_started_at else 0.0
                self.output.output_created_at -= seconds

    def graph_status(self) -> int:
        """``InputCallGraphInfo.status``: 0 (the client's InputStatus.PENDING) until the input is over."""
        return END_STATUS.get(self.state, 0)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            status = self.output.result.status if self.output is not None else None
            return {
                "id": self.id, "input_id": self.input_id, "function_id": self.function_id, "app_id": self.app_id,
                "function": self.function_name, "environment": self.environment, "state": self.state,
                "status": GR.GenericStatus.Name(status) if status is not None else None,
                "history": list(self.history), "task_id": self.task_id, "task_ids": list(self.task_ids),
                "gpu": self.gpu, "gpu_count": self.gpu_count, "created_at": self.created_at,
                "started_at": self.started_at, "finished_at": self.finished_at, "exit_code": self.exit_code,
                "attempts": self.attempts, "exception": self.exception,
                "invocation_type": api_pb2.FunctionCallInvocationType.Name(self.invocation_type),
                "output_format": (api_pb2.DataFormat.Name(self.output.data_format) if self.output is not None
                                  else None),
            }


class CallStore:
    """Every call, oldest first; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[str, Call] = {}

    def create(self, *, function_id: str, app_id: str, function_name: str, module_name: str, environment: str,
               ranked: list[api_pb2.Function], function_input: api_pb2.FunctionInput,
               invocation_type: int) -> Call:
        call = Call(new_id("fc"), new_input_id(), function_id, app_id, function_name, module_name, environment,
                    list(ranked), function_input, invocation_type, time.time())
        with self._lock:
            self._calls[call.id] = call
        return call

    def get(self, call_id: str) -> Call:
        """The call; NOT_FOUND (a gRPC error, as the server answers) when there is none."""
        return lookup(self._calls, self._lock, "Function call", call_id)

    def get_or_none(self, call_id: str) -> Call | None:
        with self._lock:
            return self._calls.get(call_id)

    def all(self) -> list[Call]:
        with self._lock:
            return list(self._calls.values())
