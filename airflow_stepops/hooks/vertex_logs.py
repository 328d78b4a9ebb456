"""A CustomJob's log lines from Cloud Logging (``entries:list``, REST), read incrementally.

Vertex writes each replica's stdout/stderr to Cloud Logging as ``ml_job`` entries labelled with the
job id. Entries arrive late and out of order: ``entries:tail`` buffers up to 60 s "to prevent out of
order results due to late arriving log entries" (https://cloud.google.com/logging/docs/reference/v2/rest/
v2/entries/tail, ``bufferWindow``). So each read goes back ``LATE_WINDOW_SECONDS`` before the newest entry
seen and skips the ``insertId``s already shown (Cloud Logging's own de-duplication key:
https://cloud.google.com/logging/docs/reference/v2/rest/v2/LogEntry, ``insertId``): no line lost, none
repeated, unless one is more than the window late.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from airflow_stepops.timestamps import epoch

PAGE_SIZE = 1000
MAX_PAGES = 10
LATE_WINDOW_SECONDS = 60
ATTEMPTS = 3


def logging_url(endpoint: str | None) -> str:
    base = endpoint or "logging.googleapis.com"
    if "://" not in base:
        base = f"https://{base}"
    return base.rstrip("/") + "/v2/entries:list"


def list_request(project: str, job_id: str, cursor: dict[str, Any], page_token: str | None) -> dict[str, Any]:
    clauses = ['resource.type="ml_job"', f'resource.labels.job_id="{job_id}"']
    newest = epoch(cursor.get("ts"))
    if newest is not None:  # a read that stopped at MAX_PAGES goes on from where it stopped
        since = datetime.fromtimestamp(newest, timezone.utc) - timedelta(
            seconds=0 if cursor.get("behind") else LATE_WINDOW_SECONDS)
        clauses.append(f'timestamp>="{since.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}"')
    body: dict[str, Any] = {"resourceNames": [f"projects/{project}"], "filter": " AND ".join(clauses),
                            "orderBy": "timestamp asc", "pageSize": PAGE_SIZE}
    if page_token:
        body["pageToken"] = page_token
    return body


def take(entries: list[dict[str, Any]], cursor: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """New lines of a page (insert ids already shown skipped), and the advanced cursor: the newest
    timestamp and the insert ids seen within the late window before it."""
    seen: dict[str, str] = dict(cursor.get("seen") or {})
    newest = cursor.get("ts")
    lines: list[str] = []
    for entry in entries:
        stamp, insert_id = str(entry.get("timestamp") or ""), str(entry.get("insertId") or "")
        if insert_id in seen:
            continue
        seen[insert_id] = stamp
        lines.append(entry_text(entry))
        if (epoch(stamp) or 0.0) > (epoch(newest) or 0.0):
            newest = stamp
    floor = (epoch(newest) or 0.0) - LATE_WINDOW_SECONDS
    return lines, {"ts": newest, "seen": {i: t for i, t in seen.items() if (epoch(t) or 0.0) >= floor}}


def entry_text(entry: dict[str, Any]) -> str:
    if "textPayload" in entry:
        return str(entry["textPayload"]).rstrip("\n")
    payload = entry.get("jsonPayload") or {}
    return str(payload.get("message", payload)).rstrip("\n")


async def aread_entries(session: Any, url: str, token: str, project: str, job_id: str,
                        cursor: Any) -> tuple[list[str], Any]:
    """``session`` is an ``aiohttp.ClientSession`` (with its timeout); ``token`` a bearer token. A call that
    fails transiently (5xx, a dropped connection, no answer in time) is tried again, at most ``ATTEMPTS`` times."""
    import asyncio

    import aiohttp

    cursor, out, page_token = dict(cursor or {}), [], None
    request = list_request(project, job_id, cursor, None)
    for _ in range(MAX_PAGES):
        for attempt in range(ATTEMPTS):
            try:
                async with session.post(url, json={**request, **({"pageToken": page_token} if page_token else {})},
                                        headers={"Authorization": f"Bearer {token}"}) as response:
                    if response.status >= 500 and attempt < ATTEMPTS - 1:
                        await asyncio.sleep(2**attempt)
                        continue
                    if response.status >= 400:
                        raise RuntimeError(f"Cloud Logging entries:list answered {response.status}: "
                                           f"{(await response.text())[:500]}")
                    page = await response.json()
                    break
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError):
                if attempt == ATTEMPTS - 1:
                    raise
                await asyncio.sleep(2**attempt)
        lines, cursor = take(page.get("entries") or [], cursor)
        out += lines
        page_token = page.get("nextPageToken")
        if not page_token:
            break
    return out, {**cursor, "behind": bool(page_token)}
