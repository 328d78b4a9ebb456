"""Run the SageMaker emulator as a process: ``python -m airflow_stepops.testing.sagemaker``.

Serves S3, SageMaker and CloudWatch Logs on 127.0.0.1 until SIGINT/SIGTERM, printing the endpoint and
the environment that points the AWS SDKs (and Airflow's AWS hooks) at it; ``--env-file`` also writes
that environment as ``KEY=VALUE`` lines once the server is up::

    python -m airflow_stepops.testing.sagemaker --port 4566 --env-file /tmp/sagemaker.env
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from airflow_stepops.testing.sagemaker import SageMakerEmulator


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m airflow_stepops.testing.sagemaker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--region", default="us-east-1", help="region of the printed environment")
    parser.add_argument("--stop-grace-period", type=float, default=5.0,
                        help="SIGTERM-to-SIGKILL wait when jobs are stopped or time out (seconds)")
    parser.add_argument("--job-root", type=Path, help="where job directories go (default: a temporary one)")
    parser.add_argument("--env-file", type=Path, help="write the AWS_* environment here (KEY=VALUE lines)")
    ns = parser.parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with SageMakerEmulator(port=ns.port, region=ns.region, stop_grace_period=ns.stop_grace_period,
                           job_root=str(ns.job_root) if ns.job_root else None) as sm:
        lines = [f"{key}={value}" for key, value in sm.env().items()]
        if ns.env_file:
            tmp = ns.env_file.with_name(ns.env_file.name + ".tmp")
            tmp.write_text("\n".join(lines) + "\n")
            tmp.replace(ns.env_file)  # appears complete: callers wait for the file
        print(f"SageMaker emulator (S3, SageMaker, CloudWatch Logs) serving on {sm.endpoint_url}", flush=True)
        for line in lines:
            print(f"export {line}", flush=True)
        stop.wait()
    if ns.env_file:
        ns.env_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
