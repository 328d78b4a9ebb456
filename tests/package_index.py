"""A Python package index on 127.0.0.1 (PEP 503's simple API), so jobs install requirements without the internet.

It serves ``stepops-probe`` (a package no image has: a step importing it proves the install) and the workers'
cloudpickle, rebuilt as a wheel from the installed files (a plain Python image lacks it).
"""

from __future__ import annotations

import base64
import hashlib
import html
import importlib.metadata
import re
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PROBE = "stepops-probe"
PROBE_VALUE = "installed from the local package index"


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(folder: Path, name: str, version: str, files: dict[str, bytes], metadata: bytes | None = None,
                wheel: bytes | None = None) -> Path:
    """A pure-Python wheel of ``files`` (path in the wheel -> content)."""
    stem = f"{re.sub(r'[-_.]+', '_', name)}-{version}"
    info = f"{stem}.dist-info"
    files = {**files,
             f"{info}/METADATA": metadata or f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{info}/WHEEL": wheel or b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
                                       b"Tag: py3-none-any\n"}
    record = "".join(f"{path},{_record_hash(data)},{len(data)}\n" for path, data in files.items())
    path = folder / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name_in_wheel, data in files.items():
            archive.writestr(name_in_wheel, data)
        archive.writestr(f"{info}/RECORD", record + f"{info}/RECORD,,\n")
    return path


def wheel_of_installed(folder: Path, distribution: str) -> Path:
    """The installed ``distribution`` as a wheel again (its package files, METADATA and WHEEL)."""
    dist = importlib.metadata.distribution(distribution)
    files, extra = {}, {}
    for file in dist.files or []:
        parts = file.parts
        if parts[0].endswith(".dist-info"):
            if file.name in ("METADATA", "WHEEL"):
                extra[file.name] = Path(str(dist.locate_file(file))).read_bytes()
        elif "__pycache__" not in parts:
            files[str(file)] = Path(str(dist.locate_file(file))).read_bytes()
    return build_wheel(folder, dist.metadata["Name"], dist.version, files, extra.get("METADATA"), extra.get("WHEEL"))


class PackageIndex:
    """Serves the wheels of ``folder`` as ``<url>/<project>/``; an unknown project is a 404, as on PyPI."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        wheels = self.folder

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                parts = [p for p in self.path.split("?")[0].split("/") if p]
                if len(parts) == 2 and parts[0] == "files" and (wheels / parts[1]).is_file():
                    return self._send((wheels / parts[1]).read_bytes(), "application/octet-stream")
                if len(parts) == 2 and parts[0] == "simple":
                    project = re.sub(r"[-_.]+", "-", parts[1]).lower()
                    links = [f'<a href="/files/{w.name}#sha256={hashlib.sha256(w.read_bytes()).hexdigest()}">'
                             f"{html.escape(w.name)}</a><br>" for w in sorted(wheels.glob("*.whl"))
                             if re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower() == project]
                    if links:
                        return self._send(f"<html><body>{''.join(links)}</body></html>".encode(), "text/html")
                self.send_error(404)

            def _send(self, body: bytes, kind: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/simple/"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> PackageIndex:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def probe_index(folder: Path) -> PackageIndex:
    """The index of the tests: ``stepops-probe`` and the workers' cloudpickle."""
    folder.mkdir(parents=True, exist_ok=True)
    build_wheel(folder, PROBE, "1.0", {"stepops_probe/__init__.py": f"VALUE = {PROBE_VALUE!r}\n".encode()})
    wheel_of_installed(folder, "cloudpickle")
    return PackageIndex(folder)
