"""What every emulator's command (``python -m airflow_stepops.testing.<flavor>``) does: parse its options,
serve until SIGINT/SIGTERM, publish where it listens once it is up, and remove what it published on exit."""

from __future__ import annotations

import argparse
import shlex
import signal
import threading
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TypeVar

E = TypeVar("E")


def parser(flavor: str, doc: str | None, grace: float = 5.0) -> argparse.ArgumentParser:
    """The command's parser, with the options every emulator has: ``--port``; but for Kubernetes (which
    publishes a kubeconfig and caps pods' own grace periods) ``--env-file``, ``--stop-grace-period`` (default
    ``grace``) and ``--workdir``."""
    parser = argparse.ArgumentParser(prog=f"python -m airflow_stepops.testing.{flavor}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    if flavor != "kubernetes":
        parser.add_argument("--env-file", type=Path,
                            help="write the environment here (KEY=VALUE lines, shell-quoted)")
        parser.add_argument("--stop-grace-period", type=float, default=grace,
                            help="SIGTERM-to-SIGKILL wait when a job is cancelled, times out or is preempted (s)")
        parser.add_argument("--workdir", *(["--job-root"] if flavor == "sagemaker" else []), type=Path,
                            help="where job directories go (default: a temporary one, removed on exit)")
    return parser


def write_complete(path: Path, text: str) -> None:
    """Write through a temporary file: callers wait for the file to appear, so it must appear complete."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _quoted(variables: Mapping[str, str]) -> list[str]:
    return [f"{key}={shlex.quote(value)}" for key, value in variables.items()]  # a shell may source them


def serve(emulator: AbstractContextManager[E], ready: Callable[[E], str], *, env_file: Path | None = None,
          published: Callable[[E], Mapping[str, str]] | None = None, written: Path | None = None) -> int:
    """Serve until SIGINT/SIGTERM. Once the emulator is up, ``ready`` prepares it and says where it listens;
    then ``published`` (default: its ``env()``) goes to ``env_file`` and its ``env()`` is printed as
    ``export`` lines. ``env_file`` (or ``written``) is removed on exit."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with emulator as emu:
        message = ready(emu)
        env = getattr(emu, "env", dict)()
        if env_file:
            write_complete(env_file, "".join(f"{line}\n" for line in _quoted(published(emu) if published else env)))
        print(message, flush=True)
        for line in _quoted(env):
            print(f"export {line}", flush=True)
        stop.wait()
    for path in (env_file, written):
        if path:
            path.unlink(missing_ok=True)
    return 0
