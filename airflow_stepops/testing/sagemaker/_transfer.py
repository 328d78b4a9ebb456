"""Moving files between the emulated S3 and a job's directory, the way SageMaker's agent does.

The emulator's runner calls these with an ordinary boto3 S3 client pointed at moto's server, so the
data goes through the same API the steps use.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Any


class DataError(Exception):
    """An input could not be fetched; the job fails with ``ClientError: <message>``."""


def parse_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise DataError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise DataError(f"{uri!r} names no bucket")
    return bucket, key


def join_s3(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def _relative(key: str, prefix: str) -> str:
    """Where an object under an S3Prefix lands, relative to the channel directory.

    A prefix naming a "directory" (``data/train`` for ``data/train/a.csv``) is stripped whole; a partial
    one (``data/tr``) is stripped up to its last ``/``, so the rest of the key is kept; an object
    named exactly by the prefix keeps its base name.
    """
    rest = key[len(prefix):]
    if not rest:
        return key.rsplit("/", 1)[-1]
    if prefix.endswith("/") or rest.startswith("/"):
        return rest.lstrip("/")
    return key[prefix.rfind("/") + 1:]


def list_keys(s3: Any, bucket: str, prefix: str) -> list[dict[str, Any]]:
    from botocore.exceptions import ClientError

    objects: list[dict[str, Any]] = []
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            objects.extend(obj for obj in page.get("Contents", []) if not obj["Key"].endswith("/"))
    except ClientError as exc:
        raise DataError(f"{exc.response['Error'].get('Code')}: {exc.response['Error'].get('Message')}") from exc
    return objects


def download_prefix(s3: Any, uri: str, dest: Path, *, required: bool, region: str) -> int:
    """Copy every object under the S3 prefix ``uri`` into ``dest`` keeping relative paths; the count."""
    bucket, prefix = parse_s3_uri(uri)
    try:
        objects = list_keys(s3, bucket, prefix)
    except DataError:
        if not required:
            return 0
        objects = []
    if not objects:
        if required:
            raise DataError(f'Data download failed:No S3 objects found under S3 URL "{uri}" given in input data '
                            f"source. Please ensure that the bucket exists in the selected region ({region}), that "
                            f'objects exist under that S3 prefix, and that the role has "s3:ListBucket" '
                            f"permissions on bucket \"{bucket}\".")
        return 0
    dest.mkdir(parents=True, exist_ok=True)
    for obj in objects:
        target = dest / _relative(obj["Key"], prefix)
        if dest.resolve() not in target.resolve().parents:
            continue  # a key such as "a/../../x" stays out of the job directory
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, obj["Key"], str(target))
    return len(objects)


def tarball(source: Path, dest: Path) -> Path:
    """``source``'s content as a gzip tarball whose members are relative (no leading directory)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w:gz") as tar:
        if source.is_dir():
            for entry in sorted(source.iterdir()):
                tar.add(entry, arcname=entry.name)
    return dest


def upload_file(s3: Any, path: Path, uri: str) -> None:
    bucket, key = parse_s3_uri(uri)
    s3.upload_file(str(path), bucket, key)


class DirectorySync:
    """Mirror a local directory to an S3 prefix, uploading only files changed since the last call.

    SageMaker syncs ``/opt/ml/checkpoints`` to ``CheckpointConfig.S3Uri`` while the job runs; the runner
    calls ``sync()`` every ``checkpoint_sync_interval`` and once more when a run ends.
    """

    def __init__(self, s3: Any, local: Path, uri: str) -> None:
        self.s3, self.local, self.uri = s3, local, uri
        self._seen: dict[str, tuple[int, int]] = {}

    def mark_current(self) -> None:
        """Treat what is in the directory now (restored from S3) as already uploaded."""
        self._seen = dict(self._scan())

    def _scan(self) -> list[tuple[str, tuple[int, int]]]:
        found = []
        if self.local.is_dir():
            for root, _dirs, files in os.walk(self.local):
                for name in files:
                    path = Path(root) / name
                    try:
                        stat = path.stat()
                    except FileNotFoundError:
                        continue  # written and removed between walk and stat
                    found.append((path.relative_to(self.local).as_posix(), (stat.st_size, stat.st_mtime_ns)))
        return found

    def sync(self) -> int:
        uploaded = 0
        for rel, signature in self._scan():
            if self._seen.get(rel) == signature:
                continue
            try:
                upload_file(self.s3, self.local / rel, join_s3(self.uri, rel))
            except FileNotFoundError:
                continue
            self._seen[rel] = signature
            uploaded += 1
        return uploaded
