"""Injectable faults: what Modal does to an input (or an API call) that the function's code did not cause.

Where the wording comes from (public reports of real runs; where none was found, the emulator's own words):

* timeout: the client raises ``FunctionTimeoutError("Task's current input <input id> hit its timeout of
  <N>s")`` and the app log says ``Task's current input(s) ["<input id>"] cancelled because: <that>``
  (both quoted from ``modal`` runs in public repositories);
* preemption: the app log says "Runner interrupted due to worker preemption. Your Function will be
  restarted with the same input." (``modal app logs`` output quoted in a public pull request; Modal's
  preemption guide says the Function is restarted on the same input);
* a preempted input that is not restarted, a cancelled call, a failure fault, a container that exits
  without a result, and no GPU capacity: no real wording was found, the messages are the emulator's.
"""

from __future__ import annotations

from dataclasses import dataclass

from grpclib import Status

from airflow_stepops.testing import _kit

TIMEOUT = "Task's current input {input_id} hit its timeout of {timeout}s"
CANCELLED_BECAUSE = 'Task\'s current input(s) ["{input_id}"] cancelled because: {reason}'
PREEMPTED_RESTART = ("Runner interrupted due to worker preemption. Your Function will be restarted with the "
                     "same input.")
PREEMPTED_FINAL = "Runner interrupted due to worker preemption: input {input_id} was preempted and not restarted."
CANCELLED = "Function call {call_id} was cancelled."
FAILURE = "Internal failure: the worker running task {task_id} was lost."
EXITED = "Container {task_id} exited with code {code} before its input returned a result."
NO_CAPACITY = "No capacity for {gpu} GPUs at the moment; the input stays queued until there is."
STARTING = "Starting container {task_id} ({resources})."

#: kinds that strike ``after`` seconds into a running attempt
RUNNING_KINDS = frozenset({"preemption", "failure"})
KINDS = RUNNING_KINDS | {"slow_start", "no_capacity"}


@dataclass(frozen=True)
class Fault(_kit.Fault):
    """One injected failure.

    kind:
        ``preemption`` — ``after`` seconds into the attempt (counted from when it started running or from when
        the fault was given to it, whichever is later) the worker is reclaimed: the process group gets SIGTERM
        (SIGKILL after ``stop_grace_period``) and a system line says so. With ``restart`` (Modal's own
        behaviour for preempted inputs) the input queues again and runs on a new task; without, it ends
        GENERIC_STATUS_TERMINATED with an exception text saying it was preempted.
        ``failure`` — ``after`` seconds into the attempt the process group is killed and the input ends
        GENERIC_STATUS_FAILURE with ``message`` (the client raises ``RemoteError(message)``).
        ``slow_start`` — the input stays queued ``duration`` seconds (default 2) more.
        ``no_capacity`` — GPUs of type ``gpu`` cannot be had: an input whose function lists fallbacks gets the
        next type, one with only that type stays queued until the fault is cleared (``clear_faults()``).
    """

    KINDS = KINDS

    duration: float | None = None
    restart: bool = True
    gpu: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind == "no_capacity" and not self.gpu:
            raise ValueError("a no_capacity fault needs gpu=<type>, e.g. gpu='H100'")

    @property
    def extra_queue_seconds(self) -> float:
        return 2.0 if self.duration is None else self.duration


FaultRule = _kit.FaultRule


@dataclass
class RequestFault:
    """Answer the next ``times`` calls (None: all) of RPC ``method`` (None: any) with gRPC ``status``; with
    ``lose_reply``, do what they ask but send no answer (the stream stays open until the client gives up)."""

    status: Status
    times: int | None = 1
    method: str | None = None
    message: str = ""
    hits: int = 0
    lose_reply: bool = False
