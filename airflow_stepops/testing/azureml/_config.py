"""Emulator settings and the fixed identities of the emulated workspace."""

from __future__ import annotations

from dataclasses import dataclass, field

#: ARM resource provider of Azure Machine Learning
PROVIDER = "Microsoft.MachineLearningServices"
#: the tenant the emulator's tokens name (``tid``); the SDK appends it to studio URLs
TENANT_ID = "72f988bf-0000-4000-8000-000000000000"
#: the object id of the emulator's only principal
PRINCIPAL_ID = "11111111-2222-4333-8444-555555555555"
PRINCIPAL_NAME = "stepops-emulator@example.com"


@dataclass(frozen=True)
class ComputeSpec:
    """An AmlCompute cluster the workspace has; ``low_priority`` clusters have preemptible nodes."""

    vm_size: str = "STANDARD_DS3_V2"
    low_priority: bool = False
    max_nodes: int = 4


#: the clusters every emulated workspace starts with (``add_compute`` adds more)
DEFAULT_COMPUTES = {
    "cpu-cluster": ComputeSpec("STANDARD_DS3_V2"),
    "gpu-cluster": ComputeSpec("STANDARD_NC6S_V3", max_nodes=2),
    "lowpri-cluster": ComputeSpec("STANDARD_DS3_V2", low_priority=True),
}


@dataclass(frozen=True)
class EmulatorConfig:
    """How the Azure ML emulator behaves; the keywords of ``AzureMLEmulator(...)``.

    subscription_id / resource_group / workspace_name / location: the one workspace served.
    stop_grace_period: seconds between SIGTERM and SIGKILL when a job is cancelled, times out or is
        preempted.
    queue_seconds / prepare_seconds: time a job spends ``Queued`` and ``Preparing`` (inputs are
        downloaded while ``Preparing``), so pollers see those statuses.
    workdir: where Azurite's data, the TLS files and job directories go; default a temporary one,
        removed on exit.
    page_size: jobs per page of a job list (the ``nextLink`` carries a ``$skipToken``).
    log_flush_interval: seconds between uploads of a running job's ``user_logs/std_log.txt``.
    computes: the AmlCompute clusters of the workspace (name -> ``ComputeSpec``).
    env: extra environment variables of every job process (the job's own ``environmentVariables`` win).
    """

    subscription_id: str = "00000000-0000-0000-0000-000000000000"
    resource_group: str = "stepops-rg"
    workspace_name: str = "stepops-ws"
    location: str = "eastus"
    stop_grace_period: float = 2.0
    queue_seconds: float = 0.3
    prepare_seconds: float = 0.3
    workdir: str | None = None
    page_size: int = 20
    log_flush_interval: float = 0.3
    computes: dict[str, ComputeSpec] = field(default_factory=lambda: dict(DEFAULT_COMPUTES))
    env: dict[str, str] = field(default_factory=dict)

    @property
    def workspace_path(self) -> str:
        """The ARM id of the workspace."""
        return (f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"
                f"/providers/{PROVIDER}/workspaces/{self.workspace_name}")
