"""A CustomJob's log lines from Cloud Logging (``entries:list``, REST), read incrementally.

Vertex writes each replica's stdout/stderr to Cloud Logging as ``ml_job`` entries labelled with the
job id. The cursor keeps the newest timestamp read and the insert ids seen at it, so the next read asks
only for entries at or after it and nothing is shown twice, even when entries share a timestamp.
"""

from __future__ import annotations

from typing import Any

PAGE_SIZE = 1000
MAX_PAGES = 10


def logging_url(endpoint: str | None) -> str:
    base = endpoint or "logging.googleapis.com"
    if "://" not in base:
        base = f"https://{base}"
    return base.rstrip("/") + "/v2/entries:list"


def list_request(project: str, job_id: str, cursor: dict[str, Any], page_token: str | None) -> dict[str, Any]:
    clauses = ['resource.type="ml_job"', f'resource.labels.job_id="{job_id}"']
    if cursor.get("ts"):
        clauses.append(f'timestamp>="{cursor["ts"]}"')
    body: dict[str, Any] = {"resourceNames": [f"projects/{project}"], "filter": " AND ".join(clauses),
                            "orderBy": "timestamp asc", "pageSize": PAGE_SIZE}
    if page_token:
        body["pageToken"] = page_token
    return body


def take(entries: list[dict[str, Any]], cursor: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """New lines of a page, and the advanced cursor (entries already seen at the cursor time skipped)."""
    ts, seen = cursor.get("ts"), set(cursor.get("ids") or [])
    lines: list[str] = []
    for entry in entries:
        stamp, insert_id = entry.get("timestamp"), entry.get("insertId")
        if stamp == ts and insert_id in seen:
            continue
        if stamp != ts:
            ts, seen = stamp, set()
        seen.add(insert_id)
        lines.append(entry_text(entry))
    return lines, {"ts": ts, "ids": sorted(i for i in seen if i)}


def entry_text(entry: dict[str, Any]) -> str:
    if "textPayload" in entry:
        return str(entry["textPayload"]).rstrip("\n")
    payload = entry.get("jsonPayload") or {}
    return str(payload.get("message", payload)).rstrip("\n")


def read_entries(session: Any, url: str, project: str, job_id: str, cursor: Any) -> tuple[list[str], Any]:
    """Sync: ``session`` is a ``google.auth.transport.requests.AuthorizedSession``."""
    cursor, out, token = dict(cursor or {}), [], None
    for _ in range(MAX_PAGES):
        response = session.post(url, json=list_request(project, job_id, cursor, token), timeout=60)
        response.raise_for_status()
        page = response.json()
        lines, cursor = take(page.get("entries") or [], cursor)
        out += lines
        token = page.get("nextPageToken")
        if not token:
            break
    return out, cursor


async def aread_entries(session: Any, url: str, token: str, project: str, job_id: str,
                        cursor: Any) -> tuple[list[str], Any]:
    """Async: ``session`` is an ``aiohttp.ClientSession``; ``token`` a bearer token."""
    cursor, out, page_token = dict(cursor or {}), [], None
    for _ in range(MAX_PAGES):
        async with session.post(url, json=list_request(project, job_id, cursor, page_token),
                                headers={"Authorization": f"Bearer {token}"}) as response:
            if response.status >= 400:
                raise RuntimeError(f"Cloud Logging entries:list answered {response.status}: "
                                   f"{(await response.text())[:500]}")
            page = await response.json()
        lines, cursor = take(page.get("entries") or [], cursor)
        out += lines
        page_token = page.get("nextPageToken")
        if not page_token:
            break
    return out, cursor
