"""Artifact store I/O on the worker, and ``ArtifactRef`` for results that do not belong in XCom.

Everything goes through ``airflow.sdk.ObjectStoragePath`` (fsspec), so any store Airflow can reach
works: ``file://``, ``s3://``, ``gs://``, ``abfs://``...
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, NoReturn

from airflow_stepops.exceptions import StepOperatorConfigError

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

CHUNK = 8 << 20
#: how to create the bucket or container of a store, by protocol (the message names the missing one)
CREATE_HINTS = {
    "s3": "aws s3 mb s3://{bucket}",
    "gs": "gcloud storage buckets create gs://{bucket}",
    "gcs": "gcloud storage buckets create gs://{bucket}",
    "abfs": "az storage container create --name {bucket} --account-name <storage account>",
    "az": "az storage container create --name {bucket} --account-name <storage account>",
    "adl": "az storage container create --name {bucket} --account-name <storage account>",
}
#: (protocol, conn_id, bucket) of stores seen to exist by this process
_checked_buckets: set[tuple[str, str | None, str]] = set()


def default_local_store() -> str:
    """``file://`` URI of the default store, a directory under ``AIRFLOW_HOME``."""
    from airflow_stepops._compat import airflow_home

    return "file://" + os.path.join(airflow_home(), "stepops", "artifacts")


def store_path(uri: str) -> ObjectStoragePath:
    from airflow.sdk import ObjectStoragePath

    try:
        return ObjectStoragePath(uri)
    except Exception as exc:
        raise StepOperatorConfigError(f"artifact_store: cannot open {uri!r}: {exc}") from exc


def check_bucket(path: ObjectStoragePath) -> None:
    """Refuse a store whose bucket (or blob container) does not exist, once per process and bucket
    (the operator calls it through ``hook.check_store()`` before writing a bundle).

    Writing through fsspec would otherwise create it: s3fs, gcsfs and adlfs all make the bucket in
    ``mkdir(parents=True)``, so a misspelt name silently became a new bucket. One call: S3 HeadBucket
    (s3fs ``info``), GCS objects.list with maxResults=1, Azure Get Container Properties (adlfs ``info``);
    each client maps "not found" (404) to ``FileNotFoundError``. HeadBucket answers 404 for a missing bucket
    and 403 without permission (AWS SDK, HeadBucketCommand: "a generic 404 Not Found or 403 Forbidden");
    a 403 tells nothing, so it is let through.
    """
    if local_path(path) is not None or not path.bucket:
        return
    key = (path.protocol, path.conn_id, path.bucket)
    if key in _checked_buckets:
        return
    try:
        if path.protocol in ("gs", "gcs"):
            # list one object: needs only storage.objects.list (roles/storage.objectAdmin has no
            # storage.buckets.get), and a missing bucket answers 404 (gcsfs: FileNotFoundError)
            path.fs.call("GET", "b/{}/o", path.bucket, maxResults=1, json_out=True)
        else:
            path.fs.info(path.bucket, refresh=True)
    except FileNotFoundError:
        what = "container" if path.protocol in ("abfs", "az", "adl") else "bucket"
        hint = CREATE_HINTS.get(path.protocol, "create it with the storage service's tools").format(bucket=path.bucket)
        raise StepOperatorConfigError(
            f"artifact_store: the {what} {path.bucket!r} of {str(path)!r} does not exist; step operators never "
            f"create it. Fix the name, or create it once: {hint}"
        ) from None
    except OSError as exc:  # forbidden to look (a writer need not read bucket metadata): writing will tell
        import logging

        logging.getLogger(__name__).warning("artifact_store: cannot check that %s exists (%s)", path.bucket, exc)
    _checked_buckets.add(key)


def local_path(path: ObjectStoragePath) -> str | None:
    """The filesystem path of a ``file://`` location, None for remote stores."""
    return path.path if path.protocol in ("file", "local", "") else None


@dataclass(frozen=True)
class ArtifactRef:
    """A step result kept in the artifact store; XCom carries only this reference.

    Downstream step tasks receive the value itself (the reference is resolved remotely); in a
    normal task call ``ref.load()``. The sha256 is checked on every read. Using the reference as if
    it were the value (indexing, iterating, ``len``, an attribute of the value) raises an error that
    says so: loading silently would unpickle a possibly huge file wherever a task touched it.
    """

    __version__ = 1

    uri: str
    type: str
    size: int
    sha256: str

    @property
    def path(self) -> ObjectStoragePath:
        from airflow.sdk import ObjectStoragePath

        return ObjectStoragePath(self.uri)

    def open(self) -> IO[bytes]:
        """A binary file object on the stored pickle (streams; nothing is loaded)."""
        return self.path.open("rb")

    def verify(self) -> None:
        digest = hashlib.sha256()
        with self.open() as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
        if digest.hexdigest() != self.sha256:
            raise ValueError(f"artifact {self.uri} does not match its sha256 {self.sha256}: it was modified")

    def load(self) -> Any:
        """Unpickle the value, checking the sha256 in the same pass (hashing runs in a helper
        thread alongside the read). Only call this for artifacts your own steps produced."""
        import cloudpickle

        error: Exception | None = None
        with self.open() as raw:
            reader = _VerifyingReader(raw)
            try:
                value = cloudpickle.load(reader)
            except Exception as exc:  # a damaged file usually breaks unpickling first: say why
                error = exc
            try:
                reader.drain()
            finally:
                reader.close()
        if reader.sha256.hexdigest() != self.sha256 or reader.size != self.size:
            raise ValueError(f"artifact {self.uri} does not match its sha256 {self.sha256}: it was modified") from error
        if error is not None:
            raise error
        return value

    def copy_to(self, destination: str | os.PathLike[str]) -> None:
        """Stream the stored bytes to a local file, checking the sha256."""
        digest = hashlib.sha256()
        with self.open() as src, open(destination, "wb") as dst:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                dst.write(chunk)
        if digest.hexdigest() != self.sha256:
            raise ValueError(f"artifact {self.uri} does not match its sha256 {self.sha256}")

    def __str__(self) -> str:
        return f"ArtifactRef({self.type}, {self.size} bytes, {self.uri})"

    def _not_the_value(self, use: str) -> str:
        return (f"{use}: this is an ArtifactRef to the step's result ({self.type}, {self.size} bytes) stored at "
                f"{self.uri}; call .load() to get the value")

    def _refuse(self, use: str) -> NoReturn:
        raise TypeError(self._not_the_value(use))

    def __getitem__(self, key: Any) -> NoReturn:
        self._refuse(f"ArtifactRef[{key!r}]")

    def __iter__(self) -> NoReturn:
        self._refuse("iterating over an ArtifactRef")

    def __len__(self) -> NoReturn:
        self._refuse("len(ArtifactRef)")

    def __contains__(self, item: Any) -> NoReturn:
        self._refuse("'in' on an ArtifactRef")

    def __bool__(self) -> bool:  # defined, or bool() would fall back to __len__
        return True

    def __getattr__(self, name: str) -> NoReturn:
        # protocol probes (copy, pickle, numpy) and fields not set yet (unpickling) get a plain AttributeError
        if name.startswith("_") or name in self.__dataclass_fields__:
            raise AttributeError(name)
        raise AttributeError(self._not_the_value(f"ArtifactRef has no attribute {name!r}"))


class _VerifyingReader(io.RawIOBase):
    """Read-through file object that hashes what passes; within one large read, each chunk is hashed
    in a helper thread while the next is read."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._pool: Any = None
        self._pending: Any = None

    def readable(self) -> bool:
        return True

    def _hash(self, chunk: memoryview) -> None:
        if self._pending is not None:
            self._pending.result()
        if chunk.nbytes < CHUNK:
            self._pending = None
            self.sha256.update(chunk)
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stepops-verify")
        self._pending = self._pool.submit(self.sha256.update, chunk)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        total = 0
        while total < view.nbytes:
            chunk = view[total:total + CHUNK]
            read = self._raw.readinto(chunk) if hasattr(self._raw, "readinto") else _readinto(self._raw, chunk)
            if not read:
                break
            self._hash(chunk[:read])
            total += read
        if self._pending is not None:  # the caller may reuse its buffer once we return
            self._pending.result()
            self._pending = None
        self.size += total
        return total

    def drain(self) -> None:
        """Hash whatever the unpickler did not read, and wait for the hashing thread."""
        while chunk := self._raw.read(CHUNK):
            self.size += len(chunk)
            self._hash(memoryview(chunk))
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        super().close()


def _readinto(raw: IO[bytes], view: memoryview) -> int:
    data = raw.read(view.nbytes)
    view[: len(data)] = data
    return len(data)


def _allow_deserialization() -> None:
    """Let Airflow's serde rebuild ArtifactRef from XCom in any process that imported us."""
    try:
        from airflow.sdk.serde import allow_class
    except ImportError:  # Airflow < 3.3: configure [core] allowed_deserialization_classes instead
        return
    allow_class(ArtifactRef)


_allow_deserialization()
