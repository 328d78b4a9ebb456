"""Run the Modal emulator as a process: ``python -m airflow_stepops.testing.modal``.

Serves Modal's control-plane API (gRPC) and blob storage on 127.0.0.1 until SIGINT/SIGTERM, printing the
environment the ``modal`` client needs; ``--env-file`` also writes ``env()`` and ``AIRFLOW_CONN_MODAL_DEFAULT``
(a ``modal`` connection as JSON) as shell-quoted ``KEY=VALUE`` lines once everything is up::

    python -m airflow_stepops.testing.modal --env-file /tmp/modal.env --secret hf-token=HF_TOKEN=hf_123
"""

from __future__ import annotations

import argparse
import shlex
import signal
import threading
from pathlib import Path

from airflow_stepops.testing.modal import ModalEmulator


def _secret(text: str) -> tuple[str, str, str]:
    name, sep, rest = text.partition("=")
    key, sep2, value = rest.partition("=")
    if not (name and sep and key and sep2):
        raise argparse.ArgumentTypeError(f"expected NAME=KEY=VALUE, got {text!r}")
    return name, key, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m airflow_stepops.testing.modal", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0, help="gRPC port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--secret", action="append", default=[], type=_secret, metavar="NAME=KEY=VALUE",
                        help="a key of a named secret in the main environment (repeatable)")
    parser.add_argument("--stop-grace-period", type=float, default=5.0,
                        help="SIGTERM-to-SIGKILL wait when calls are cancelled, time out or are preempted (s)")
    parser.add_argument("--queue-seconds", type=float, default=0.2, help="how long an input stays pending (s)")
    parser.add_argument("--volume-commit-interval", type=float, default=5.0,
                        help="seconds between background commits of a running call's volume changes")
    parser.add_argument("--workdir", type=Path, help="where call directories and volumes go (default: a temporary one)")
    parser.add_argument("--env-file", type=Path, help="write the environment here (KEY=VALUE lines, shell-quoted)")
    ns = parser.parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with ModalEmulator(stop_grace_period=ns.stop_grace_period, queue_seconds=ns.queue_seconds, workdir=ns.workdir,
                       port=ns.port, volume_commit_interval=ns.volume_commit_interval) as emu:
        secrets: dict[str, dict[str, str]] = {}
        for name, key, value in ns.secret:
            secrets.setdefault(name, {})[key] = value
        for name, env in secrets.items():
            emu.add_secret(name, env)
        variables = {**emu.env(), "AIRFLOW_CONN_MODAL_DEFAULT": emu.airflow_connection()}
        lines = [f"{key}={shlex.quote(value)}" for key, value in variables.items()]  # a shell may source it
        if ns.env_file:
            tmp = ns.env_file.with_name(ns.env_file.name + ".tmp")
            tmp.write_text("\n".join(lines) + "\n")
            tmp.replace(ns.env_file)  # appears complete: callers wait for the file
        print(f"Modal emulator serving on {emu.server_url} (blobs on {emu.blob_url}); secrets: "
              f"{', '.join(sorted(secrets)) or 'none'}", flush=True)
        for key, value in emu.env().items():
            print(f"export {key}={shlex.quote(value)}", flush=True)
        stop.wait()
    if ns.env_file:
        ns.env_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
