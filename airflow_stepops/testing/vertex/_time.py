"""RFC 3339 timestamps as Google's APIs write them, kept as integer nanoseconds so they order exactly."""

from __future__ import annotations

import calendar
import re
import threading
import time

_RFC3339 = re.compile(r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|z|[+-]\d{2}:\d{2})$")


def parse_rfc3339(text: str) -> int:
    """Nanoseconds since the epoch of an RFC 3339 timestamp (``2024-05-01T10:00:00.123456789Z``, offsets too);
    ValueError when it is not one."""
    found = _RFC3339.match(text.strip())
    if found is None:
        raise ValueError(f"{text!r} is not an RFC 3339 timestamp")
    year, month, day, hour, minute, second = (int(found.group(i)) for i in range(1, 7))
    nanos = int((found.group(7) or "").ljust(9, "0"))
    seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    zone = found.group(8)
    if zone not in ("Z", "z"):
        sign = 1 if zone[0] == "+" else -1
        seconds -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return seconds * 1_000_000_000 + nanos


def format_rfc3339(nanos: int, digits: int = 9) -> str:
    """``2024-05-01T10:00:00.123456Z`` with ``digits`` fractional digits (Vertex writes 6, Logging 9)."""
    seconds, frac = divmod(nanos, 1_000_000_000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    if digits <= 0:
        return stamp + "Z"
    return f"{stamp}.{str(frac).rjust(9, '0')[:digits]}Z"


class Clock:
    """Wall-clock nanoseconds that never repeat or go back, so timestamps and the ids made of them sort."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0

    def now(self) -> int:
        with self._lock:
            self._last = max(time.time_ns(), self._last + 1)
            return self._last
