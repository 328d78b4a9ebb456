"""A container's view of a Modal volume: a copy of its committed state, committed back as Modal commits.

Modal mounts a volume's latest committed state when a container starts; what the container writes stays
its own until a commit: an explicit ``Volume.commit()``, a background commit (every few seconds while the
function runs) or the final commit when the container exits, which the container runtime makes after the
function's exit handlers, so also after a preemption's interrupt. A container killed outright keeps nothing
it wrote since its last commit. Commits from several containers merge file by file; the last writer of a
file wins (https://modal.com/docs/guide/volumes, "Volume commits and reloads" and "Background commits";
https://modal.com/docs/sdk/py/latest/modal.Volume; https://modal.com/docs/guide/preemption).

Here a mount is a directory of the task (``<task dir>/mounts/<volume id>/``) filled from the volume's
directory when the task starts; ``commit`` carries the files the task created, changed or deleted since the
last commit back to the volume's directory. Nothing reloads a running task's copy.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

from airflow_stepops.testing.modal._objects import Volume

#: one lock per volume directory: commits of different tasks to one volume are applied one at a time
_LOCKS: dict[Path, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock(path: Path) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(path, threading.Lock())


def _scan(root: Path) -> dict[str, tuple[int, int]]:
    """Relative path → (size, mtime_ns) of every file under ``root``; directories as (-1, 0)."""
    found: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for name in dirnames:
            found[(base / name).relative_to(root).as_posix()] = (-1, 0)
        for name in filenames:
            path = base / name
            try:
                stat = path.stat()
            except FileNotFoundError:  # removed while scanned
                continue
            found[path.relative_to(root).as_posix()] = (stat.st_size, stat.st_mtime_ns)
    return found


class VolumeMount:
    """One task's copy of one volume (read-only mounts never commit)."""

    def __init__(self, volume: Volume, mount_path: str, local: Path, read_only: bool = False,
                 sub_path: str = "") -> None:
        self.volume, self.mount_path, self.local, self.read_only = volume, mount_path, local, read_only
        self.source = volume.path / sub_path.strip("/") if sub_path else volume.path
        self._seen: dict[str, tuple[int, int]] = {}
        self._commit_lock = threading.Lock()

    def mount(self) -> None:
        """Copy the volume's committed state in: what the task sees when it starts."""
        with _lock(self.volume.path):
            if self.source.is_dir():
                shutil.copytree(self.source, self.local, dirs_exist_ok=True)
            self.local.mkdir(parents=True, exist_ok=True)
            self._seen = _scan(self.local)

    def commit(self) -> int:
        """Carry the task's changes since the last commit to the volume; returns how many paths changed."""
        if self.read_only:
            return 0
        with self._commit_lock, _lock(self.volume.path):
            now = _scan(self.local)
            changed = 0
            for rel in sorted(set(self._seen) - set(now), reverse=True):  # deleted by the task: deepest first
                target = self.source / rel
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    target.unlink(missing_ok=True)
                changed += 1
            for rel, (size, mtime) in sorted(now.items()):
                if self._seen.get(rel) == (size, mtime):
                    continue
                target = self.source / rel
                if size < 0:
                    target.mkdir(parents=True, exist_ok=True)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    partial = target.with_name(f".{target.name}.commit")
                    try:
                        shutil.copy2(self.local / rel, partial)
                    except FileNotFoundError:  # removed since the scan: the next commit sees it gone
                        continue
                    partial.replace(target)
                changed += 1
            self._seen = now
            return changed
