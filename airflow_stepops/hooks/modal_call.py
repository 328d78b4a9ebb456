"""A step's Modal function call: its status, its result and its logs, read through the ``modal`` client.

The result is read with the raw ``FunctionGetOutputs`` RPC rather than ``FunctionCall.get``: ``get``
unpickles whatever the container returned (and remote exceptions), while a step's output is only ever
``bytes``, which a pickle loader that resolves no classes at all can read. ``modal`` is pinned exactly,
so the wire messages used here do not move under us.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import time
from collections.abc import Iterator
from typing import Any

from airflow_stepops.hooks.base import JobHandle, JobState, JobStatus

#: how long Modal keeps a spawned call's result: "accessible via FunctionCall.get() for up to 7 days after
#: completion" (https://modal.com/docs/guide/job-queue); a call younger than that cannot have lost its output
OUTPUT_RETENTION = 7 * 24 * 3600
#: every RPC the hook sends itself is bounded: the modal client's default ``Retry()`` has no timeout at all
#: (modal/_utils/grpc_utils.py ``Retry``, ``_retry_transient_errors``), so a lost reply would wait forever.
#: A timed-out attempt is retried like the transient gRPC statuses the client retries by itself.
ATTEMPT_TIMEOUT = 10.0  # as modal's own ``create_channel_with_fallbacks`` retry (grpc_utils.py)
TOTAL_TIMEOUT = 60.0
MAX_RETRIES = 5
#: how long one log read waits for entries: Modal's own client drains a log stream for 0.5 s once it stops
#: following it (modal/_logs_manager.py ``_drain_stream``)
LOG_WAIT = 0.5


def bounded() -> Any:
    """The modal client's own retry policy, with a timeout per attempt and in all."""
    from modal._utils.grpc_utils import Retry

    return Retry(max_retries=MAX_RETRIES, attempt_timeout=ATTEMPT_TIMEOUT, total_timeout=TOTAL_TIMEOUT)


class _NoClasses(pickle.Unpickler):
    """Loads plain data only: any class or function reference in the pickle is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"the step's Modal call returned a {module}.{name}, not bytes")


def output_bytes(data: bytes) -> bytes:
    value = _NoClasses(io.BytesIO(data)).load()
    if not isinstance(value, bytes):
        raise pickle.UnpicklingError(f"the step's Modal call returned {type(value).__name__}, not bytes")
    return value


def payload_span(head: bytes) -> tuple[int, int] | None:
    """Where the bytes of a pickled ``bytes`` object lie, from the pickle's first bytes: (offset, length),
    or None when the pickle is not one plain bytes object (then it is loaded with ``_NoClasses``)."""
    at = 0
    if head[at:at + 1] == pickle.PROTO:
        at += 2
    if head[at:at + 1] == pickle.FRAME:
        at += 9
    opcode = head[at:at + 1]
    sizes = {pickle.SHORT_BINBYTES: 1, pickle.BINBYTES: 4, pickle.BINBYTES8: 8}
    if opcode not in sizes:
        return None
    width = sizes[opcode]
    raw = head[at + 1:at + 1 + width]
    if len(raw) != width:
        return None
    return at + 1 + width, int.from_bytes(raw, "little")


class _Span(io.RawIOBase):
    """``length`` bytes of an open file from its current position: the archive inside a pickled bytes."""

    def __init__(self, fh: Any, length: int) -> None:
        self.fh, self.left = fh, length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.left <= 0:
            return 0
        data = self.fh.read(min(len(buffer), self.left))
        buffer[:len(data)] = data
        self.left -= len(data)
        return len(data)


@contextlib.contextmanager
def open_output(path: str, data_format: int) -> Iterator[Any]:
    """The step's output archive inside a call's raw result data (a pickled or CBOR ``bytes``), as a
    stream: a plain pickled bytes object is read in place, without loading it; anything else is loaded
    as data only (no classes), CBOR with cbor2 (data only by nature)."""
    from modal_proto import api_pb2

    with open(path, "rb") as fh:
        if data_format == api_pb2.DATA_FORMAT_CBOR:
            import cbor2

            value = cbor2.load(fh)
            if not isinstance(value, bytes):
                raise pickle.UnpicklingError(f"the step's Modal call returned {type(value).__name__}, not bytes")
            yield io.BytesIO(value)
            return
        if data_format not in (api_pb2.DATA_FORMAT_PICKLE, api_pb2.DATA_FORMAT_UNSPECIFIED):
            raise pickle.UnpicklingError(f"the step's Modal call returned data in format {data_format}")
        span = payload_span(fh.read(64))
        if span is None:
            fh.seek(0)
            yield io.BytesIO(output_bytes(fh.read()))
            return
        fh.seek(span[0])
        yield io.BufferedReader(_Span(fh, span[1]), 8 << 20)


async def _fetch_result(client: Any, call_id: str) -> tuple[Any, int]:
    """The call's output item (None while it has none) and Modal's count of its unfinished inputs. Answers at
    once (timeout 0); downloads nothing. "No output and no unfinished input" is what the modal client takes
    for an expired output (``OutputExpiredError`` in ``_Invocation.poll_function``), but a call just spawned
    or still queued may show it too: ``output_expired`` decides."""
    from modal_proto import api_pb2

    request = api_pb2.FunctionGetOutputsRequest(function_call_id=call_id, timeout=0, last_entry_id="0-0",
                                                clear_on_success=False, requested_at=time.time())
    stub = client._stub  # Client.stub is the same object behind a warning that it is not public API
    response = await stub.FunctionGetOutputs(request, retry=bounded())
    return (response.outputs[0] if response.outputs else None), response.num_unfinished_inputs


async def _save_output(client: Any, call_id: str, target: str) -> Any:
    """Write a finished call's raw result data (inline or its blob, streamed) to the file ``target``; the
    output item, whose ``result`` tells how the call ended and whose ``data_format`` how to read it."""
    import aiohttp
    from modal._utils.http_utils import ClientSessionRegistry
    from modal.exception import ExecutionError
    from modal_proto import api_pb2

    request = api_pb2.FunctionGetOutputsRequest(function_call_id=call_id, timeout=0, last_entry_id="0-0",
                                                clear_on_success=False, requested_at=time.time())
    response = await client._stub.FunctionGetOutputs(request, retry=bounded())
    if not response.outputs:
        return None
    item = response.outputs[0]
    with open(target, "wb") as fh:
        if item.result.WhichOneof("data_oneof") == "data_blob_id":  # as modal's ``blob_iter``, but bounded
            found = await client._stub.BlobGet(api_pb2.BlobGetRequest(blob_id=item.result.data_blob_id),
                                               retry=bounded())
            stall = aiohttp.ClientTimeout(sock_connect=ATTEMPT_TIMEOUT, sock_read=ATTEMPT_TIMEOUT * 6)
            async with ClientSessionRegistry.get_session().get(found.download_url, timeout=stall) as response:
                if response.status != 200:
                    raise ExecutionError(f"Get from url failed with status {response.status}")
                async for chunk in response.content.iter_any():
                    fh.write(chunk)
        else:
            fh.write(item.result.data)
    return item


async def _call_info(client: Any, function_id: str, call_id: str) -> Any:
    """The call's ``FunctionCallInfo``: when Modal created it and its pending (queued or running) inputs
    with their task and start time; ``FunctionCallGetInfo``, which Modal's own log streaming asks."""
    from modal_proto import api_pb2

    response = await client._stub.FunctionCallGetInfo(
        api_pb2.FunctionCallGetInfoRequest(function_id=function_id, function_call_id=call_id), retry=bounded())
    return response.info


def output_expired(unfinished: int, created_at: float, handle: JobHandle) -> bool:
    """Modal's own sign of an expired output (no output, no unfinished input), on a call old enough for
    Modal to have dropped its result (created ``OUTPUT_RETENTION`` ago; Modal's creation time, else ours)."""
    created = created_at or float(handle.get("spawned_at") or time.time())
    return unfinished == 0 and time.time() - created > OUTPUT_RETENTION


async def _dict_text(client: Any, dict_id: str, key: str) -> str | None:
    """A ``str`` value of a Modal Dict, read as data only (``Dict.get`` would unpickle anything)."""
    from modal._serialization import serialize
    from modal_proto import api_pb2

    response = await client._stub.DictGet(api_pb2.DictGetRequest(dict_id=dict_id, key=serialize(key)),
                                          retry=bounded())
    if not response.found:
        return None
    value = _NoClasses(io.BytesIO(response.value)).load()
    return value if isinstance(value, str) else None


async def _dict_drop(client: Any, dict_id: str, key: str) -> None:
    """Remove a key of a Modal Dict without reading its value (``Dict.pop`` would unpickle it)."""
    from modal._serialization import serialize
    from modal_proto import api_pb2

    await client._stub.DictPop(api_pb2.DictPopRequest(dict_id=dict_id, key=serialize(key)), retry=bounded())


async def _log_batches(client: Any, call_id: str, app_id: str, after: str) -> tuple[list[Any], str]:
    """The call's log batches after entry ``after``, and its app's id (looked up when not given yet).

    ``AppGetLogs`` resumed from ``last_entry_id``, as the modal client follows logs (``_LogsManager.stream``
    in modal/_logs_manager.py): entries come in the order Modal took them in, so one that arrives late with
    an earlier timestamp still comes after what was read, while a time range (``logs.fetch(since=...)``)
    started at the last timestamp read would skip it. Each read waits ``LOG_WAIT`` for more."""
    import asyncio

    from modal_proto import api_pb2

    if not app_id:
        found = await client._stub.FunctionCallFromId(api_pb2.FunctionCallFromIdRequest(function_call_id=call_id),
                                                      retry=bounded())
        app_id = found.metadata.app_id
    request = api_pb2.AppGetLogsRequest(app_id=app_id, timeout=LOG_WAIT, last_entry_id=after,
                                        function_call_id=call_id)
    batches: list[Any] = []

    async def read() -> None:
        async for batch in client._stub.AppGetLogs.unary_stream(request):
            batches.append(batch)

    try:
        await asyncio.wait_for(read(), LOG_WAIT + ATTEMPT_TIMEOUT)
    except asyncio.TimeoutError:
        pass  # a stream Modal did not end in time: what came is kept, the rest comes next read
    return batches, app_id


async def _spawn(client: Any, function: Any, args: tuple[Any, ...], key: str) -> str:
    """Spawn ``function(*args)`` as ``Function.spawn`` does (``_Invocation.create`` in modal/_functions.py)
    and return the call's id; but where ``spawn`` waits without a timeout for FunctionMap's reply, every
    attempt here has one and all carry the idempotency key ``key``, so an attempt whose reply was lost is
    answered again with the call it made (see ``_retry_transient_errors``, which sends one key for all the
    attempts of a request), never with a second call."""
    import asyncio

    from grpclib import GRPCError
    from grpclib.exceptions import StreamTerminatedError
    from modal._grpc_client import grpc_error_to_modal_exception
    from modal._utils.function_utils import _create_input
    from modal._utils.grpc_utils import RETRYABLE_GRPC_STATUS_CODES
    from modal_proto import api_pb2

    kind = api_pb2.FUNCTION_CALL_INVOCATION_TYPE_ASYNC
    size = sum(len(arg) for arg in args if isinstance(arg, (bytes, str)))  # a large bundle goes to a blob
    item = await asyncio.wait_for(_create_input(args, {}, client._stub, function=function,
                                                function_call_invocation_type=kind), TOTAL_TIMEOUT + size / 2**20)
    request = api_pb2.FunctionMapRequest(function_id=function.object_id, function_call_type=api_pb2.FUNCTION_CALL_TYPE_UNARY,
                                         pipelined_inputs=[item], function_call_invocation_type=kind)
    deadline = time.monotonic() + TOTAL_TIMEOUT
    for attempt in range(MAX_RETRIES + 1):
        try:
            response = await client._stub.FunctionMap.direct(
                request, timeout=ATTEMPT_TIMEOUT, metadata=[("x-idempotency-key", key), ("x-retry-attempt", str(attempt))])
        except GRPCError as exc:
            if exc.status not in RETRYABLE_GRPC_STATUS_CODES or attempt == MAX_RETRIES or time.monotonic() > deadline:
                raise grpc_error_to_modal_exception(exc) from None
        except (asyncio.TimeoutError, StreamTerminatedError, OSError):
            if attempt == MAX_RETRIES or time.monotonic() > deadline:
                raise
        else:
            if not response.pipelined_inputs:  # an older server: the input goes in a second request
                await client._stub.FunctionPutInputs(api_pb2.FunctionPutInputsRequest(
                    function_id=function.object_id, inputs=[item], function_call_id=response.function_call_id),
                    retry=bounded())
            return str(response.function_call_id)
        await asyncio.sleep(min(0.1 * 2 ** attempt, 1.0))
    raise AssertionError("unreachable")


async def _hydrate(obj: Any) -> Any:
    """``obj.hydrate()``, a look-up by name, with a timeout per attempt and a bounded number of attempts: the
    modal client waits for its reply without one (its default ``Retry()``); a look-up is safe to repeat."""
    import asyncio

    deadline = time.monotonic() + TOTAL_TIMEOUT
    for attempt in range(MAX_RETRIES + 1):
        try:
            return await asyncio.wait_for(obj.hydrate(), ATTEMPT_TIMEOUT)
        except asyncio.TimeoutError:
            if attempt == MAX_RETRIES or time.monotonic() > deadline:
                raise
    raise AssertionError("unreachable")


async def _cancel(client: Any, call_id: str) -> None:
    """``FunctionCall.cancel(terminate_containers=True)``, bounded (cancelling twice is harmless)."""
    from modal_proto import api_pb2

    await client._stub.FunctionCallCancel(api_pb2.FunctionCallCancelRequest(
        function_call_id=call_id, terminate_containers=True), retry=bounded())


async def _dict_put(client: Any, dict_id: str, key: str, text: str) -> None:
    """``Dict.put`` of a ``str``, bounded."""
    from modal._serialization import serialize
    from modal_proto import api_pb2

    await client._stub.DictUpdate(api_pb2.DictUpdateRequest(
        dict_id=dict_id, updates=[api_pb2.DictEntry(key=serialize(key), value=serialize(text))]), retry=bounded())


def _synchronized(function: Any) -> Any:
    """``function`` run on the modal client's own event loop, as a blocking call with an ``.aio`` form."""
    from modal._utils.async_utils import synchronize_api

    cache: dict[Any, Any] = globals().setdefault("_SYNCHRONIZED", {})
    if function not in cache:
        cache[function] = synchronize_api(function)
    return cache[function]


def fetch_result(client: Any, call_id: str) -> tuple[Any, int]:
    return _synchronized(_fetch_result)(client, call_id)  # type: ignore[no-any-return]


async def afetch_result(client: Any, call_id: str) -> tuple[Any, int]:
    return await _synchronized(_fetch_result).aio(client, call_id)  # type: ignore[no-any-return]


def save_output(client: Any, call_id: str, target: str) -> Any:
    return _synchronized(_save_output)(client, call_id, target)


def call_info(client: Any, function_id: str, call_id: str) -> Any:
    return _synchronized(_call_info)(client, function_id, call_id)


async def acall_info(client: Any, function_id: str, call_id: str) -> Any:
    return await _synchronized(_call_info).aio(client, function_id, call_id)


def spawn(client: Any, function: Any, args: tuple[Any, ...], key: str) -> str:
    return _synchronized(_spawn)(client, function, args, key)  # type: ignore[no-any-return]


def hydrate(obj: Any) -> Any:
    return _synchronized(_hydrate)(obj)


def cancel(client: Any, call_id: str) -> None:
    _synchronized(_cancel)(client, call_id)


async def acancel(client: Any, call_id: str) -> None:
    await _synchronized(_cancel).aio(client, call_id)


def dict_put(client: Any, dict_id: str, key: str, text: str) -> None:
    _synchronized(_dict_put)(client, dict_id, key, text)


def dict_text(client: Any, dict_id: str, key: str) -> str | None:
    return _synchronized(_dict_text)(client, dict_id, key)  # type: ignore[no-any-return]


def dict_drop(client: Any, dict_id: str, key: str) -> None:
    _synchronized(_dict_drop)(client, dict_id, key)


async def alog_batches(client: Any, call_id: str, app_id: str, after: str) -> tuple[list[Any], str]:
    return await _synchronized(_log_batches).aio(client, call_id, app_id, after)  # type: ignore[no-any-return]


def step_error(result: Any) -> dict[str, Any] | None:
    """The step's error record that ``entry.run_step`` put in the text of a failed call's exception."""
    import base64
    import json
    import re

    from airflow_stepops.runtime.protocol import CALL_ERROR_MARKER

    found = re.search(re.escape(CALL_ERROR_MARKER) + r"([A-Za-z0-9+/=]+)", result.exception or "")
    if not found:
        return None
    try:
        error = json.loads(base64.b64decode(found.group(1)))
    except ValueError:
        return None
    return error if isinstance(error, dict) else None


def finished_status(item: Any, handle: JobHandle, details: dict[str, Any]) -> JobStatus:
    """A finished call's output item as a JobStatus, told apart by Modal's result status alone (never by the
    exception text, which may carry the step's output); ``None``: its output expired."""
    from modal_proto import api_pb2

    if item is None:
        return JobStatus(JobState.FAILED, f"Modal no longer has the output of call {handle['job_id']} "
                         "(OutputExpiredError: results are kept up to 7 days after a call ends)",
                         {**details, "reason": "output_expired"})
    status = api_pb2.GenericResult
    result = item.result
    text = (result.exception or "").strip()
    details = {**details, "modal_status": status.GenericStatus.Name(result.status).removeprefix("GENERIC_STATUS_")
               .lower(), "finished_at": item.output_created_at or time.time()}
    if item.input_started_at:
        details["started_at"] = item.input_started_at
    if item.retry_count:
        details["restarts"] = item.retry_count
    if result.traceback:
        details["remote_traceback"] = result.traceback[-4000:]
    if result.status == status.GENERIC_STATUS_SUCCESS:
        return JobStatus(JobState.SUCCEEDED, "", details)
    error = step_error(result)
    if error is not None:
        details.pop("remote_traceback", None)  # the runner's own; the step's is in the error
        return JobStatus(JobState.FAILED, f"{error.get('type', 'Exception')}: {error.get('message', '')}",
                         {**details, "reason": "step_failed"})
    if result.status == status.GENERIC_STATUS_TIMEOUT:
        return JobStatus(JobState.FAILED, f"the call ran past its timeout ({handle.get('timeout')} s) and Modal "
                         f"stopped it: {text}", {**details, "reason": "timed_out"})
    if result.status == status.GENERIC_STATUS_INTERNAL_FAILURE:
        # "lost inputs or worker preemption" (modal/_functions.py, the retry of _InputPlaneInvocation)
        return JobStatus(JobState.PREEMPTED, f"Modal lost the call's container (preemption or a worker "
                         f"failure): {text}", {**details, "reason": "preempted"})
    if result.status == status.GENERIC_STATUS_TERMINATED:  # the client raises InputCancellation for it
        return JobStatus(JobState.CANCELLED, text or "the call was cancelled", details)
    if result.status in (status.GENERIC_STATUS_MEMORY_MANAGER_EVICTION, status.GENERIC_STATUS_KERNEL_OOM_KILL,
                         status.GENERIC_STATUS_MEMORY_THRASHING_EVICTION):
        return JobStatus(JobState.FAILED, f"the container ran out of memory ({handle.get('memory') or 'default'} "
                         f"MiB reserved): {text}", {**details, "reason": "out_of_memory"})
    if result.status == status.GENERIC_STATUS_INIT_FAILURE:
        return JobStatus(JobState.FAILED, f"the container failed to start (image, secrets or volumes): {text}",
                         {**details, "reason": "init_failure"})
    return JobStatus(JobState.FAILED, text or details["modal_status"], details)


def running_status(inputs: list[Any], handle: JobHandle, details: dict[str, Any]) -> JobStatus:
    """QUEUED until Modal gives the input a container (a task id, a start time), then RUNNING."""
    started = next((i for i in inputs if getattr(i, "task_id", "") or getattr(i, "started_at", 0)), None)
    if started is not None:
        return JobStatus(JobState.RUNNING, "running", {**details, "modal_task_id": getattr(started, "task_id", ""),
                                                       "started_at": getattr(started, "started_at", 0) or None})
    return JobStatus(JobState.QUEUED, "waiting for a container", details)


def log_lines(batches: list[Any], cursor: Any) -> tuple[list[str], dict[str, Any]]:
    """Whole lines from Modal log batches, and the cursor past them (the last batch's ``entry_id``). Entries
    are chunks of a stream, so a line may span several and the unfinished tail waits in the cursor."""
    from modal_proto import api_pb2

    cursor = dict(cursor or {})
    partial: dict[str, str] = dict(cursor.get("partial") or {})
    sources = {api_pb2.FILE_DESCRIPTOR_STDOUT: "stdout", api_pb2.FILE_DESCRIPTOR_STDERR: "stderr"}
    lines: list[str] = []
    for batch in batches:
        for item in batch.items:
            source = sources.get(item.file_descriptor, "system")
            text = partial.pop(source, "") + item.data
            *done, rest = text.split("\n")
            if rest:
                partial[source] = rest
            prefix = "[system] " if source == "system" else ""
            lines += [prefix + line.rstrip("\r") for line in done]
        if batch.entry_id:
            cursor["entry_id"] = batch.entry_id
    cursor["partial"] = partial
    return lines, cursor
