"""Injectable faults: the failures a cluster inflicts on a step that its code did not cause.

A fault reaches a pod either through a rule registered on the emulator (``KubernetesEmulator.inject``)
or through the pod annotation ``stepops.emulator/fault``, whose value is a fault kind
(``"image_pull"``), a JSON object (``{"kind": "evicted", "after": 1}``) or a JSON list of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from airflow_stepops.testing import _kit

FAULT_ANNOTATION = "stepops.emulator/fault"

#: Kinds that keep the pod Pending for ``duration`` seconds (None: until the pod is deleted).
PENDING_KINDS = frozenset({"unschedulable", "image_pull", "create_container_config", "slow_start"})
#: Kinds that strike a running container ``after`` seconds after it started.
RUNNING_KINDS = frozenset({"evicted", "preempted", "node_shutdown", "oom_killed", "container_failure",
                           "log_disconnect"})
KINDS = PENDING_KINDS | RUNNING_KINDS


@dataclass(frozen=True)
class Fault(_kit.Fault):
    """One injected failure.

    kind:
        ``unschedulable`` — Pending, PodScheduled False / Unschedulable with ``message``;
        ``image_pull`` — Pending, waiting ``ErrImagePull`` then ``ImagePullBackOff``;
        ``create_container_config`` — Pending, waiting ``CreateContainerConfigError``;
        ``slow_start`` — ``ContainerCreating`` for ``duration`` seconds (default 2) before Running;
        ``container_failure`` — the container exits with ``exit_code`` ``after`` seconds, command not run;
        ``oom_killed`` — the container is SIGKILLed, terminated reason ``OOMKilled``, exit code 137;
        ``evicted`` — kubelet eviction: pod Failed, reason ``Evicted``, condition DisruptionTarget;
        ``preempted`` — scheduler preemption: DisruptionTarget ``PreemptionByScheduler``, pod deleted;
        ``node_shutdown`` — node reclaimed (spot): pod Failed, reason ``Terminated``, DisruptionTarget;
        ``log_disconnect`` — open ``follow`` log streams of the pod are closed (the process goes on).
    after: seconds after the container started before a running fault strikes.
    duration: how long a pending fault lasts; None keeps the pod Pending until it is deleted.
    """

    KINDS = KINDS

    duration: float | None = None
    exit_code: int = 1

    @classmethod
    def parse(cls, value: Any) -> list[Fault]:
        """Faults from an annotation value or a mapping; ValueError when malformed."""
        if isinstance(value, str):
            text = value.strip()
            if not text.startswith(("{", "[")):
                return [cls(kind=text)]
            value = json.loads(text)
        if isinstance(value, list):
            return [fault for item in value for fault in cls.parse(item)]
        if isinstance(value, dict):
            known = {f.name for f in fields(cls)}
            unknown = set(value) - known
            if unknown:
                raise ValueError(f"unknown fault fields {sorted(unknown)}")
            return [cls(**value)]
        raise ValueError(f"cannot read a fault from {value!r}")


@dataclass
class FaultRule(_kit.FaultRule):
    """A registered fault waiting for the pods it matches: of the Job ``job``, in ``namespace``, named
    ``pod_prefix``... (None: any); ``count`` None matches every pod."""

    namespace: str | None = None
    pod_prefix: str | None = None

    def matches(self, name: str, namespace: str = "", labels: dict[str, str] | None = None, **facts: Any) -> bool:
        if self.namespace is not None and namespace != self.namespace:
            return False
        if self.job is not None and (labels or {}).get("batch.kubernetes.io/job-name") != self.job:
            return False
        return self.pod_prefix is None or name.startswith(self.pod_prefix)


def faults_for(rules: list[FaultRule], pod: dict[str, Any]) -> list[Fault]:
    """The faults a new pod gets: its annotation's, then each matching rule's (consuming one use)."""
    meta = pod["metadata"]
    annotation = (meta.get("annotations") or {}).get(FAULT_ANNOTATION)
    return [*(Fault.parse(annotation) if annotation else []),
            *_kit.take_faults(rules, meta["name"], namespace=meta.get("namespace", ""), labels=meta.get("labels"))]
