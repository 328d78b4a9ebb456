"""What an emulated container image has on its ``PATH``: the interpreter names, and nothing else.

Images differ in what they call Python. The official ``python:3.x`` images have ``python`` and
``python3``, but images built on CUDA or Ubuntu/Debian base images with Debian's ``python3`` package have
only ``python3`` and ``python3.N``: PEP 394 leaves ``python`` to the distribution, and Debian ships it only
with the ``python-is-python3`` package (https://peps.python.org/pep-0394/,
https://wiki.debian.org/Python). The emulators model the stricter kind, so a job command that names
``python`` fails here as it fails on such an image, with the container runtime's own message.

Images differ in what Python packages they bring, too. Docker Hub's ``python`` images have Python and pip and
nothing else (https://hub.docker.com/_/python); the emulators run them as a virtual environment of this
interpreter made with ``venv`` (pip from ``ensurepip``, offline), so a step there finds no cloudpickle and no
package of the host until the job installs it. The AWS Deep Learning Containers (``pytorch-training``) are
modelled the same way, though the real ones bring an older cloudpickle of their own. Any other image is a user's
image with everything the steps need: this interpreter with the host's packages.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

#: interpreter names an emulated image has (all run this interpreter)
IMAGE_PYTHONS = ("python3", f"python{sys.version_info[0]}.{sys.version_info[1]}")
#: names such an image lacks; they shadow whatever the host has under them
MISSING = ("python",)


#: images the emulators run as a plain Python (see above)
PLAIN_IMAGES = re.compile(r"(?:^|/)python:\d+\.\d+|/pytorch-training:")


def python_for(image: str | None) -> str:
    """The interpreter ``python3`` runs in an emulated ``image``."""
    return plain_python() if image and PLAIN_IMAGES.search(image) else sys.executable


def shims_for(image: str | None, shims: Path) -> Path:
    """The ``PATH`` directory of an emulated ``image``'s interpreter names: ``shims`` for a user's image."""
    python = python_for(image)
    if python == sys.executable:
        return shims
    plain = Path(python).parent.parent / "shims"
    if not (plain / IMAGE_PYTHONS[0]).exists():
        write_python_shims(plain, python=python)
    return plain


def plain_python() -> str:
    """A virtual environment of this interpreter with only pip, made once per host and shared by every emulator
    (a lock keeps concurrent test processes from making it twice)."""
    base = getattr(sys, "_base_executable", sys.executable)
    key = hashlib.sha256(f"{base}|{sys.version}".encode()).hexdigest()[:12]
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "airflow-stepops" / "plain-python" / key
    python = root / "venv" / "bin" / "python3"
    if python.exists():
        return str(python)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not python.exists():
            partial = root / f"venv.{os.getpid()}"
            subprocess.run([base, "-m", "venv", "--clear", str(partial)], check=True, capture_output=True)
            partial.rename(root / "venv")
    return str(python)


def write_python_shims(shims: Path, names: tuple[str, ...] = IMAGE_PYTHONS, python: str = sys.executable) -> None:
    """``names`` on the job's ``PATH`` run this interpreter; ``python`` is not found, as in the image.

    Shims are ``exec`` scripts, not symlinks: CPython finds a virtualenv by the ``pyvenv.cfg`` beside the
    path it was started from, so a symlink to ``.venv/bin/python`` would run the base interpreter.
    """
    shims.mkdir(parents=True, exist_ok=True)
    for name in names:
        _shim(shims / name, f'exec "{python}" "$@"')
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
