"""What an emulated container image has on its ``PATH``: the interpreter names, and nothing else.

Images differ in what they call Python. The official ``python:3.x`` images have ``python`` and
``python3``, but images built on CUDA or Ubuntu/Debian base images with Debian's ``python3`` package have
only ``python3`` and ``python3.N``: PEP 394 leaves ``python`` to the distribution, and Debian ships it only
with the ``python-is-python3`` package (https://peps.python.org/pep-0394/,
https://wiki.debian.org/Python). The emulators model the stricter kind, so a job command that names
``python`` fails here as it fails on such an image, with the container runtime's own message.
"""

from __future__ import annotations

import sys
from pathlib import Path

#: interpreter names an emulated image has (all run this interpreter)
IMAGE_PYTHONS = ("python3", f"python{sys.version_info[0]}.{sys.version_info[1]}")
#: names such an image lacks; they shadow whatever the host has under them
MISSING = ("python",)


def write_python_shims(shims: Path, names: tuple[str, ...] = IMAGE_PYTHONS) -> None:
    """``names`` on the job's ``PATH`` run this interpreter; ``python`` is not found, as in the image.

    Shims are ``exec`` scripts, not symlinks: CPython finds a virtualenv by the ``pyvenv.cfg`` beside the
    path it was started from, so a symlink to ``.venv/bin/python`` would run the base interpreter.
    """
    shims.mkdir(parents=True, exist_ok=True)
    for name in names:
        _shim(shims / name, f'exec "{sys.executable}" "$@"')
    write_missing_shims(shims, names)


def write_missing_shims(shims: Path, present: tuple[str, ...]) -> None:
    """Names the image lacks shadow whatever the host has under them: the container runtime's message
    (runc/containerd: ``exec: "python": executable file not found in $PATH``) and a shell's exit 127."""
    for name in MISSING:
        if name not in present:
            _shim(shims / name, f"echo 'exec: \"{name}\": executable file not found in $PATH' >&2; exit 127")


def _shim(path: Path, body: str) -> None:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
