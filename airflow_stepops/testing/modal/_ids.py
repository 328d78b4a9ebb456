"""Object ids shaped like Modal's: a two-letter type prefix, a dash and a ULID (``fc-01J9...``).

Input ids look like those Modal's logs show, ``in-<ULID>:<epoch ms>-0``. ULIDs start with the time, so ids
made later sort later.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from grpclib import GRPCError, Status

T = TypeVar("T")

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_lock = threading.Lock()
_last = 0


def _ulid() -> str:
    global _last
    with _lock:  # strictly increasing, also within one millisecond
        stamp = max(time.time_ns() // 1_000_000, _last + 1)
        _last = stamp
    value = (stamp << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


def new_id(prefix: str) -> str:
    """``<prefix>-<ULID>``: ``ap`` apps, ``fu`` functions, ``fc`` function calls, ``ta`` tasks, ``im`` images,
    ``st`` secrets, ``vo`` volumes, ``mo`` mounts, ``bl`` blobs."""
    return f"{prefix}-{_ulid()}"


def new_input_id() -> str:
    return f"in-{_ulid()}:{time.time_ns() // 1_000_000}-0"


def lookup(table: Mapping[str, T], lock: AbstractContextManager[Any], kind: str, object_id: str) -> T:
    """``table[object_id]`` (read under ``lock``); NOT_FOUND ``<kind> <id> not found`` (as the server answers)."""
    with lock:
        found = table.get(object_id)
    if found is None:
        raise GRPCError(Status.NOT_FOUND, f"{kind} {object_id} not found")
    return found
