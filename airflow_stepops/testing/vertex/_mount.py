"""``/gcs/``: Vertex AI mounts every bucket at ``/gcs/<bucket>/`` (Cloud Storage FUSE); here, a directory.

Nothing can mount ``/gcs`` on the host, so each job gets ``<workdir>/jobs/<id>/gcs/`` and the ``/gcs/``
prefix is rewritten to it in the job's command, args and env values. The objects those texts name are
copied in before the process starts: ``/gcs/<bucket>/<path>`` brings the object ``<path>`` if there is
one, else everything under ``<path>/`` (a bare ``/gcs/<bucket>`` brings the bucket). When the process has
ended (also when it failed, was cancelled or was preempted) every file under the directory that is new or
changed goes back to ``gs://<bucket>/<key>``. Files the job deletes are not deleted from the bucket, and
nothing is uploaded while the process runs (gcsfuse uploads a file when it is closed).

As with gcsfuse, a directory exists only where objects are: each mentioned bucket's directory is made,
and the directories of the objects brought in; a job writing ``/gcs/b/out/y.txt`` makes ``out/`` itself
(``os.makedirs``), as it must on Vertex when ``out/`` holds no object yet.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from airflow_stepops.testing.vertex._gcs import FakeGcsServer

logger = logging.getLogger(__name__)

#: ``/gcs/`` where it starts a path (not inside ``/tmp/gcs/``)
_PREFIX = re.compile(r"(?<![\w.\-/])/gcs/")
#: a whole ``/gcs/...`` path, also inside JSON, ``--flag=/gcs/...`` or ``(/gcs/...)``
_MENTION = re.compile(r"(?<![\w.\-/])/gcs/[^\s\"',;)\]}>]+")  # not ":": run ids have it


class GcsMount:
    """The stand-in for one job's ``/gcs`` mount: ``root`` is the directory ``/gcs/`` becomes."""

    def __init__(self, gcs: FakeGcsServer, root: Path) -> None:
        self.gcs = gcs
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._seen: dict[str, tuple[int, int]] = {}

    def rewrite(self, text: str) -> str:
        return _PREFIX.sub(lambda _m: f"{self.root}/", text)

    @staticmethod
    def mentions(texts: list[str]) -> list[tuple[str, str]]:
        """``(bucket, path)`` of every ``/gcs/<bucket>/<path>`` in ``texts``, in order, once each."""
        found: dict[tuple[str, str], None] = {}
        for text in texts:
            for match in _MENTION.finditer(text):
                bucket, _, path = match.group(0)[len("/gcs/"):].partition("/")
                if bucket:
                    found[(bucket, path.strip("/"))] = None
        return list(found)

    def download(self, texts: list[str]) -> list[str]:
        """Bring in what ``texts`` name; the ``gs://`` URIs copied. Missing objects are skipped (the job
        then finds no file, as it would on Vertex)."""
        copied: list[str] = []
        for bucket, path in self.mentions(texts):
            (self.root / bucket).mkdir(parents=True, exist_ok=True)
            keys: list[str] = []
            if path and self.gcs.stat(bucket, path) is not None:
                keys.append(path)
            else:
                keys += [item["name"] for item in self.gcs.list(bucket, f"{path}/" if path else "")]
            for key in keys:
                dest = self._local(bucket, key)
                if dest is None:
                    continue
                if key.endswith("/"):  # a "directory" placeholder object
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                self.gcs.download(bucket, key, dest)
                copied.append(f"gs://{bucket}/{key}")
        self._seen = self._scan()
        return copied

    def upload_changes(self) -> tuple[list[str], list[str]]:
        """Upload new and changed files; (the ``gs://`` URIs uploaded, the errors)."""
        uploaded: list[str] = []
        errors: list[str] = []
        for rel, stamp in sorted(self._scan().items()):
            if self._seen.get(rel) == stamp:
                continue
            bucket, _, key = rel.partition("/")
            if not key:
                continue
            try:
                self.gcs.upload(bucket, key, self.root / rel)
            except Exception as exc:  # e.g. no such bucket: the job's write is lost, as with gcsfuse
                errors.append(f"gs://{bucket}/{key}: {exc}")
                logger.warning("could not upload gs://%s/%s: %s", bucket, key, exc)
                continue
            uploaded.append(f"gs://{bucket}/{key}")
            self._seen[rel] = stamp
        return uploaded, errors

    def _local(self, bucket: str, key: str) -> Path | None:
        dest = (self.root / bucket / key).resolve()
        root = (self.root / bucket).resolve()
        if dest != root and root not in dest.parents:  # a key with ".." must not escape the mount
            logger.warning("skipping gs://%s/%s: it leaves the mount", bucket, key)
            return None
        return dest

    def _scan(self) -> dict[str, tuple[int, int]]:
        found: dict[str, tuple[int, int]] = {}
        for path in self.root.rglob("*"):
            if path.is_file() and not path.is_symlink() and not path.name.endswith(".emulator-download"):
                info = path.stat()
                found[path.relative_to(self.root).as_posix()] = (info.st_size, info.st_mtime_ns)
        return found
