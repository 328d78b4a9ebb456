"""Injectable faults: the failures a cluster inflicts on a step that its code did not cause.

A fault reaches a pod either through a rule registered on the emulator (``KubernetesEmulator.inject``)
or through the pod annotation ``stepops.emulator/fault``, whose value is a fault kind
(``"image_pull"``), a JSON object (``{"kind": "evicted", "after": 1}``) or a JSON list of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

FAULT_ANNOTATION = "stepops.emulator/fault"

#: Kinds that keep the pod Pending for ``duration`` seconds (None: until the pod is deleted).
PENDING_KINDS = frozenset({"unschedulable", "image_pull", "create_container_config", "slow_start"})
#: Kinds that strike a running container ``after`` seconds after it started.
RUNNING_KINDS = frozenset({"evicted", "preempted", "node_shutdown", "oom_killed", "container_failure",
                           "log_disconnect"})
KINDS = PENDING_KINDS | RUNNING_KINDS


@dataclass(frozen=True)
class Fault:
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

    kind: str
    after: float = 0.0
    duration: float | None = None
    message: str | None = None
    exit_code: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {sorted(KINDS)}")

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
class FaultRule:
    """A registered fault waiting for the pods it matches; ``count`` None matches every pod."""

    fault: Fault
    namespace: str | None = None
    job: str | None = None
    pod_prefix: str | None = None
    count: int | None = 1
    applied: list[str] = field(default_factory=list)

    def matches(self, namespace: str, pod_name: str, labels: dict[str, str]) -> bool:
        if self.count is not None and self.count <= 0:
            return False
        if self.namespace is not None and namespace != self.namespace:
            return False
        if self.job is not None and labels.get("batch.kubernetes.io/job-name") != self.job:
            return False
        return self.pod_prefix is None or pod_name.startswith(self.pod_prefix)


def faults_for(rules: list[FaultRule], pod: dict[str, Any]) -> list[Fault]:
    """The faults a new pod gets: its annotation's, then each matching rule's (consuming one use)."""
    meta = pod["metadata"]
    found: list[Fault] = []
    annotation = (meta.get("annotations") or {}).get(FAULT_ANNOTATION)
    if annotation:
        found += Fault.parse(annotation)
    for rule in rules:
        if rule.matches(meta.get("namespace", ""), meta["name"], meta.get("labels") or {}):
            if rule.count is not None:
                rule.count -= 1
            rule.applied.append(meta["name"])
            found.append(rule.fault)
    return found
