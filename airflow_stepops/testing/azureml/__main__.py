"""Run the Azure ML emulator as a process: ``python -m airflow_stepops.testing.azureml``.

Starts Azurite and the HTTPS REST server on 127.0.0.1 and serves until SIGINT/SIGTERM, printing where
it listens and the environment that points azure-ai-ml, azure-identity and azure-storage-blob at it;
``--env-file`` also writes that environment as shell-quoted ``KEY=VALUE`` lines once everything is up (and removes
the file on exit). Needs Azurite: ``npm ci`` in the repository first::

    python -m airflow_stepops.testing.azureml --env-file /tmp/azureml.env --container data
"""

from __future__ import annotations

from airflow_stepops.testing import _cli
from airflow_stepops.testing.azureml import AzureMLEmulator, EmulatorConfig


def main(argv: list[str] | None = None) -> int:
    parser = _cli.parser("azureml", __doc__, grace=2.0)
    parser.add_argument("--container", action="append", default=[], help="blob container to create (repeatable)")
    parser.add_argument("--azurite-port", type=int, default=0, help="Azurite blob port (default: a free one)")
    for name in ("subscription_id", "resource_group", "workspace_name", "location"):  # the workspace served
        parser.add_argument(f"--{name.replace('_', '-')}", default=getattr(EmulatorConfig, name))
    ns = parser.parse_args(argv)

    def ready(emulator: AzureMLEmulator) -> str:
        for container in ns.container:
            emulator.create_container(container)
        return (f"Azure ML emulator serving on {emulator.base_url} (workspace {ns.workspace_name}); "
                f"Azurite blobs on {emulator.blob_endpoint}")

    return _cli.serve(AzureMLEmulator(ns.subscription_id, ns.resource_group, ns.workspace_name, ns.location,
                                      stop_grace_period=ns.stop_grace_period, workdir=ns.workdir, port=ns.port,
                                      azurite_port=ns.azurite_port), ready, env_file=ns.env_file)


if __name__ == "__main__":
    raise SystemExit(main())
