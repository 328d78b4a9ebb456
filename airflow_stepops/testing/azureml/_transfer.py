"""Where a job's data URIs point in Azurite, and copying between Azurite and a job's directories.

Understood URIs (everything the emulator can reach):

* ``azureml://datastores/<datastore>/paths/<path>`` and the long form
  ``azureml://subscriptions/<s>/resourcegroups/<rg>/workspaces/<ws>/datastores/<datastore>/paths/<path>``
  (the datastore's container in Azurite);
* ``http(s)://127.0.0.1:<azurite port>/devstoreaccount1/<container>/<path>`` (also ``localhost``);
* ``https://devstoreaccount1.blob.core.windows.net/<container>/<path>`` and
  ``wasbs://<container>@devstoreaccount1.blob.core.windows.net/<path>`` (the dev account's public names).
"""

from __future__ import annotations

import datetime
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from azure.core.exceptions import ResourceExistsError
from azure.storage.blob import BlobSasPermissions, BlobServiceClient, generate_blob_sas

from airflow_stepops.testing.azureml._azurite import ACCOUNT_KEY, ACCOUNT_NAME

_AZUREML_SHORT = re.compile(r"^azureml://datastores/(?P<ds>[^/]+)/paths/(?P<path>.*)$", re.I)
_AZUREML_LONG = re.compile(r"^azureml://subscriptions/[^/]+/resourcegroups/[^/]+/workspaces/[^/]+/datastores/"
                           r"(?P<ds>[^/]+)/paths/(?P<path>.*)$", re.I)
_WASB = re.compile(r"^wasbs?://(?P<container>[^@/]+)@(?P<account>[^./]+)\.blob\.core\.windows\.net/?(?P<path>.*)$",
                   re.I)


class DataError(Exception):
    """A data URI the emulator cannot resolve, or data that is not there."""


@dataclass(frozen=True)
class BlobLocation:
    container: str
    path: str  # blob name or prefix, without a leading slash

    def __str__(self) -> str:
        return f"{self.container}/{self.path}"


class Storage:
    """The emulator's view of Azurite: datastores, URI resolution, transfers and SAS URLs."""

    def __init__(self, connection_string: str, blob_port: int, datastores: dict[str, str]) -> None:
        self.client = BlobServiceClient.from_connection_string(connection_string)
        self.blob_port = blob_port
        self.datastores = datastores  # name -> container
        self._lock = threading.Lock()
        self._made: set[str] = set()

    # ----- names ------------------------------------------------------------------------------------

    def locate(self, uri: str) -> BlobLocation:
        """Where ``uri`` points in Azurite (DataError when it cannot point there)."""
        found = _AZUREML_SHORT.match(uri) or _AZUREML_LONG.match(uri)
        if found:
            datastore = found.group("ds")
            container = self.datastores.get(datastore)
            if container is None:
                raise DataError(f"datastore {datastore!r} of {uri} does not exist in the workspace")
            return BlobLocation(container, unquote(found.group("path")).lstrip("/"))
        found = _WASB.match(uri)
        if found and found.group("account") == ACCOUNT_NAME:
            return BlobLocation(found.group("container"), unquote(found.group("path")))
        parts = urlsplit(uri)
        segments = [unquote(s) for s in parts.path.split("/")]
        host = (parts.hostname or "").lower()
        if parts.scheme in ("http", "https") and host in ("127.0.0.1", "localhost") and parts.port == self.blob_port:
            if len(segments) >= 3 and segments[1] == ACCOUNT_NAME and segments[2]:
                return BlobLocation(segments[2], "/".join(segments[3:]))
        if parts.scheme == "https" and host == f"{ACCOUNT_NAME}.blob.core.windows.net" and len(segments) >= 2:
            if segments[1]:
                return BlobLocation(segments[1], "/".join(segments[2:]))
        raise DataError(f"the emulator can only reach azureml://datastores/... URIs and blob URLs of its Azurite "
                        f"account {ACCOUNT_NAME}, not {uri}")

    def ensure_container(self, container: str) -> None:
        with self._lock:
            if container in self._made:
                return
            try:
                self.client.create_container(container)
            except ResourceExistsError:
                pass
            self._made.add(container)

    # ----- transfers --------------------------------------------------------------------------------

    def download_folder(self, location: BlobLocation, dest: Path) -> int:
        """Every blob under the folder ``location`` into ``dest`` (DataError when there are none)."""
        dest.mkdir(parents=True, exist_ok=True)
        prefix = location.path.rstrip("/")
        prefix = prefix + "/" if prefix else ""
        container = self.client.get_container_client(location.container)
        count = 0
        try:
            names = [b.name for b in container.list_blobs(name_starts_with=prefix or None)]
        except Exception as exc:
            raise DataError(f"cannot list {location}: {_brief(exc)}") from exc
        for name in names:
            relative = name[len(prefix):]
            if not relative or relative.endswith("/"):
                continue
            target = dest / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as fh:
                container.download_blob(name).readinto(fh)
            count += 1
        if count == 0:
            raise DataError(f"no blobs under {location.container}/{prefix}")
        return count

    def download_file(self, location: BlobLocation, dest: Path) -> Path:
        """The blob ``location`` as ``dest/<its base name>``."""
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / (location.path.rstrip("/").rsplit("/", 1)[-1] or "data")
        blob = self.client.get_blob_client(location.container, location.path)
        try:
            with open(target, "wb") as fh:
                blob.download_blob().readinto(fh)
        except Exception as exc:
            target.unlink(missing_ok=True)
            raise DataError(f"cannot read {location}: {_brief(exc)}") from exc
        return target

    def upload_folder(self, source: Path, location: BlobLocation) -> int:
        """Every file under ``source`` to the folder ``location`` (overwriting); the number uploaded."""
        self.ensure_container(location.container)
        prefix = location.path.strip("/")
        count = 0
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            relative = path.relative_to(source).as_posix()
            self.upload_file(path, BlobLocation(location.container, f"{prefix}/{relative}" if prefix else relative))
            count += 1
        return count

    def upload_file(self, source: Path, location: BlobLocation) -> None:
        self.ensure_container(location.container)
        with open(source, "rb") as fh:
            self.client.get_blob_client(location.container, location.path).upload_blob(fh, overwrite=True)

    def upload_bytes(self, data: bytes, location: BlobLocation) -> None:
        self.ensure_container(location.container)
        self.client.get_blob_client(location.container, location.path).upload_blob(data, overwrite=True)

    def exists(self, location: BlobLocation) -> bool:
        return bool(self.client.get_blob_client(location.container, location.path).exists())

    def sas_url(self, location: BlobLocation, hours: float = 8.0) -> str:
        """A read-only SAS URL of the blob, like the ``logFiles`` URLs of run history."""
        token = generate_blob_sas(ACCOUNT_NAME, location.container, location.path, account_key=ACCOUNT_KEY,
                                  permission=BlobSasPermissions(read=True),
                                  expiry=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=hours))
        url = self.client.get_blob_client(location.container, location.path).url
        return f"{url}?{token}"


def _brief(exc: Exception) -> str:
    code = getattr(exc, "error_code", None)
    return f"{code}: {exc.__class__.__name__}" if code else str(exc).splitlines()[0]
