"""Azurite, Microsoft's Azure Storage emulator (npm package ``azurite``), as a blob-only child process.

Installed from the repository's ``package.json`` (azurite pinned exactly, ``package-lock.json``
committed) by ``npm ci``; the emulator runs ``node_modules/.bin/azurite-blob`` of the repository (or
of the working directory or a parent), or ``$AZURITE_BIN``, or ``azurite-blob`` on ``PATH``.
Flags: ``--blobHost 127.0.0.1 --blobPort <free port> --location <dir> --disableTelemetry
--skipApiVersionCheck --loose --silent`` (all present in azurite 3.35.0's ``azurite-blob --help``).
Storage is the well-known development account ``devstoreaccount1`` with its public key.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from pathlib import Path

from airflow_stepops.testing._kit import start_server, stop_group

#: Azurite's built-in development account and key (public, documented by Microsoft)
ACCOUNT_NAME = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
BIN_ENV = "AZURITE_BIN"
_BIN_NAME = "azurite-blob"


class AzuriteNotFoundError(RuntimeError):
    """No Azurite executable: the repository's npm dependencies are not installed."""


_INSTALL_HINT = ("run `npm ci` in the airflow-stepops repository (it installs the azurite version pinned in "
                 "package.json into node_modules/), or point $AZURITE_BIN at an azurite-blob executable")


def find_azurite(search_from: list[Path] | None = None, *, use_path: bool = True) -> str:
    """The ``azurite-blob`` executable to run: ``$AZURITE_BIN``, else ``node_modules/.bin/azurite-blob`` in
    a directory of ``search_from`` (default: this package's and the working directory) or a parent of one,
    else ``azurite-blob`` on ``PATH`` (``use_path``)."""
    explicit = os.environ.get(BIN_ENV)
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise AzuriteNotFoundError(f"${BIN_ENV} is {explicit!r}, which is not an executable file: {_INSTALL_HINT}")
        return explicit
    starts = search_from if search_from is not None else [Path(__file__).resolve().parent, Path.cwd().resolve()]
    for start in starts:
        for directory in (start, *start.parents):
            candidate = directory / "node_modules" / ".bin" / _BIN_NAME
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    on_path = shutil.which(_BIN_NAME) if use_path else None
    if on_path:
        return on_path
    raise AzuriteNotFoundError("Azurite (the Azure Storage emulator the Azure ML emulator keeps blobs in) is not "
                               f"installed: {_INSTALL_HINT}.")


def connection_string(blob_endpoint: str) -> str:
    return (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT_NAME};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={blob_endpoint};")


class Azurite:
    """One ``azurite-blob`` process in its own process group, listening on 127.0.0.1."""

    def __init__(self, location: Path, port: int = 0, startup_timeout: float = 30.0) -> None:
        self.location = location
        self.port = port
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_file = location.parent / "azurite.log"

    @property
    def blob_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/{ACCOUNT_NAME}"

    @property
    def connection_string(self) -> str:
        return connection_string(self.blob_endpoint)

    def start(self) -> None:
        executable = find_azurite()
        self.location.mkdir(parents=True, exist_ok=True)

        def ready(port: int) -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
            return False

        self.proc, self.port = start_server(
            lambda port: [executable, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location",
                          str(self.location), "--disableTelemetry", "--skipApiVersionCheck", "--loose", "--silent"],
            self.port, self.log_file, ready, "Azurite", self.startup_timeout)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_group(proc, grace=5)
