"""Run the Modal emulator as a process: ``python -m airflow_stepops.testing.modal``.

Serves Modal's control-plane API (gRPC) and blob storage on 127.0.0.1 until SIGINT/SIGTERM, printing the
environment the ``modal`` client needs; ``--env-file`` also writes ``env()`` and ``AIRFLOW_CONN_MODAL_DEFAULT``
(a ``modal`` connection as JSON) as shell-quoted ``KEY=VALUE`` lines once everything is up::

    python -m airflow_stepops.testing.modal --env-file /tmp/modal.env --secret hf-token=HF_TOKEN=hf_123
"""

from __future__ import annotations

import argparse

from airflow_stepops.testing import _cli
from airflow_stepops.testing.modal import ModalEmulator


def _secret(text: str) -> tuple[str, str, str]:
    name, sep, rest = text.partition("=")
    key, sep2, value = rest.partition("=")
    if not (name and sep and key and sep2):
        raise argparse.ArgumentTypeError(f"expected NAME=KEY=VALUE, got {text!r}")
    return name, key, value


def main(argv: list[str] | None = None) -> int:
    parser = _cli.parser("modal", __doc__)
    parser.add_argument("--secret", action="append", default=[], type=_secret, metavar="NAME=KEY=VALUE",
                        help="a key of a named secret in the main environment (repeatable)")
    parser.add_argument("--queue-seconds", type=float, default=0.2, help="how long an input stays pending (s)")
    parser.add_argument("--volume-commit-interval", type=float, default=5.0,
                        help="seconds between background commits of a running call's volume changes")
    ns = parser.parse_args(argv)
    secrets: dict[str, dict[str, str]] = {}
    for name, key, value in ns.secret:
        secrets.setdefault(name, {})[key] = value

    def ready(emu: ModalEmulator) -> str:
        for name, env in secrets.items():
            emu.add_secret(name, env)
        return (f"Modal emulator serving on {emu.server_url} (blobs on {emu.blob_url}); secrets: "
                f"{', '.join(sorted(secrets)) or 'none'}")

    return _cli.serve(ModalEmulator(stop_grace_period=ns.stop_grace_period, queue_seconds=ns.queue_seconds,
                                    workdir=ns.workdir, port=ns.port, volume_commit_interval=ns.volume_commit_interval),
                      ready, env_file=ns.env_file,
                      published=lambda emu: {**emu.env(), "AIRFLOW_CONN_MODAL_DEFAULT": emu.airflow_connection()})


if __name__ == "__main__":
    raise SystemExit(main())
