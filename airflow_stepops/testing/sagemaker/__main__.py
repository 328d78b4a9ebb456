"""Run the SageMaker emulator as a process: ``python -m airflow_stepops.testing.sagemaker``.

Serves S3, SageMaker and CloudWatch Logs on 127.0.0.1 until SIGINT/SIGTERM, printing the endpoint and
the environment that points the AWS SDKs (and Airflow's AWS hooks) at it; ``--env-file`` also writes
that environment as ``KEY=VALUE`` lines once the server is up::

    python -m airflow_stepops.testing.sagemaker --port 4566 --env-file /tmp/sagemaker.env
"""

from __future__ import annotations

from airflow_stepops.testing import _cli
from airflow_stepops.testing.sagemaker import SageMakerEmulator


def main(argv: list[str] | None = None) -> int:
    parser = _cli.parser("sagemaker", __doc__)
    parser.add_argument("--region", default="us-east-1", help="region of the printed environment")
    ns = parser.parse_args(argv)
    return _cli.serve(SageMakerEmulator(port=ns.port, region=ns.region, stop_grace_period=ns.stop_grace_period,
                                        job_root=str(ns.workdir) if ns.workdir else None),
                      lambda sm: f"SageMaker emulator (S3, SageMaker, CloudWatch Logs) serving on {sm.endpoint_url}",
                      env_file=ns.env_file)


if __name__ == "__main__":
    raise SystemExit(main())
