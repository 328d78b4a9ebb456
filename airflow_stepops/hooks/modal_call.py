"""A step's Modal function call: its status, its result and its logs, read through the ``modal`` client.

The result is read with the raw ``FunctionGetOutputs`` RPC rather than ``FunctionCall.get``: ``get``
unpickles whatever the container returned (and remote exceptions), while a step's output is only ever
``bytes``, which a pickle loader that resolves no classes at all can read. ``modal`` is pinned exactly,
so the wire messages used here do not move under us.
"""

from __future__ import annotations

import io
import pickle
import time
from datetime import datetime, timezone
from typing import Any

from airflow_stepops.hooks.base import JobHandle, JobState, JobStatus

#: words Modal uses when a container was taken away (preemption) rather than failing by itself
PREEMPTION_WORDS = ("preempt", "worker was interrupted", "interrupted due to", "reclaimed")


class _NoClasses(pickle.Unpickler):
    """Loads plain data only: any class or function reference in the pickle is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"the step's Modal call returned a {module}.{name}, not bytes")


def output_bytes(data: bytes) -> bytes:
    value = _NoClasses(io.BytesIO(data)).load()
    if not isinstance(value, bytes):
        raise pickle.UnpicklingError(f"the step's Modal call returned {type(value).__name__}, not bytes")
    return value


async def _fetch_result(client: Any, call_id: str) -> tuple[Any, bytes | None] | None:
    """``(GenericResult, data)`` of a finished call, or None while it runs (answers at once: timeout 0)."""
    from modal._utils.blob_utils import blob_download
    from modal_proto import api_pb2

    request = api_pb2.FunctionGetOutputsRequest(function_call_id=call_id, timeout=0, last_entry_id="0-0",
                                                clear_on_success=False, requested_at=time.time())
    stub = client._stub  # Client.stub is the same object behind a warning that it is not public API
    response = await stub.FunctionGetOutputs(request)
    if not response.outputs:
        return None
    result = response.outputs[0].result
    data: bytes | None = None
    if result.status == api_pb2.GenericResult.GENERIC_STATUS_SUCCESS:
        which = result.WhichOneof("data_oneof")
        data = await blob_download(result.data_blob_id, stub) if which == "data_blob_id" else result.data
    return result, data


async def _dict_text(client: Any, dict_id: str, key: str) -> str | None:
    """A ``str`` value of a Modal Dict, read as data only (``Dict.get`` would unpickle anything)."""
    from modal._serialization import serialize
    from modal_proto import api_pb2

    response = await client._stub.DictGet(api_pb2.DictGetRequest(dict_id=dict_id, key=serialize(key)))
    if not response.found:
        return None
    value = _NoClasses(io.BytesIO(response.value)).load()
    return value if isinstance(value, str) else None


def _synchronized(function: Any) -> Any:
    """``function`` run on the modal client's own event loop, as a blocking call with an ``.aio`` form."""
    from modal._utils.async_utils import synchronize_api

    cache: dict[Any, Any] = globals().setdefault("_SYNCHRONIZED", {})
    if function not in cache:
        cache[function] = synchronize_api(function)
    return cache[function]


def fetch_result(client: Any, call_id: str) -> tuple[Any, bytes | None] | None:
    return _synchronized(_fetch_result)(client, call_id)  # type: ignore[no-any-return]


async def afetch_result(client: Any, call_id: str) -> tuple[Any, bytes | None] | None:
    return await _synchronized(_fetch_result).aio(client, call_id)  # type: ignore[no-any-return]


def dict_text(client: Any, dict_id: str, key: str) -> str | None:
    return _synchronized(_dict_text)(client, dict_id, key)  # type: ignore[no-any-return]


def step_error(result: Any) -> dict[str, Any] | None:
    """The step's ``error.json`` that ``modal_runner`` put in the text of a failed call's exception."""
    import base64
    import json
    import re

    from airflow_stepops.runtime.modal_runner import ERROR_MARKER

    found = re.search(re.escape(ERROR_MARKER) + r"([A-Za-z0-9+/=]+)", result.exception or "")
    if not found:
        return None
    try:
        error = json.loads(base64.b64decode(found.group(1)))
    except ValueError:
        return None
    return error if isinstance(error, dict) else None


def finished_status(result: Any, handle: JobHandle, details: dict[str, Any]) -> JobStatus:
    """A terminal ``GenericResult`` as a JobStatus (preemption and timeouts told apart)."""
    from modal_proto import api_pb2

    status = api_pb2.GenericResult
    text = (result.exception or "").strip()
    details = {**details, "modal_status": status.GenericStatus.Name(result.status).removeprefix("GENERIC_STATUS_")
               .lower(), "finished_at": details.get("finished_at") or time.time()}
    if result.traceback:
        details["remote_traceback"] = result.traceback[-4000:]
    lowered = text.lower()
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
    if any(word in lowered for word in PREEMPTION_WORDS):
        return JobStatus(JobState.PREEMPTED, f"Modal's worker was preempted: {text}",
                         {**details, "reason": "preempted"})
    if result.status == status.GENERIC_STATUS_TERMINATED:
        if handle.get("cancel_requested") or "cancel" in lowered or not text:
            return JobStatus(JobState.CANCELLED, text or "the call was cancelled", details)
        return JobStatus(JobState.FAILED, f"Modal terminated the call: {text}", details)
    if result.status in (status.GENERIC_STATUS_MEMORY_MANAGER_EVICTION, status.GENERIC_STATUS_KERNEL_OOM_KILL,
                         status.GENERIC_STATUS_MEMORY_THRASHING_EVICTION):
        return JobStatus(JobState.FAILED, f"the container ran out of memory ({handle.get('memory') or 'default'} "
                         f"MiB reserved): {text}", {**details, "reason": "out_of_memory"})
    if result.status == status.GENERIC_STATUS_INIT_FAILURE:
        return JobStatus(JobState.FAILED, f"the container failed to start (image, secrets or volumes): {text}",
                         {**details, "reason": "init_failure"})
    return JobStatus(JobState.FAILED, text or details["modal_status"], details)


def running_status(inputs: list[Any], handle: JobHandle, details: dict[str, Any]) -> JobStatus:
    """QUEUED until Modal gives the input a container (a task id), then RUNNING."""
    task = next((getattr(i, "task_id", "") for i in inputs if getattr(i, "task_id", "")), "")
    if task:
        return JobStatus(JobState.RUNNING, "running", {**details, "task_id": task})
    return JobStatus(JobState.QUEUED, "waiting for a container", details)


def log_lines(entries: list[Any], cursor: Any) -> tuple[list[str], dict[str, Any]]:
    """Whole lines from Modal log entries newer than ``cursor``; entries are chunks of a stream, so a line
    may span several and the unfinished tail waits in the cursor. Entries at the cursor's timestamp that
    were already read are skipped (``fetch`` takes ``since`` inclusively)."""
    cursor = dict(cursor or {"ts": 0.0, "skip": 0, "partial": {}})
    partial: dict[str, str] = dict(cursor.get("partial") or {})
    last, skip = float(cursor.get("ts") or 0.0), int(cursor.get("skip") or 0)
    lines: list[str] = []
    for entry in entries:
        stamp = entry.timestamp.timestamp()
        if stamp < last:
            continue
        if stamp == last:
            if skip > 0:
                skip -= 1
                continue
            cursor["skip"] = int(cursor.get("skip") or 0) + 1
        else:
            last, skip = stamp, 0
            cursor["skip"] = 1
        cursor["ts"] = stamp
        source = str(entry.source)
        text = partial.pop(source, "") + str(entry.message)
        *done, rest = text.split("\n")
        if rest:
            partial[source] = rest
        prefix = "[system] " if source == "system" else ""
        lines += [prefix + line.rstrip("\r") for line in done]
    cursor["partial"] = partial
    return lines, cursor


def since(cursor: Any, handle: JobHandle) -> datetime:
    """Where the next ``fetch`` starts: the last entry read, else shortly before the call was spawned
    (Modal fetches at most 35 days at once)."""
    stamp = float((cursor or {}).get("ts") or 0.0) or float(handle.get("spawned_at") or time.time() - 3600) - 60
    return datetime.fromtimestamp(stamp, timezone.utc)
