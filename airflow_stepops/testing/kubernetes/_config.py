"""Emulator settings and the one emulated node."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from airflow_stepops.testing._images import IMAGE_PYTHONS
from airflow_stepops.testing.kubernetes._util import JSON, timestamp


def _python_aliases() -> dict[str, str]:
    return dict.fromkeys(IMAGE_PYTHONS, sys.executable)


@dataclass
class NodeSpec:
    """The single node pods are scheduled to: its capacity decides what is schedulable.

    The default is a GPU node (4 ``nvidia.com/gpu``) so GPU steps schedule; ask for more than the
    capacity, or select a label the node lacks, to see the scheduler's real ``Unschedulable`` messages.
    """

    name: str = "emulator-node"
    capacity: dict[str, str] = field(default_factory=lambda: {
        "cpu": "32", "memory": "128Gi", "pods": "110", "ephemeral-storage": "200Gi", "nvidia.com/gpu": "4"})
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[JSON] = field(default_factory=list)

    def to_object(self) -> JSON:
        labels = {"kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                  "beta.kubernetes.io/os": "linux", "beta.kubernetes.io/arch": "amd64",
                  "node.kubernetes.io/instance-type": "emulator", "topology.kubernetes.io/zone": "emulator-a",
                  "topology.kubernetes.io/region": "emulator"}
        if any(name.endswith("/gpu") for name in self.capacity):
            labels["nvidia.com/gpu.present"] = "true"
        labels.update(self.labels)
        now = timestamp()
        capacity = {"pods": "110", **self.capacity}  # every node reports a pod capacity
        return {
            "metadata": {"name": self.name, "labels": labels, "annotations": {}},
            "spec": {"taints": list(self.taints)} if self.taints else {},
            "status": {
                "capacity": capacity, "allocatable": dict(capacity),
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                "message": "kubelet is posting ready status", "lastHeartbeatTime": now,
                                "lastTransitionTime": now}],
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                              {"type": "Hostname", "address": self.name}],
                "nodeInfo": {"kubeletVersion": "v1.33.0", "containerRuntimeVersion": "emulator://1",
                             "operatingSystem": "linux", "architecture": "amd64", "osImage": "stepops emulator",
                             "kernelVersion": os.uname().release, "kubeProxyVersion": "v1.33.0",
                             "machineID": "", "systemUUID": "", "bootID": ""},
            },
        }


@dataclass
class EmulatorConfig:
    """Knobs of the emulated cluster; the defaults keep tests fast and behaviour faithful."""

    namespaces: tuple[str, ...] = ("default",)
    node: NodeSpec = field(default_factory=NodeSpec)
    #: terminationGracePeriodSeconds written into pods that do not set it (Kubernetes: 30).
    default_grace_period: int = 30
    #: Upper bound on the SIGTERM -> SIGKILL wait whatever the pod asks, to keep tests short; None: no cap.
    grace_period_cap: float | None = None
    #: Extra environment for every container process (e.g. PYTHONPATH); the host's is not inherited.
    env: dict[str, str] = field(default_factory=dict)
    inherit_env: bool = False
    #: Container commands replaced by host executables: the image's ``python3`` is the host's; like an image
    #: with only Debian's ``python3``, it has no ``python`` (see airflow_stepops.testing._images).
    command_aliases: dict[str, str] = field(default_factory=_python_aliases)
    #: Where the PVC directories live; a temporary directory when None.
    pvc_root: Path | None = None
    #: Seconds a pod waits before its first scheduling attempt, and in ContainerCreating.
    schedule_delay: float = 0.0
    start_delay: float = 0.0
    #: Back-off before a Job replaces a failed pod / before a container restart / between image pull retries.
    job_backoff: float = 0.2
    restart_backoff: float = 0.5
    image_pull_backoff: float = 1.0
    #: Bearer token the API requires when set (401 otherwise).
    token: str | None = None
    #: The kubelet's container log rotation (KubeletConfiguration, defaults 10Mi, 5 files, 10s;
    #: https://kubernetes.io/docs/reference/config-api/kubelet-config.v1beta1/): every monitor interval a
    #: running container's log file of at least ``container_log_max_size`` bytes (CRI format, prefixes
    #: included) is rotated, so it can overshoot in between; pods/log serves only the current file
    #: (https://kubernetes.io/docs/concepts/cluster-administration/logging/#log-rotation). The kubelet
    #: refuses intervals under 3 s; the emulator accepts shorter ones to keep tests fast.
    container_log_max_size: int = 10 * 1024 * 1024
    container_log_max_files: int = 5
    container_log_monitor_interval: float = 10.0
