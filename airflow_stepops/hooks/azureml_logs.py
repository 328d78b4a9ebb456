"""An Azure ML job's ``user_logs/std_log.txt``, read incrementally through its run-history SAS URL.

Run history's ``runs/<name>/details`` lists the job's log files (``logFiles``: name -> read-only SAS URL)
once they exist, and the run's status; that is how ``ml_client.jobs.stream`` follows a job, asking for the
details before every read. The file is uploaded again and again while the job runs, each time longer, its
beginning unchanged: the SDK's own streaming (``azure.ai.ml.operations._job_ops_helper._incremental_print``)
re-reads the whole file and skips the lines it printed before. So a byte offset cannot skip lines that
arrive late, and each read asks for ``Range: bytes=<offset>-`` only. An upload can end inside a line, even
inside a UTF-8 character: the unfinished last line is not consumed (the next read starts where it starts)
until the run has ended, so no line is shown twice, cut in two or garbled.
"""

from __future__ import annotations

from typing import Any

STD_LOG = "user_logs/std_log.txt"
#: bytes read at most per call (the rest comes with the next poll)
MAX_READ = 4 << 20
#: run statuses after which the log gets nothing more
ENDED = frozenset({"Completed", "Failed", "Canceled"})


def log_url(log_files: dict[str, str] | None) -> str | None:
    """The SAS URL of the user process's output among a run's log files."""
    files = log_files or {}
    if STD_LOG in files:
        return files[STD_LOG]
    for name in sorted(files):  # a multi-node or older runtime: std_log_process_0.txt, 70_driver_log.txt
        if name.startswith("user_logs/std_log") or name.endswith("driver_log.txt"):
            return files[name]
    return None


def take(data: bytes, cursor: dict[str, Any], ended: bool) -> tuple[list[str], dict[str, Any]]:
    """The complete lines of the bytes read at the cursor, and the cursor after them."""
    offset = int(cursor.get("offset") or 0)
    end = data.rfind(b"\n") + 1
    if (ended and len(data) < MAX_READ) or (not end and len(data) >= MAX_READ):
        end = len(data)  # the unfinished last line once nothing more comes; a line longer than a read
    lines = data[:end].decode("utf-8", errors="replace").split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines], {"offset": offset + end}


def read_range(session: Any, url: str, cursor: dict[str, Any], timeout: float = 60.0) -> bytes:
    """The bytes at the cursor's offset, read with a ``requests`` session; none on an error answer (416:
    nothing past the offset yet; 404: no file yet; 403: an expired SAS URL, fresh with the next details)."""
    offset = int(cursor.get("offset") or 0)
    response = session.get(url, headers={"Range": f"bytes={offset}-{offset + MAX_READ - 1}",
                                         "x-ms-version": "2021-08-06"}, timeout=(min(timeout, 20), timeout))
    if response.status_code >= 400:
        return b""
    if response.status_code == 200 and offset:  # the server ignored the range: skip what was read
        return bytes(response.content[offset:])
    return bytes(response.content)
