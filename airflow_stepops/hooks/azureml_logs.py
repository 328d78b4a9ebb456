"""An Azure ML job's ``user_logs/std_log.txt``, read incrementally through its run-history SAS URL.

Run history's ``runs/<name>/details`` lists the job's log files (``logFiles``: name -> read-only SAS URL)
once they exist; that is how ``ml_client.jobs.stream`` follows a job. The cursor keeps the byte offset
read so far and an unfinished last line, so each read asks for ``Range: bytes=<offset>-`` only and no
line is shown twice or cut in two. An unfinished line is shown once a read finds nothing new (the job
wrote it without a newline, or ended).
"""

from __future__ import annotations

from typing import Any

STD_LOG = "user_logs/std_log.txt"
#: bytes read at most per call (the rest comes with the next poll)
MAX_READ = 4 << 20


def log_url(log_files: dict[str, str] | None) -> str | None:
    """The SAS URL of the user process's output among a run's log files."""
    files = log_files or {}
    if STD_LOG in files:
        return files[STD_LOG]
    for name in sorted(files):  # a multi-node or older runtime: std_log_process_0.txt, 70_driver_log.txt
        if name.startswith("user_logs/std_log") or name.endswith("driver_log.txt"):
            return files[name]
    return None


def take(data: bytes, cursor: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """Lines of the bytes read at the cursor, and the advanced cursor."""
    offset, partial = int(cursor.get("offset") or 0), str(cursor.get("partial") or "")
    if not data:
        if partial:
            return [partial], {"offset": offset, "partial": ""}
        return [], {"offset": offset, "partial": ""}
    text = partial + data.decode("utf-8", errors="replace")
    lines = text.split("\n")
    rest = lines.pop()
    return [line.rstrip("\r") for line in lines], {"offset": offset + len(data), "partial": rest}


def read_range(session: Any, url: str, cursor: dict[str, Any], timeout: float = 60.0) -> tuple[bytes, int]:
    """(the bytes at the cursor's offset, HTTP status) with a ``requests`` session; 416 and 404 mean none."""
    offset = int(cursor.get("offset") or 0)
    response = session.get(url, headers={"Range": f"bytes={offset}-{offset + MAX_READ - 1}",
                                         "x-ms-version": "2021-08-06"}, timeout=(min(timeout, 20), timeout))
    if response.status_code in (404, 416):
        return b"", response.status_code
    if response.status_code >= 400:
        return b"", response.status_code
    data = response.content
    if response.status_code == 200 and offset:  # the server ignored the range: skip what was read
        data = data[offset:]
    return data, response.status_code
