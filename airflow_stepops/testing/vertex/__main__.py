"""Run the Vertex AI emulator as a process: ``python -m airflow_stepops.testing.vertex``.

Serves the token endpoint, Vertex AI custom jobs, Cloud Logging and (fake-gcs-server) Cloud Storage on
127.0.0.1 until SIGINT/SIGTERM, printing the endpoints; ``--env-file`` also writes ``env()`` and
``AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT`` (a ``google_cloud_platform`` connection URI with the emulator's
service-account key) as ``KEY=VALUE`` lines once everything is up::

    python -m airflow_stepops.testing.vertex --env-file /tmp/vertex.env --bucket stepops-data
"""

from __future__ import annotations

from airflow_stepops.testing import _cli
from airflow_stepops.testing.vertex import VertexEmulator


def main(argv: list[str] | None = None) -> int:
    parser = _cli.parser("vertex", __doc__)
    parser.add_argument("--project", default="stepops-tests", help="the project id jobs run in")
    parser.add_argument("--location", default="us-central1", help="the one location served")
    parser.add_argument("--bucket", action="append", default=[], help="bucket to create (repeatable)")
    ns = parser.parse_args(argv)

    def ready(emu: VertexEmulator) -> str:
        for bucket in ns.bucket:
            emu.create_bucket(bucket)
        return (f"Vertex AI emulator serving on {emu.api_endpoint} (JobService v1, Logging v2, token "
                f"{emu.token_uri}); Cloud Storage on {emu.gcs_endpoint}; project {emu.project} "
                f"({emu.project_number}), location {emu.location}")

    return _cli.serve(VertexEmulator(project=ns.project, location=ns.location, stop_grace_period=ns.stop_grace_period,
                                     workdir=ns.workdir, port=ns.port), ready, env_file=ns.env_file,
                      published=lambda emu: {**emu.env(), "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT": emu.gcp_connection_uri()})


if __name__ == "__main__":
    raise SystemExit(main())
