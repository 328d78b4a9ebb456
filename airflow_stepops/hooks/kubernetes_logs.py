"""Pod logs of a step: incremental reads without loss or repeats, and the output block inside them.

Log reads ask for ``timestamps=true`` and ``sinceSeconds`` (the sync client has no ``sinceTime``),
reaching back a little further than the newest line seen, and drop what was already shown. Lines are
recognised by (timestamp, text, occurrence), so identical timestamps, stdout and stderr lines out of
order, and node clocks ahead of ours lose nothing and repeat nothing.

The pod's output comes back through its termination message (see ``runtime/entry.py``), whose
last line is a record carrying ``::stepops-output:<job name>:``: the output itself when small, else
the sha256 and size of a block printed at the end of the pod log. Block lines carry the same prefix;
they are data, never shown as log, and are found anywhere in a line (a step's last line may lack its
newline), so stray output between them does no harm.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import time
from typing import Any

from airflow_stepops.runtime.protocol import OUTPUT_PREFIX
from airflow_stepops.timestamps import epoch

#: seconds re-read before the newest line seen, to cover lines written out of order and clock skew
OVERLAP_SECONDS = 10
MAX_LINES_PER_READ = 5000
#: remembered line keys at most; past it, lines up to the oldest one forgotten count as shown (a
#: "floor"): only a line written more than that many lines late could be missed, none is repeated
MAX_REMEMBERED = 20000


def block_prefix(marker: str) -> str:
    return OUTPUT_PREFIX.format(marker=marker)


def fresh_cursor(cursor: Any, pod: str) -> dict[str, Any]:
    if isinstance(cursor, dict) and cursor.get("pod") == pod:
        return cursor
    return {"pod": pod, "newest": None, "ahead": 0.0, "seen": [], "floor": None}


def since_seconds(cursor: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """``since_seconds`` for the next read (nothing on the first read: the whole log)."""
    if cursor.get("newest") is None:
        return {}
    now = time.time() if now is None else now
    age = now + float(cursor.get("ahead") or 0.0) - float(cursor["newest"])
    return {"since_seconds": max(math.ceil(age) + OVERLAP_SECONDS, 1)}


def new_lines(text: str, cursor: dict[str, Any], marker: str, now: float | None = None) -> tuple[list[str],
                                                                                                 dict[str, Any]]:
    """The lines of ``text`` (a ``timestamps=true`` log read) not shown before, and the next cursor."""
    now = time.time() if now is None else now
    prefix = block_prefix(marker)
    seen = set(cursor.get("seen") or [])
    floor = cursor.get("floor")
    newest = cursor.get("newest")
    ahead = float(cursor.get("ahead") or 0.0)
    counts: dict[tuple[str, str], int] = {}
    keys: list[tuple[float, str]] = []
    lines: list[str] = []
    for raw in text.split("\n"):
        if not raw:
            continue
        stamp, _, line = raw.partition(" ")
        when = epoch(stamp)
        if when is None:  # not a log line of the kubelet's format: show it as it is
            lines.append(raw)
            continue
        digest = hashlib.sha1(line.encode(errors="replace")).hexdigest()[:12]
        counts[(stamp, digest)] = counts.get((stamp, digest), 0) + 1
        key = f"{stamp}|{digest}|{counts[(stamp, digest)]}"
        if key in seen or (floor is not None and when <= floor):
            continue
        if len(lines) >= MAX_LINES_PER_READ:
            break
        seen.add(key)
        keys.append((when, key))
        newest = when if newest is None else max(float(newest), when)
        ahead = max(ahead, when - now)
        cut = line.find(prefix)
        shown = line if cut < 0 else line[:cut]
        if cut < 0 or shown:
            lines.append(shown.rstrip("\r").rsplit("\r", 1)[-1])
    # remember only keys inside the window the next read can return again
    horizon = (float(newest) if newest is not None else now) - OVERLAP_SECONDS - 5
    kept = sorted([(epoch(key.split("|", 1)[0]) or 0.0, key) for key in (cursor.get("seen") or [])] + keys)
    kept = [(when, key) for when, key in kept if when >= horizon]
    if len(kept) > MAX_REMEMBERED:
        floor = max(float(floor or 0.0), kept[-MAX_REMEMBERED - 1][0])
        kept = [(when, key) for when, key in kept[-MAX_REMEMBERED:] if when > floor]
    return lines, {"pod": cursor["pod"], "newest": newest, "ahead": ahead, "seen": [key for _, key in kept],
                   "floor": floor}


def output_record(message: str | None, marker: str) -> tuple[str, str, str] | None:
    """``(kind, sha256, payload)`` of the record ending a termination message: kind ``data`` carries the
    archive in base64, kind ``log`` its size (the archive is a block in the pod log)."""
    last = (message or "").rstrip("\n").rsplit("\n", 1)[-1]
    prefix = block_prefix(marker)
    if not last.startswith(prefix):
        return None
    kind, _, rest = last[len(prefix):].partition(":")
    digest, _, payload = rest.partition(":")
    return (kind, digest, payload) if kind in ("data", "log") else None


def decode_record(digest: str, payload: str) -> bytes | None:
    """The archive of a ``data`` record, if undamaged."""
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return None
    return data if hashlib.sha256(data).hexdigest() == digest else None


def extract_output_block(text: str, marker: str, digest: str | None = None) -> bytes | None:
    """The last complete, undamaged output archive in a pod log (read without timestamps); with
    ``digest``, only the block of that sha256."""
    prefix = block_prefix(marker)
    found: bytes | None = None
    chunks: dict[int, str] | None = None
    for line in text.split("\n"):
        cut = line.find(prefix)
        if cut < 0:
            continue
        kind, _, rest = line[cut + len(prefix):].rstrip("\r").partition(":")
        if kind == "begin":
            chunks = {}
        elif kind == "end" and chunks is not None:
            data = _assemble(chunks, rest.rstrip(":"))
            found = data if data is not None and digest in (None, rest.rstrip(":")) else found
            chunks = None
        elif kind.isdigit() and chunks is not None:
            chunks[int(kind)] = rest
    return found


def _assemble(chunks: dict[int, str], digest: str) -> bytes | None:
    if sorted(chunks) != list(range(len(chunks))):
        return None
    return decode_record(digest, "".join(chunks[i] for i in range(len(chunks))))
