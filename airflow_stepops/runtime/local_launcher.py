"""Supervise one local step as a detached process: limits, timeout, cancellation, final status.

Usage: ``python local_launcher.py JOB_DIR [--detach]``

Started by the local hook, it outlives the Airflow worker (its own session, re-parented to init), so
a retried task can re-attach through the files it keeps in JOB_DIR:

- ``spec.json``     what to run and with which limits (written by the hook)
- ``launcher.json`` pid and start time of this supervisor
- ``child.json``    pid of the step process
- ``step.log``      the step's stdout and stderr
- ``status.json``   the terminal state, written once, atomically

Stdlib-only, like the rest of ``runtime/``.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time

if __name__.startswith("airflow_stepops."):  # imported by the local hook
    from airflow_stepops.runtime import protocol
else:  # run as a script from this directory
    import protocol  # type: ignore[import-not-found,no-redef]

POLL_SECONDS = 0.2


def write_json(path: str, data: dict) -> None:
    """Atomic write (unique temp name: the hook and the launcher may both write a status)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)


def process_start_time(pid: int) -> str | None:
    """Kernel start time of ``pid`` (tells a live process from a recycled pid); None if gone/zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def _processes() -> dict[int, tuple[int, str, int]]:
    """pid -> (parent pid, state, resident pages) of every process in /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table[int(entry)] = (int(fields[1]), fields[0], int(fields[21]))
    return table


def descendants(root: int, table: dict[int, tuple[int, str, int]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            found.append(pid)
            todo.append(pid)
    return found


def marked_processes(job_dir: str) -> list[int]:
    """Processes whose environment carries this job's ``Env.JOB_DIR``: the step's, also those that
    left every process group and tree we know (a launcher that died no longer adopts them)."""
    marker = b"\0" + os.fsencode(f"{protocol.Env.JOB_DIR}={job_dir}") + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as fh:
                    environ = fh.read()
            except OSError:
                continue
            if marker in b"\0" + environ:
                found.append(int(entry))
    return found


def _signal(pids: set[int] | list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def end_step_processes(job_dir: str, root: int | None = None, rounds: int = 100) -> None:
    """SIGKILL everything the step started: descendants of ``root`` (the launcher, which adopts orphans)
    and any process carrying the job's environment marker, until none is left; reap what we adopted."""
    for _ in range(rounds):
        table = _processes()
        tree = set(descendants(root, table)) if root else set()
        for pid in tree:  # adopted processes that already ended: reap them
            if table[pid][1] in ("Z", "X") and table[pid][0] == root:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
        alive = {pid for pid in tree | set(marked_processes(job_dir)) if table.get(pid, (0, "R", 0))[1] not in ("Z", "X")}
        if not alive:
            return
        _signal(alive, signal.SIGKILL)
        time.sleep(0.05)


def become_subreaper() -> bool:
    """Make orphaned descendants (a double-forked daemon, a ``setsid`` child whose parent exited) children
    of this process instead of init, so the whole tree the step started stays ours to end. prctl(2):
    PR_SET_CHILD_SUBREAPER (36), Linux 3.4+."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class Launcher:
    def __init__(self, job_dir: str) -> None:
        self.job_dir = job_dir
        with open(os.path.join(job_dir, "spec.json"), encoding="utf-8") as fh:
            self.spec = json.load(fh)
        self.stop_reason: str | None = None

    def path(self, name: str) -> str:
        return os.path.join(self.job_dir, name)

    def _limit_child(self) -> None:
        """Runs in the child between fork and exec (the launcher is single-threaded)."""
        os.setsid()
        cpu_ids = self.spec.get("cpu_ids")
        if cpu_ids:
            os.sched_setaffinity(0, cpu_ids)
        limit = self.spec.get("memory_limit_bytes")
        if limit and self.spec.get("limit_data_segment", True):
            resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
        if self.spec.get("nice"):
            os.nice(int(self.spec["nice"]))

    def _on_signal(self, signum: int, _frame) -> None:
        self.stop_reason = self.stop_reason or "cancelled"

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        become_subreaper()
        started = time.time()
        if os.path.exists(self.path("status.json")):  # cancelled before the step could start
            return 0
        env = dict(self.spec["env"])
        if self.spec.get("memory_limit_bytes") and self.spec.get("limit_data_segment", True):
            env[protocol.Env.MEMORY_LIMIT_BYTES] = str(self.spec["memory_limit_bytes"])  # bootstrap names it
        with open(self.path("step.log"), "ab", buffering=0) as log:
            try:
                child = subprocess.Popen(
                    self.spec["argv"],
                    cwd=self.spec.get("cwd") or self.job_dir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=self._limit_child,
                    close_fds=True,
                )
            except OSError as exc:
                write_json(self.path("status.json"), {
                    "state": "failed", "exit_code": None, "reason": f"cannot start step process: {exc}",
                    "started_at": started, "finished_at": time.time(),
                })
                return 1
        write_json(self.path("child.json"),
                   {"pid": child.pid, "start_time": process_start_time(child.pid), "started_at": started})
        deadline = started + self.spec["max_runtime_seconds"] if self.spec.get("max_runtime_seconds") else None
        memory_limit = self.spec.get("memory_limit_bytes")
        peak_rss = 0
        killed_at: float | None = None
        while True:
            try:  # returns as soon as the step exits; the timeout paces the checks below
                code = child.wait(timeout=POLL_SECONDS)
                break
            except subprocess.TimeoutExpired:
                pass
            table = _processes()  # one look at /proc a tick, for reaping and for the memory limit
            self._reap_adopted(child.pid, table)
            if memory_limit:
                rss = sum(table[pid][2] for pid in descendants(os.getpid(), table)) * os.sysconf("SC_PAGE_SIZE")
                peak_rss = max(peak_rss, rss)
                if rss > memory_limit and self.stop_reason is None:
                    self.stop_reason = "oom_killed"
                    killed_at = self._kill(child, signal.SIGKILL)
            if deadline and time.time() > deadline and self.stop_reason is None:
                self.stop_reason = "timed_out"
            if self.stop_reason and killed_at is None:
                killed_at = self._kill(child, signal.SIGTERM)
            if killed_at is not None and time.time() - killed_at > float(self.spec.get("cancel_grace_seconds", 10)):
                self._kill(child, signal.SIGKILL)
        # whatever the step started (its group, new sessions, daemons) ends with it
        end_step_processes(self.job_dir, os.getpid())
        state = self.stop_reason or ("succeeded" if code == 0 else "failed")
        reasons = {
            "oom_killed": f"the step used more than its memory limit of {memory_limit} bytes and was killed",
            "timed_out": f"the step ran longer than max_runtime_in_seconds={self.spec.get('max_runtime_seconds')}",
            "cancelled": "the step was stopped on request",
        }
        reason = reasons.get(state) or (
            "" if code == 0 else f"step process exited with code {code}" if code > 0
            else f"step process was killed by signal {-code}"
        )
        if not os.path.exists(self.path("status.json")):
            write_json(self.path("status.json"), {
                "state": state, "exit_code": code, "reason": reason, "started_at": started,
                "finished_at": time.time(), "peak_rss_bytes": peak_rss or None,
            })
        return 0

    @staticmethod
    def _kill(child: subprocess.Popen, sig: int) -> float:
        """Signal the step's group and every process below this launcher (it adopts the step's orphans)."""
        try:
            os.killpg(child.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        _signal(descendants(os.getpid(), _processes()), sig)
        return time.time()

    @staticmethod
    def _reap_adopted(step_pid: int, table: dict[int, tuple[int, str, int]]) -> None:
        """Adopted orphans that ended are our zombies; the step process itself is left to Popen.wait."""
        me = os.getpid()
        for pid, (ppid, state, _) in table.items():
            if ppid == me and state == "Z" and pid != step_pid:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass


def main(argv: list[str]) -> int:
    job_dir = os.path.abspath(argv[0])
    if "--detach" in argv[1:]:
        read_fd, write_fd = os.pipe()
        if os.fork():  # parent: return once the supervisor has recorded itself
            os.close(write_fd)
            return 0 if os.read(read_fd, 1) == b"1" else 1
        os.close(read_fd)
        os.setsid()
        os.chdir("/")
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        write_json(os.path.join(job_dir, "launcher.json"),
                    {"pid": os.getpid(), "start_time": process_start_time(os.getpid())})
        os.write(write_fd, b"1")
        os.close(write_fd)
        try:
            code = Launcher(job_dir).run()
        except BaseException as exc:
            write_json(os.path.join(job_dir, "status.json"),
                        {"state": "failed", "exit_code": None, "reason": f"launcher crashed: {exc!r}",
                         "started_at": time.time(), "finished_at": time.time()})
            code = 1
        os._exit(code)
    write_json(os.path.join(job_dir, "launcher.json"),
                {"pid": os.getpid(), "start_time": process_start_time(os.getpid())})
    return Launcher(job_dir).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
