"""Times as backends report them, to seconds since the epoch: one parser for every flavor."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

#: RFC 3339 with up to nanoseconds (Kubernetes log stamps, Vertex), which ``fromisoformat`` of
#: Python 3.10 does not take; no offset means UTC
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)?$")


def epoch(value: Any) -> float | None:
    """Seconds since the epoch of a datetime, a number or an RFC 3339 string; else None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if hasattr(value, "timestamp"):
        return float(value.timestamp())
    match = _STAMP.match(str(value).strip())
    if not match:
        return None
    whole, fraction, zone = match.groups()
    base = datetime.fromisoformat(whole + ("+00:00" if zone in (None, "Z") else zone)).timestamp()
    return base + int((fraction or "0").ljust(9, "0")) / 1e9
