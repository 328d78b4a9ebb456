"""Run the Vertex AI emulator as a process: ``python -m airflow_stepops.testing.vertex``.

Serves the token endpoint, Vertex AI custom jobs, Cloud Logging and (fake-gcs-server) Cloud Storage on
127.0.0.1 until SIGINT/SIGTERM, printing the endpoints; ``--env-file`` also writes ``env()`` and
``AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT`` (a ``google_cloud_platform`` connection URI with the emulator's
service-account key) as ``KEY=VALUE`` lines once everything is up::

    python -m airflow_stepops.testing.vertex --env-file /tmp/vertex.env --bucket stepops-data
"""

from __future__ import annotations

import argparse
import shlex
import signal
import threading
from pathlib import Path

from airflow_stepops.testing.vertex import VertexEmulator


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m airflow_stepops.testing.vertex", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0, help="API port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--project", default="stepops-tests", help="the project id jobs run in")
    parser.add_argument("--location", default="us-central1", help="the one location served")
    parser.add_argument("--bucket", action="append", default=[], help="bucket to create (repeatable)")
    parser.add_argument("--stop-grace-period", type=float, default=5.0,
                        help="SIGTERM-to-SIGKILL wait when jobs are cancelled, time out or are preempted (s)")
    parser.add_argument("--workdir", type=Path, help="where job directories go (default: a temporary one)")
    parser.add_argument("--env-file", type=Path, help="write the environment here (KEY=VALUE lines, shell-quoted)")
    ns = parser.parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with VertexEmulator(project=ns.project, location=ns.location, stop_grace_period=ns.stop_grace_period,
                        workdir=ns.workdir, port=ns.port) as emu:
        for bucket in ns.bucket:
            emu.create_bucket(bucket)
        variables = {**emu.env(), "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT": emu.gcp_connection_uri()}
        lines = [f"{key}={shlex.quote(value)}" for key, value in variables.items()]  # a shell may source it
        if ns.env_file:
            tmp = ns.env_file.with_name(ns.env_file.name + ".tmp")
            tmp.write_text("\n".join(lines) + "\n")
            tmp.replace(ns.env_file)  # appears complete: callers wait for the file
        print(f"Vertex AI emulator serving on {emu.api_endpoint} (JobService v1, Logging v2, token "
              f"{emu.token_uri}); Cloud Storage on {emu.gcs_endpoint}; project {emu.project} "
              f"({emu.project_number}), location {emu.location}", flush=True)
        for key, value in emu.env().items():
            print(f"export {key}={value}", flush=True)
        stop.wait()
    if ns.env_file:
        ns.env_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
