"""Modal's blob storage: where arguments and results too large to travel inline in an RPC go.

``BlobCreate`` hands the client an upload URL on this aiohttp server (or, above ``multipart_threshold``
bytes, one URL per part plus a completion URL, as S3 multipart uploads work); the client PUTs the bytes and
checks the ``ETag`` (the MD5, quoted; for a multipart upload the MD5 of the parts' MD5s plus ``-<parts>``,
which the completion answer must contain). ``BlobGet`` hands out ``GET`` URLs. Blobs are files under
``<workdir>/blobs``; the emulator's own results are put in directly.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import re
import threading
from pathlib import Path

from aiohttp import web

from airflow_stepops.testing.modal._ids import new_id

_PART = re.compile(r"<PartNumber>(\d+)</PartNumber>")


class BlobStore:
    """Blobs by id, as files; upload URLs for the client and direct puts for the emulator."""

    def __init__(self, root: Path, multipart_threshold: int, part_size: int) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.multipart_threshold, self.part_size = multipart_threshold, part_size
        self.base_url = ""
        self._lock = threading.Lock()
        self._expected: dict[str, int] = {}  # created by BlobCreate: id -> content length
        self.uploads: list[dict[str, int | str]] = []  # what clients uploaded: blob id, size, parts

    def create(self, content_length: int) -> tuple[str, list[str] | None]:
        """A new blob id and, for a multipart upload, its part URLs (else None)."""
        blob_id = new_id("bl")
        with self._lock:
            self._expected[blob_id] = content_length
        if content_length > self.multipart_threshold:
            count = math.ceil(content_length / self.part_size)
            return blob_id, [self.part_url(blob_id, n) for n in range(1, count + 1)]
        return blob_id, None

    def upload_url(self, blob_id: str) -> str:
        return f"{self.base_url}/blobs/{blob_id}"

    def part_url(self, blob_id: str, number: int) -> str:
        return f"{self.base_url}/blobs/{blob_id}/parts/{number}"

    def completion_url(self, blob_id: str) -> str:
        return f"{self.base_url}/blobs/{blob_id}/complete"

    def download_url(self, blob_id: str) -> str:
        return f"{self.base_url}/blobs/{blob_id}"

    def path(self, blob_id: str) -> Path:
        if not re.fullmatch(r"bl-[0-9A-Z]+", blob_id):
            raise KeyError(blob_id)
        return self.root / blob_id

    def exists(self, blob_id: str) -> bool:
        try:
            return self.path(blob_id).is_file()
        except KeyError:
            return False

    def put(self, data: bytes) -> str:
        """Store ``data`` as a new blob (the emulator's large results); returns its id."""
        blob_id = new_id("bl")
        tmp = self.root / f"{blob_id}.tmp"
        tmp.write_bytes(data)
        tmp.replace(self.root / blob_id)
        return blob_id

    def read(self, blob_id: str) -> bytes:
        """The blob's bytes; KeyError when there is no such blob."""
        path = self.path(blob_id)
        if not path.is_file():
            raise KeyError(blob_id)
        return path.read_bytes()

    # ----- HTTP ---------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_put("/blobs/{blob}", self._put)
        app.router.add_put("/blobs/{blob}/parts/{part}", self._put_part)
        app.router.add_post("/blobs/{blob}/complete", self._complete)
        app.router.add_get("/blobs/{blob}", self._get)
        return app

    def _known(self, blob_id: str) -> bool:
        with self._lock:
            return blob_id in self._expected

    async def _receive(self, request: web.Request, target: Path) -> str:
        """Stream the body into ``target`` (atomically); the MD5 hex of what arrived."""
        digest = hashlib.md5()
        tmp = target.with_name(target.name + ".tmp")
        with tmp.open("wb") as out:
            async for chunk in request.content.iter_chunked(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        tmp.replace(target)
        return digest.hexdigest()

    async def _put(self, request: web.Request) -> web.Response:
        blob_id = request.match_info["blob"]
        if not self._known(blob_id):
            return web.Response(status=404, text=f"NoSuchUpload: blob {blob_id} was not created by BlobCreate")
        md5 = await self._receive(request, self.path(blob_id))
        wanted = request.headers.get("Content-MD5")
        if wanted and hashlib.md5(self.path(blob_id).read_bytes()).digest() != _b64decode(wanted):
            self.path(blob_id).unlink(missing_ok=True)
            return web.Response(status=400, text="The Content-MD5 you specified did not match what we received.")
        self._uploaded(blob_id, 1)
        return web.Response(status=200, headers={"ETag": f'"{md5}"'})

    def uploaded(self) -> list[dict[str, int | str]]:
        with self._lock:
            return [dict(u) for u in self.uploads]

    def _uploaded(self, blob_id: str, parts: int) -> None:
        with self._lock:
            self.uploads.append({"blob_id": blob_id, "size": self.path(blob_id).stat().st_size, "parts": parts})

    async def _put_part(self, request: web.Request) -> web.Response:
        blob_id, part = request.match_info["blob"], request.match_info["part"]
        if not self._known(blob_id) or not part.isdigit():
            return web.Response(status=404, text=f"NoSuchUpload: blob {blob_id} part {part}")
        parts = self.root / f"{blob_id}.parts"
        parts.mkdir(exist_ok=True)
        md5 = await self._receive(request, parts / f"{int(part):06d}")
        return web.Response(status=200, headers={"ETag": f'"{md5}"'})

    async def _complete(self, request: web.Request) -> web.Response:
        blob_id = request.match_info["blob"]
        parts = self.root / f"{blob_id}.parts"
        if not self._known(blob_id) or not parts.is_dir():
            return web.Response(status=404, text=f"NoSuchUpload: blob {blob_id}")
        numbers = [int(n) for n in _PART.findall(await request.text())]
        files = [parts / f"{n:06d}" for n in numbers]
        if not numbers or any(not f.is_file() for f in files):
            return web.Response(status=400, text="InvalidPart: a listed part was not uploaded")
        digests = b""
        tmp = self.root / f"{blob_id}.tmp"
        with tmp.open("wb") as out:
            for f in files:
                data = f.read_bytes()
                digests += hashlib.md5(data).digest()
                out.write(data)
        tmp.replace(self.path(blob_id))
        for f in parts.iterdir():
            f.unlink()
        parts.rmdir()
        self._uploaded(blob_id, len(files))
        etag = f"{hashlib.md5(digests).hexdigest()}-{len(files)}"
        return web.Response(status=200, content_type="application/xml", text=(
            f"<CompleteMultipartUploadResult><Key>{blob_id}</Key><ETag>\"{etag}\"</ETag>"
            "</CompleteMultipartUploadResult>"))

    async def _get(self, request: web.Request) -> web.StreamResponse:
        blob_id = request.match_info["blob"]
        if not self.exists(blob_id):
            return web.Response(status=404, text=f"NoSuchKey: blob {blob_id}")
        return web.FileResponse(self.path(blob_id))


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text)
    except (ValueError, binascii.Error):
        return b""
