"""Scheduler and kubelet of the one emulated node: pods run as local process groups.

Each pod gets a lifecycle task that moves its status the way Kubernetes does (Pending, scheduled,
ContainerCreating, Running, Succeeded/Failed), runs init containers and then the first container's
``command`` + ``args`` as a subprocess in its own session, keeps its output as the pod log, and on
deletion sends SIGTERM to the process group and SIGKILL after the grace period.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import math
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from airflow_stepops.testing._images import python_for, shims_for, write_missing_shims
from airflow_stepops.testing._kit import signal_group
from airflow_stepops.testing.kubernetes._cluster import Cluster
from airflow_stepops.testing.kubernetes._faults import Fault, faults_for
from airflow_stepops.testing.kubernetes._store import CONFIGMAPS, NODES, PODS, PVCS, SECRETS, Event
from airflow_stepops.testing.kubernetes._util import (
    JSON,
    deep,
    node_selector_term_matcher,
    parse_quantity,
    timestamp,
    timestamp_nano,
    utcnow,
)

logger = logging.getLogger(__name__)
TERMINAL = ("Succeeded", "Failed")
_SIGNAL_EXIT = 128
_MESSAGE_LIMIT = 4096


class _Stopped(Exception):
    """The pod is being stopped (deleted, evicted, emulator shutdown): leave the lifecycle."""


class _ConfigError(Exception):
    """The container cannot be configured (missing ConfigMap/Secret key): CreateContainerConfigError."""


class _MountError(Exception):
    """A volume cannot be set up (missing ConfigMap/Secret/PVC): the pod stays ContainerCreating."""


class LogBuffer:
    """One container run's output as the kubelet keeps it: the current log file (what pods/log serves),
    line by line with timestamps, and up to ``containerLogMaxFiles - 1`` rotated files; followers wait
    on it and, like the kubelet's, read on into the new file after a rotation."""

    def __init__(self) -> None:
        self.lines: list[tuple[datetime, bytes]] = []
        self.rotated: list[list[tuple[datetime, bytes]]] = []
        self.base = 0  # lines rotated out before lines[0]: followers count positions from the first line
        self.size = 0  # bytes of the current file in the CRI format ("<time> stdout F <line>")
        self.closed = False
        self.disconnects = 0
        self._partial = b""
        self._event = asyncio.Event()

    def _append(self, when: datetime, line: bytes) -> None:
        self.lines.append((when, line))
        self.size += len(timestamp_nano(when)) + len(" stdout F ") + len(line)

    def feed(self, chunk: bytes) -> None:
        data = self._partial + chunk
        *complete, self._partial = data.split(b"\n")
        now = utcnow()
        for line in complete:
            self._append(now, line + b"\n")
        if complete:
            self._wake()

    def close(self) -> None:
        if self._partial:
            self._append(utcnow(), self._partial)
            self._partial = b""
        self.closed = True
        self._wake()

    def rotate(self, max_files: int) -> None:
        """Rename the current file away and start a new one; only ``max_files`` files are kept."""
        self.rotated = [*self.rotated, self.lines][-(max_files - 1):] if max_files > 1 else []
        self.base += len(self.lines)
        self.lines, self.size = [], 0

    @property
    def end(self) -> int:
        return self.base + len(self.lines)

    def since(self, position: int) -> list[tuple[datetime, bytes]]:
        """Lines from ``position`` on, from the rotated files still kept when a follower is behind."""
        if position >= self.base:
            return self.lines[position - self.base:]
        kept = [line for file in self.rotated for line in file] + self.lines
        return kept[max(position - (self.end - len(kept)), 0):]

    def disconnect(self) -> None:
        """Drop open follow streams (a log gap for clients that do not reconnect)."""
        self.disconnects += 1
        self._wake()

    def _wake(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, seen: int, timeout: float | None = None) -> None:
        if self.end > seen or self.closed:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)


@dataclass
class ContainerRun:
    """One start of one container."""

    name: str
    logs: LogBuffer = field(default_factory=LogBuffer)
    container_id: str = ""
    started_at: str = ""
    proc: asyncio.subprocess.Process | None = None
    reason: str | None = None  # set when the kubelet killed it for a reason (OOMKilled)


@dataclass
class PodRuntime:
    """The kubelet's state for one pod."""

    uid: str
    namespace: str
    name: str
    faults: list[Fault]
    workdir: Path
    status: JSON
    runs: dict[str, list[ContainerRun]] = field(default_factory=dict)
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    grace_changed: asyncio.Event = field(default_factory=asyncio.Event)
    cause: str | None = None
    grace: float | None = None
    delete: bool = False
    task: asyncio.Task[None] | None = None
    done: bool = False
    timers: list[asyncio.TimerHandle] = field(default_factory=list)
    current: ContainerRun | None = None
    volumes: dict[str, Path] = field(default_factory=dict)

    def request_stop(self, cause: str, grace: float, *, delete: bool = False) -> None:
        """The first cause names the final status; the shortest grace period wins."""
        self.cause = self.cause or cause
        if self.grace is None or grace < self.grace:
            self.grace = grace
            self.grace_changed.set()
        self.delete = self.delete or delete
        self.stop_event.set()

    async def sleep(self, seconds: float | None) -> None:
        """Sleep, or raise _Stopped as soon as a stop is requested; None sleeps until then."""
        if self.stop_event.is_set():
            raise _Stopped
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stop_event.wait(), seconds)
        if self.stop_event.is_set():
            raise _Stopped

    def fault(self, *kinds: str) -> Fault | None:
        return next((f for f in self.faults if f.kind in kinds), None)

    def latest(self, container: str) -> ContainerRun | None:
        runs = self.runs.get(container)
        return runs[-1] if runs else None


def _condition(status: JSON, kind: str, value: bool, reason: str | None = None, message: str | None = None) -> None:
    conditions = status.setdefault("conditions", [])
    wanted = {"type": kind, "status": "True" if value else "False", "lastProbeTime": None}
    if reason:
        wanted["reason"] = reason
    if message:
        wanted["message"] = message
    for index, existing in enumerate(conditions):
        if existing["type"] == kind:
            same = existing["status"] == wanted["status"]
            wanted["lastTransitionTime"] = existing["lastTransitionTime"] if same else timestamp()
            conditions[index] = wanted
            return
    wanted["lastTransitionTime"] = timestamp()
    conditions.append(wanted)


def _containers(pod: JSON, kind: str = "containers") -> list[JSON]:
    return list(pod["spec"].get(kind) or [])


def _requests(pod: JSON) -> dict[str, Any]:
    """Effective requests: the sum over containers, at least the largest init container's."""
    total: dict[str, Any] = {}
    for container in _containers(pod):
        for name, value in ((container.get("resources") or {}).get("requests") or {}).items():
            total[name] = total.get(name, 0) + parse_quantity(value)
    for container in _containers(pod, "initContainers"):
        for name, value in ((container.get("resources") or {}).get("requests") or {}).items():
            total[name] = max(total.get(name, 0), parse_quantity(value))
    return total


def _tolerates(tolerations: list[JSON], taint: JSON) -> bool:
    for tol in tolerations:
        if tol.get("effect") and tol["effect"] != taint.get("effect"):
            continue
        if tol.get("operator") == "Exists" and (not tol.get("key") or tol["key"] == taint.get("key")):
            return True
        if tol.get("key") == taint.get("key") and tol.get("value", "") == taint.get("value", ""):
            return True
    return False


def _rewriter(mapping: list[tuple[str, str]]) -> Callable[[str], str]:
    """Replace container paths (mount points, termination log) by their host directories, in one pass."""
    pairs = sorted(((c.rstrip("/") or "/", h) for c, h in mapping), key=lambda p: -len(p[0]))
    if not pairs:
        return lambda text: text
    table = dict(pairs)
    pattern = re.compile(r"(?<![\w.\-/])(" + "|".join(re.escape(c) for c, _ in pairs) + r")(?=/|$|[^\w.\-])")
    return lambda text: pattern.sub(lambda m: table[m.group(1)], text)


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion; ``$$(VAR)`` stays a literal ``$(VAR)``."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


class Kubelet:
    """Runs every pod of the emulated node."""

    def __init__(self, cluster: Cluster, root: Path, port: Callable[[], int]) -> None:
        self.cluster, self.store, self.config = cluster, cluster.store, cluster.config
        self.root, self._port = root, port
        self.runtimes: dict[str, PodRuntime] = {}
        self._ips = 0
        self._shims = root / "bin"
        self._shims.mkdir(parents=True, exist_ok=True)
        for alias, target in self.config.command_aliases.items():
            if "/" not in alias:
                shim = self._shims / alias
                shim.write_text(f'#!/bin/sh\nexec "{target}" "$@"\n')
                shim.chmod(0o755)
        write_missing_shims(self._shims, tuple(self.config.command_aliases))
        self.store.subscribe(self._on_event)

    # ----- wiring ---------------------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        if event.resource is not PODS:
            return
        meta = event.obj["metadata"]
        runtime = self.runtimes.get(meta["uid"])
        if event.type == "ADDED" and event.obj["status"].get("phase") not in TERMINAL:
            self._start(event.obj)
        elif runtime is None:
            return
        elif event.type == "DELETED":
            runtime.request_stop("delete", 0, delete=True)
            self.cluster.loop.call_soon(self._forget, runtime)
        elif meta.get("deletionTimestamp"):
            runtime.request_stop("delete", self._capped(meta.get("deletionGracePeriodSeconds") or 0), delete=True)

    def _capped(self, grace: float) -> float:
        cap = self.config.grace_period_cap
        return grace if cap is None else min(grace, cap)

    def grace_for_delete(self, pod: JSON, requested: int | None) -> int:
        """The grace period a pod deletion gets: 0 once nothing runs any more (the object goes at once)."""
        runtime = self.runtimes.get(pod["metadata"]["uid"])
        if runtime is None or runtime.done or pod["status"].get("phase") in TERMINAL:
            return 0
        grace = pod["spec"].get("terminationGracePeriodSeconds", 30) if requested is None else requested
        return max(int(grace), 0)

    def _start(self, pod: JSON) -> None:
        meta = pod["metadata"]
        try:
            faults = faults_for(self.cluster.fault_rules, pod)
        except ValueError as exc:
            faults = []
            self.cluster.record_event(pod, "FailedFaultAnnotation", f"emulator: bad fault annotation: {exc}",
                                      warning=True)
        workdir = self.root / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"
        runtime = PodRuntime(meta["uid"], meta["namespace"], meta["name"], faults, workdir, deep(pod["status"]))
        self.runtimes[meta["uid"]] = runtime
        runtime.task = self.cluster.loop.create_task(self._lifecycle(runtime))

    def _forget(self, runtime: PodRuntime) -> None:
        if runtime.task is not None and not runtime.task.done():
            runtime.task.add_done_callback(lambda _: self._forget(runtime))
            return
        self.runtimes.pop(runtime.uid, None)
        shutil.rmtree(runtime.workdir, ignore_errors=True)

    async def shutdown(self) -> None:
        """Kill every process at once (the emulator is stopping) and wait for the lifecycles."""
        tasks = []
        for runtime in list(self.runtimes.values()):
            runtime.request_stop("shutdown", 0)
            if runtime.task is not None:
                tasks.append(runtime.task)
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        for runtime in list(self.runtimes.values()):
            shutil.rmtree(runtime.workdir, ignore_errors=True)

    def pod(self, runtime: PodRuntime) -> JSON:
        pod = self.store.peek(PODS, runtime.namespace, runtime.name)
        if pod is None or pod["metadata"]["uid"] != runtime.uid:
            raise _Stopped
        return pod

    def publish(self, runtime: PodRuntime, spec_change: Callable[[JSON], None] | None = None) -> None:
        """Write the runtime's view of the pod status (and a spec change, for binding) to the API."""
        if runtime.cause == "shutdown":
            return
        self.pod(runtime)

        def write(pod: JSON) -> None:
            pod["status"] = deep(runtime.status)
            if spec_change:
                spec_change(pod)
        self.store.mutate(PODS, runtime.namespace, runtime.name, write)

    def event(self, runtime: PodRuntime, reason: str, message: str, *, warning: bool = False,
              component: str = "kubelet") -> None:
        if runtime.cause != "shutdown":
            with contextlib.suppress(_Stopped):
                self.cluster.record_event(self.pod(runtime), reason, message, warning=warning, component=component)

    # ----- lifecycle ------------------------------------------------------------------------------

    async def _lifecycle(self, runtime: PodRuntime) -> None:
        try:
            await self._schedule(runtime)
            await self._create_sandbox(runtime)
            if await self._run_init_containers(runtime):
                await self._run_main(runtime)
        except _Stopped:
            pass
        except Exception as exc:  # an emulator bug must not leave the pod hanging silently
            logger.exception("emulator error running pod %s/%s", runtime.namespace, runtime.name)
            self.event(runtime, "EmulatorError", f"emulator: {exc!r}", warning=True)
            runtime.request_stop("error", 0)
        finally:
            for timer in runtime.timers:
                timer.cancel()
            with contextlib.suppress(_Stopped):
                await self._finish(runtime)
            runtime.done = True
            for runs in runtime.runs.values():
                for run in runs:
                    run.logs.close()

    async def _schedule(self, runtime: PodRuntime) -> None:
        await runtime.sleep(self.config.schedule_delay or 0)
        fault = runtime.fault("unschedulable")
        loop = self.cluster.loop
        until = None if fault is None or fault.duration is None else loop.time() + fault.duration
        while True:
            pod = self.pod(runtime)
            if pod["spec"].get("nodeName"):
                break
            faulted = fault is not None and (until is None or loop.time() < until)
            reason = (fault.message or _default_unschedulable(pod)) if faulted and fault else self._fit(pod)
            if reason is None:
                node = self.config.node.name
                _condition(runtime.status, "PodScheduled", True)
                self.publish(runtime, _bind(node))
                self.event(runtime, "Scheduled", f"Successfully assigned {runtime.namespace}/{runtime.name} to {node}",
                           component="default-scheduler")
                return
            before = deep(runtime.status)
            _condition(runtime.status, "PodScheduled", False, "Unschedulable", reason)
            if runtime.status != before:
                self.publish(runtime)
                self.event(runtime, "FailedScheduling", reason, warning=True, component="default-scheduler")
            wait = 0.5 if until is None else max(0.01, min(0.5, until - loop.time()))
            await self.cluster.changed(wait, runtime.stop_event)
            if runtime.stop_event.is_set():
                raise _Stopped

    def _fit(self, pod: JSON) -> str | None:
        """None if the node can take the pod, else the scheduler's FailedScheduling message."""
        spec = pod["spec"]
        for volume in spec.get("volumes") or []:
            claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
            if claim and self.store.peek(PVCS, pod["metadata"]["namespace"], claim) is None:
                return (f'0/1 nodes are available: persistentvolumeclaim "{claim}" not found. preemption: 0/1 nodes '
                        "are available: 1 Preemption is not helpful for scheduling.")
        node = self.store.peek(NODES, None, self.config.node.name)
        if node is None:
            return "no nodes available to schedule pods"
        labels = node["metadata"].get("labels") or {}
        reasons: list[str] = []
        if node["spec"].get("unschedulable"):
            reasons.append("1 node(s) were unschedulable")
        selector_ok = all(labels.get(k) == v for k, v in (spec.get("nodeSelector") or {}).items())
        required = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
                    .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
        terms = required.get("nodeSelectorTerms") or []
        if terms and not any(node_selector_term_matcher(term)(labels) for term in terms):
            selector_ok = False
        if not selector_ok:
            reasons.append("1 node(s) didn't match Pod's node affinity/selector")
        for taint in node["spec"].get("taints") or []:
            if taint.get("effect") in ("NoSchedule", "NoExecute") and not _tolerates(spec.get("tolerations") or [],
                                                                                       taint):
                value = f": {taint['value']}" if taint.get("value") else ""
                reasons.append(f"1 node(s) had untolerated taint {{{taint['key']}{value}}}")
                break
        resource_only = not reasons
        allocatable = node["status"].get("allocatable") or {}
        used = {"pods": 0}
        for other in self.store.items(PODS):
            if other["spec"].get("nodeName") == node["metadata"]["name"] and other["status"].get(
                    "phase") not in TERMINAL:
                used["pods"] += 1
                for name, amount in _requests(other).items():
                    used[name] = used.get(name, 0) + amount
        wanted = {**_requests(pod), "pods": 1}
        for name, amount in sorted(wanted.items()):
            if not amount:
                continue
            have = parse_quantity(allocatable[name]) if name in allocatable else 0
            if used.get(name, 0) + amount > have:
                reasons.append(f"1 Insufficient {name}" if name != "pods" else "1 Too many pods")
        if not reasons:
            return None
        tail = ("1 No preemption victims found for incoming pod" if resource_only
                else "1 Preemption is not helpful for scheduling")
        return f"0/1 nodes are available: {', '.join(reasons)}. preemption: 0/1 nodes are available: {tail}."

    async def _create_sandbox(self, runtime: PodRuntime) -> None:
        pod = self.pod(runtime)
        self._ips += 1
        ip = f"10.244.0.{self._ips % 250 + 2}"
        status = runtime.status
        status.update(hostIP="127.0.0.1", hostIPs=[{"ip": "127.0.0.1"}], podIP=ip, podIPs=[{"ip": ip}],
                      startTime=timestamp())
        inits, mains = _containers(pod, "initContainers"), _containers(pod)
        _condition(status, "PodReadyToStartContainers", True)
        if inits:
            names = " ".join(c["name"] for c in inits)
            _condition(status, "Initialized", False, "ContainersNotInitialized",
                       f"containers with incomplete status: [{names}]")
        else:
            _condition(status, "Initialized", True)
        self._set_not_ready(runtime, pod)
        _condition(status, "PodScheduled", True)
        status["conditions"].sort(key=lambda c: _CONDITION_ORDER.get(c["type"], 9))
        if inits:
            status["initContainerStatuses"] = [_waiting(c, "PodInitializing" if i else "ContainerCreating")
                                               for i, c in enumerate(inits)]
        status["containerStatuses"] = [_waiting(c, "PodInitializing" if inits else "ContainerCreating")
                                       for c in mains]
        self.publish(runtime)
        runtime.workdir.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                runtime.volumes = self._mount_volumes(runtime, self.pod(runtime))
                break
            except _MountError as exc:
                self.event(runtime, "FailedMount", str(exc), warning=True)
                await runtime.sleep(1.0)
        await runtime.sleep(self.config.start_delay or 0)
        fault = runtime.fault("slow_start")
        if fault is not None:
            await runtime.sleep(2.0 if fault.duration is None else fault.duration)
        first = (inits or mains)[0]
        await self._pull(runtime, first)

    async def _pull(self, runtime: PodRuntime, container: JSON) -> None:
        """Image pull and container config faults: the pod stays Pending with the kubelet's reasons."""
        image, loop = container["image"], self.cluster.loop
        fault = runtime.fault("image_pull")
        if fault is not None:
            until = None if fault.duration is None else loop.time() + fault.duration
            error = fault.message or (f'failed to pull and unpack image "{_qualified(image)}": failed to resolve '
                                      f'reference "{_qualified(image)}": {_qualified(image)}: not found')
            backoff = False
            while until is None or loop.time() < until:
                if backoff:
                    self._wait_state(runtime, container, "ImagePullBackOff", f'Back-off pulling image "{image}"')
                    self.event(runtime, "BackOff", f'Back-off pulling image "{image}"')
                else:
                    self._wait_state(runtime, container, "ErrImagePull", f"rpc error: code = NotFound desc = {error}")
                    self.event(runtime, "Failed", f'Failed to pull image "{image}": {error}', warning=True)
                    self.event(runtime, "Failed", "Error: ErrImagePull", warning=True)
                backoff = not backoff
                step = self.config.image_pull_backoff
                await runtime.sleep(step if until is None else max(0.0, min(step, until - loop.time())))
        self.event(runtime, "Pulled", f'Container image "{image}" already present on machine')
        fault = runtime.fault("create_container_config")
        if fault is not None:
            message = fault.message or 'secret "step-credentials" not found'
            self._wait_state(runtime, container, "CreateContainerConfigError", message)
            self.event(runtime, "Failed", f"Error: {message}", warning=True)
            await runtime.sleep(fault.duration)

    def _wait_state(self, runtime: PodRuntime, container: JSON, reason: str, message: str) -> None:
        key = "initContainerStatuses" if any(
            s["name"] == container["name"] for s in runtime.status.get("initContainerStatuses") or []) \
            else "containerStatuses"
        for entry in runtime.status.get(key) or []:
            if entry["name"] == container["name"]:
                entry["state"] = {"waiting": {"reason": reason, "message": message}}
        self.publish(runtime)

    def _set_not_ready(self, runtime: PodRuntime, pod: JSON, reason: str = "ContainersNotReady") -> None:
        names = " ".join(c["name"] for c in _containers(pod))
        message = f"containers with unready status: [{names}]" if reason == "ContainersNotReady" else None
        _condition(runtime.status, "Ready", False, reason, message)
        _condition(runtime.status, "ContainersReady", False, reason, message)

    async def _run_init_containers(self, runtime: PodRuntime) -> bool:
        pod = self.pod(runtime)
        inits = _containers(pod, "initContainers")
        for index, container in enumerate(inits):
            if container.get("restartPolicy") == "Always":  # a native sidecar: reported running, not run
                _set_entry(runtime.status, "initContainerStatuses", container["name"], _running_entry(
                    container, "", timestamp(), restarts=0))
                continue
            while True:
                code = await self._run_container(runtime, container, "initContainerStatuses")
                if code == 0:
                    break
                if pod["spec"].get("restartPolicy") == "Never":
                    runtime.status["phase"] = "Failed"
                    self._set_not_ready(runtime, pod, "PodFailed")
                    self.publish(runtime)
                    return False
                await self._back_off(runtime, container, "initContainerStatuses")
            if index + 1 < len(inits):
                _set_entry(runtime.status, "initContainerStatuses", inits[index + 1]["name"],
                           _waiting(inits[index + 1], "ContainerCreating"))
        if inits:
            _condition(runtime.status, "Initialized", True)
            for entry in runtime.status["containerStatuses"]:
                entry["state"] = {"waiting": {"reason": "ContainerCreating"}}
            self.publish(runtime)
        return True

    async def _run_main(self, runtime: PodRuntime) -> None:
        pod = self.pod(runtime)
        main, *others = _containers(pod)
        policy = pod["spec"].get("restartPolicy", "Always")
        deadline = pod["spec"].get("activeDeadlineSeconds")
        if deadline:
            runtime.timers.append(self.cluster.loop.call_later(
                float(deadline), runtime.request_stop, "deadline", self._capped(pod["spec"].get(
                    "terminationGracePeriodSeconds", 30))))
        while True:
            for other in others:  # only the first container runs; the others are reported alongside it
                _set_entry(runtime.status, "containerStatuses", other["name"],
                           _running_entry(other, _container_id(runtime, other["name"], 0), timestamp(), 0))
            code = await self._run_container(runtime, main, "containerStatuses", faults=True)
            if policy == "Always" or (policy == "OnFailure" and code != 0):
                await self._back_off(runtime, main, "containerStatuses")
                continue
            runtime.status["phase"] = "Succeeded" if code == 0 else "Failed"
            for other in others:
                _set_entry(runtime.status, "containerStatuses", other["name"], _terminated_entry(
                    other, _container_id(runtime, other["name"], 0), 0, "Completed", None,
                    timestamp(), timestamp(), 0, ready=False))
            self._set_not_ready(runtime, pod, "PodCompleted" if code == 0 else "PodFailed")
            self.publish(runtime)
            return

    async def _back_off(self, runtime: PodRuntime, container: JSON, key: str) -> None:
        restarts = len(runtime.runs.get(container["name"], []))
        delay = min(self.config.restart_backoff * 2 ** (restarts - 1), 300.0)
        for entry in runtime.status.get(key) or []:
            if entry["name"] == container["name"]:
                entry["lastState"] = entry["state"]
                entry["state"] = {"waiting": {"reason": "CrashLoopBackOff", "message": (
                    f"back-off {math.ceil(delay)}s restarting failed container={container['name']} "
                    f"pod={runtime.name}_{runtime.namespace}({runtime.uid})")}}
                entry["ready"] = entry["started"] = False
        self.publish(runtime)
        self.event(runtime, "BackOff", "Back-off restarting failed container " + container["name"], warning=True)
        await runtime.sleep(delay)

    # ----- one container --------------------------------------------------------------------------

    async def _run_container(self, runtime: PodRuntime, container: JSON, key: str, *, faults: bool = False) -> int:
        """Start the container's process, stream its output, wait for it; returns the exit code."""
        name = container["name"]
        attempt = len(runtime.runs.get(name, []))
        while True:
            try:
                argv, env, cwd, message_file = self._prepare(runtime, self.pod(runtime), container)
                break
            except _ConfigError as exc:
                self._wait_state(runtime, container, "CreateContainerConfigError", str(exc))
                self.event(runtime, "Failed", f"Error: {exc}", warning=True)
                await runtime.sleep(1.0)
        failure = runtime.fault("container_failure") if faults else None
        if failure is not None:
            note = failure.message or f"emulator: injected container failure (exit code {failure.exit_code})"
            argv = [sys.executable, "-c", f"import sys, time; time.sleep({failure.after!r}); "
                                          f"sys.stderr.write({note!r} + '\\n'); sys.exit({failure.exit_code})"]
        run = ContainerRun(name, container_id=_container_id(runtime, name, attempt), started_at=timestamp())
        runtime.runs.setdefault(name, []).append(run)
        restarts = attempt
        if runtime.stop_event.is_set():
            raise _Stopped
        try:
            run.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True)
        except OSError as exc:
            text = (f"failed to create containerd task: failed to create shim task: OCI runtime create failed: "
                    f'runc create failed: unable to start container process: exec: "{argv[0]}": {exc.strerror}: '
                    "unknown")
            _set_entry(runtime.status, key, name, _terminated_entry(
                container, run.container_id, 128, "StartError", text, run.started_at, timestamp(), restarts,
                ready=False))
            self.event(runtime, "Failed", f"Error: {text}", warning=True)
            self.publish(runtime)
            return 128
        runtime.current = run
        self.event(runtime, "Created", f"Created container: {name}")
        self.event(runtime, "Started", f"Started container {name}")
        entry = _running_entry(container, run.container_id, run.started_at, restarts)
        if key == "containerStatuses":
            entry["ready"] = True
            _condition(runtime.status, "Ready", True)
            _condition(runtime.status, "ContainersReady", True)
            runtime.status["phase"] = "Running"
        else:
            entry["ready"] = False
        previous = next((e for e in runtime.status.get(key) or [] if e["name"] == name), None)
        if previous is not None and previous["state"].get("terminated"):
            entry["lastState"] = previous["state"]
        elif previous is not None and previous.get("lastState"):
            entry["lastState"] = previous["lastState"]
        _set_entry(runtime.status, key, name, entry)
        self.publish(runtime)
        if faults:
            self._arm_running_faults(runtime, run)
        reader = self.cluster.loop.create_task(_pump(run.proc, run.logs))
        rotator = self.cluster.loop.create_task(self._rotate_logs(run.logs))
        try:
            await self._wait_process(runtime, run.proc)
        finally:
            rotator.cancel()
            signal_group(run.proc.pid, signal.SIGKILL)  # the container is gone: so is everything it started
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(reader), 2.0)
            reader.cancel()
            run.logs.close()
            runtime.current = None
        code = run.proc.returncode if run.proc.returncode is not None else 137
        code = _SIGNAL_EXIT - code if code < 0 else code
        reason = run.reason or ("Completed" if code == 0 else "Error")
        message = _termination_message(container, message_file, run.logs, code)
        _set_entry(runtime.status, key, name, _terminated_entry(
            container, run.container_id, code, reason, message, run.started_at, timestamp(), restarts,
            ready=False, last=entry.get("lastState")))
        if runtime.stop_event.is_set():
            raise _Stopped  # the final status is written once, with the stop's reason, by _finish
        if key == "containerStatuses":
            self._set_not_ready(runtime, self.pod(runtime))
        self.publish(runtime)
        return code

    async def _rotate_logs(self, logs: LogBuffer) -> None:
        """The kubelet's container log manager: every monitor interval, rotate the log of a *running*
        container whose file reached containerLogMaxSize (``if info.Size() < c.policy.MaxSize``: skip);
        https://github.com/kubernetes/kubernetes/blob/master/pkg/kubelet/logs/container_log_manager.go"""
        config = self.config
        while True:
            await asyncio.sleep(config.container_log_monitor_interval)
            if logs.size >= config.container_log_max_size:
                logs.rotate(config.container_log_max_files)

    async def _wait_process(self, runtime: PodRuntime, proc: asyncio.subprocess.Process) -> None:
        """Wait for the process; on a stop, SIGTERM the group and SIGKILL it once the grace period ends."""
        waiter = self.cluster.loop.create_task(_main_exit(proc))
        stopper = self.cluster.loop.create_task(runtime.stop_event.wait())
        try:
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if waiter.done():
                return
            loop = self.cluster.loop
            requested = loop.time()
            if runtime.grace:
                if runtime.cause != "shutdown":
                    self.event(runtime, "Killing", f"Stopping container {runtime.current.name if runtime.current else ''}")
                signal_group(proc.pid, signal.SIGTERM)
            while not waiter.done():
                remaining = requested + (runtime.grace or 0) - loop.time()
                if remaining <= 0:
                    signal_group(proc.pid, signal.SIGKILL)
                    await waiter
                    break
                runtime.grace_changed.clear()
                changed = loop.create_task(runtime.grace_changed.wait())
                await asyncio.wait({waiter, changed}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                changed.cancel()
        finally:
            stopper.cancel()
            if not waiter.done():
                signal_group(proc.pid, signal.SIGKILL)
                await waiter

    def _arm_running_faults(self, runtime: PodRuntime, run: ContainerRun) -> None:
        for fault in runtime.faults:
            if fault.kind in ("oom_killed", "log_disconnect", "evicted", "node_shutdown", "preempted"):
                runtime.timers.append(self.cluster.loop.call_later(fault.after, self.strike, runtime, fault))

    def strike(self, runtime: PodRuntime, fault: Fault) -> None:
        """Inflict a running-pod fault now."""
        if runtime.done or runtime.stop_event.is_set():
            return
        run = runtime.current
        if fault not in runtime.faults:
            runtime.faults.append(fault)
        if fault.kind == "oom_killed":
            if run is not None and run.proc is not None and run.proc.returncode is None:
                run.reason = "OOMKilled"
                signal_group(run.proc.pid, signal.SIGKILL)
        elif fault.kind == "log_disconnect":
            for runs in runtime.runs.values():
                for each in runs:
                    each.logs.disconnect()
        elif fault.kind in ("evicted", "node_shutdown"):
            pod = self.pod(runtime)
            grace = 0 if fault.kind == "evicted" else self._capped(pod["spec"].get("terminationGracePeriodSeconds", 30))
            runtime.request_stop(fault.kind, grace)
        elif fault.kind == "preempted":
            self._preempt(runtime, fault)
        else:
            raise ValueError(f"fault {fault.kind!r} cannot strike a running pod")

    def _preempt(self, runtime: PodRuntime, fault: Fault) -> None:
        """Scheduler preemption: a DisruptionTarget condition, then an ordinary graceful deletion."""
        message = fault.message or "default-scheduler: preempting to accommodate a higher priority pod"
        with contextlib.suppress(_Stopped):
            _condition(runtime.status, "DisruptionTarget", True, "PreemptionByScheduler", message)
            self.publish(runtime)
            self.event(runtime, "Preempted", "Preempted by pod on node " + self.config.node.name,
                       component="default-scheduler")
            self.cluster.delete(PODS, runtime.namespace, runtime.name)

    async def _finish(self, runtime: PodRuntime) -> None:
        """Terminal status for a stopped pod, then the final deletion when one was asked for."""
        if runtime.cause in (None, "shutdown"):
            return
        pod = self.pod(runtime)
        status = runtime.status
        for key in ("initContainerStatuses", "containerStatuses"):
            for entry in status.get(key) or []:
                state = entry["state"]
                if "running" in state:
                    entry["state"] = {"terminated": {"exitCode": 137, "reason": "Error", "startedAt": state[
                        "running"].get("startedAt"), "finishedAt": timestamp(), "containerID": entry.get(
                        "containerID", "")}}
                elif "waiting" in state:
                    entry["state"] = {"terminated": {
                        "exitCode": 137, "reason": "ContainerStatusUnknown", "finishedAt": None, "startedAt": None,
                        "message": "The container could not be located when the pod was terminated"}}
                entry["ready"], entry["started"] = False, False
        codes = [e["state"]["terminated"].get("exitCode") for e in status.get("containerStatuses") or []]
        if status.get("phase") not in TERMINAL:
            succeeded = bool(codes) and all(code == 0 for code in codes)
            status["phase"] = "Succeeded" if succeeded and runtime.cause == "delete" else "Failed"
        node_message = "Pod was terminated in response to imminent node shutdown."
        if runtime.cause == "evicted":
            fault = runtime.fault("evicted")
            text = (fault.message if fault and fault.message else
                    "The node was low on resource: memory. Threshold quantity: 100Mi, available: 51200Ki. Container "
                    f"{_containers(pod)[0]['name']} was using 30Gi, request is 0, has larger consumption of memory.")
            status.update(reason="Evicted", message=text)
            _condition(status, "DisruptionTarget", True, "TerminationByKubelet", text)
            self.event(runtime, "Evicted", text, warning=True)
        elif runtime.cause == "node_shutdown":
            fault = runtime.fault("node_shutdown")
            text = fault.message if fault and fault.message else node_message
            status.update(reason="Terminated", message=text)
            _condition(status, "DisruptionTarget", True, "TerminationByKubelet", text)
            self.event(runtime, "Shutdown", text, warning=True)
        elif runtime.cause == "deadline":
            text = "Pod was active on the node longer than the specified deadline"
            status.update(reason="DeadlineExceeded", message=text)
            self.event(runtime, "DeadlineExceeded", text, warning=True)
        self._set_not_ready(runtime, pod, "PodCompleted" if status["phase"] == "Succeeded" else "PodFailed")
        self.publish(runtime)
        if runtime.delete and self.store.peek(PODS, runtime.namespace, runtime.name) is not None:
            self.store.delete(PODS, runtime.namespace, runtime.name, grace=0)

    # ----- container configuration ----------------------------------------------------------------

    def _mount_volumes(self, runtime: PodRuntime, pod: JSON) -> dict[str, Path]:
        volumes: dict[str, Path] = {}
        namespace = pod["metadata"]["namespace"]
        for volume in pod["spec"].get("volumes") or []:
            name = volume["name"]
            target = runtime.workdir / "volumes" / name
            if "hostPath" in volume:
                volumes[name] = Path(volume["hostPath"]["path"])
                if volume["hostPath"].get("type") == "DirectoryOrCreate":
                    volumes[name].mkdir(parents=True, exist_ok=True)
                continue
            if "persistentVolumeClaim" in volume:
                volumes[name] = self.pvc_path(namespace, volume["persistentVolumeClaim"]["claimName"])
                continue
            target.mkdir(parents=True, exist_ok=True)
            volumes[name] = target
            for kind, res, label in (("configMap", CONFIGMAPS, "configmap"), ("secret", SECRETS, "secret")):
                source = volume.get(kind)
                if source is None:
                    continue
                ref = source.get("name") or source.get("secretName", "")
                obj = self.store.peek(res, namespace, ref)
                if obj is None:
                    if source.get("optional"):
                        break
                    raise _MountError(f'MountVolume.SetUp failed for volume "{name}" : {label} "{ref}" not found')
                data = _decoded(obj)
                items = source.get("items") or [{"key": k, "path": k} for k in data]
                for item in items:
                    if item["key"] in data:
                        path = target / item["path"]
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_bytes(data[item["key"]])
        return volumes

    def pvc_path(self, namespace: str, claim: str) -> Path:
        root = self.config.pvc_root or (self.root / "pvc")
        path = Path(root) / namespace / claim
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _prepare(self, runtime: PodRuntime, pod: JSON, container: JSON) -> tuple[list[str], dict[str, str], str,
                                                                                  Path]:
        """argv, environment, working directory and termination-log file of a container process."""
        volumes = runtime.volumes
        cdir = runtime.workdir / "containers" / container["name"]
        cdir.mkdir(parents=True, exist_ok=True)
        message_file = cdir / "termination-log"
        message_file.touch()
        mapping = [(container["terminationMessagePath"], str(message_file))]
        for mount in container.get("volumeMounts") or []:
            host = volumes.get(mount["name"], cdir)
            if mount.get("subPath"):
                host = host / mount["subPath"]
                host.mkdir(parents=True, exist_ok=True)
            mapping.append((mount["mountPath"], str(host)))
        rewrite = _rewriter(mapping)
        env = self._environment(runtime, pod, container)
        env = {key: rewrite(value) for key, value in env.items()}
        argv = [_expand(rewrite(str(part)), env) for part in
                (container.get("command") or []) + (container.get("args") or [])]
        if not argv:
            raise _ConfigError("emulator: the container has no command or args (images are not run, only commands)")
        alias = self.config.command_aliases.get(argv[0]) or (
            self.config.command_aliases.get(os.path.basename(argv[0])) if argv[0].startswith("/") else None)
        if alias:  # a user's image runs the host's interpreter; a plain Python image its own (testing._images)
            argv[0] = python_for(container.get("image")) if alias == sys.executable else alias
        rootfs = runtime.workdir / "rootfs"
        working = container.get("workingDir")
        cwd = rootfs
        if working:  # under a mount it is the mount's host directory, else a directory of the pod's rootfs
            cwd = Path(rewrite(working)) if rewrite(working) != working else rootfs / working.lstrip("/")
        cwd.mkdir(parents=True, exist_ok=True)
        return argv, env, str(cwd), message_file

    def _environment(self, runtime: PodRuntime, pod: JSON, container: JSON) -> dict[str, str]:
        meta, namespace = pod["metadata"], pod["metadata"]["namespace"]
        base = dict(os.environ) if self.config.inherit_env else {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "LANG": "C.UTF-8"}
        base["PATH"] = f"{shims_for(container.get('image'), self._shims)}{os.pathsep}{base.get('PATH', '')}"
        base.update(HOME=str(runtime.workdir / "rootfs"), HOSTNAME=meta["name"],
                    KUBERNETES_SERVICE_HOST="127.0.0.1", KUBERNETES_SERVICE_PORT=str(self._port()),
                    KUBERNETES_PORT=f"tcp://127.0.0.1:{self._port()}")
        base.update(self.config.env)
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            for kind, res, label in (("configMapRef", CONFIGMAPS, "configmap"), ("secretRef", SECRETS, "secret")):
                ref = source.get(kind)
                if ref is None:
                    continue
                obj = self.store.peek(res, namespace, ref.get("name", ""))
                if obj is None:
                    if ref.get("optional"):
                        continue
                    raise _ConfigError(f'{label} "{ref.get("name")}" not found')
                env.update({prefix + k: v.decode(errors="replace") for k, v in _decoded(obj).items()})
        for var in container.get("env") or []:
            if "valueFrom" not in var:
                env[var["name"]] = _expand(str(var.get("value", "")), {**env})
                continue
            value = self._value_from(pod, container, var["valueFrom"])
            if value is not None:
                env[var["name"]] = value
        return {**base, **env}

    def _value_from(self, pod: JSON, container: JSON, source: JSON) -> str | None:
        namespace = pod["metadata"]["namespace"]
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
            if match:
                return (pod["metadata"].get(match.group(1)) or {}).get(match.group(2), "")
            fields = {"metadata.name": pod["metadata"]["name"], "metadata.namespace": namespace,
                      "metadata.uid": pod["metadata"]["uid"], "spec.nodeName": self.config.node.name,
                      "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
                      "status.hostIP": "127.0.0.1", "status.hostIPs": "127.0.0.1",
                      "status.podIP": self.runtimes[pod["metadata"]["uid"]].status.get("podIP", ""),
                      "status.podIPs": self.runtimes[pod["metadata"]["uid"]].status.get("podIP", "")}
            return fields.get(path, "")
        if "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            target = next((c for c in _containers(pod) if c["name"] == ref.get("containerName")), container)
            part, _, name = ref["resource"].partition(".")
            value = ((target.get("resources") or {}).get(part) or {}).get(name)
            if value is None:
                value = self.config.node.capacity.get(name, "0") if part == "limits" else "0"
            divisor = parse_quantity(ref.get("divisor", "1"))
            return str(math.ceil(parse_quantity(value) / divisor))
        for kind, res, label in (("configMapKeyRef", CONFIGMAPS, "ConfigMap"), ("secretKeyRef", SECRETS, "Secret")):
            ref = source.get(kind)
            if ref is None:
                continue
            obj = self.store.peek(res, namespace, ref.get("name", ""))
            data = _decoded(obj) if obj is not None else None
            if data is None or ref["key"] not in data:
                if ref.get("optional"):
                    return None
                if data is None:
                    raise _ConfigError(f'{label.lower()} "{ref.get("name")}" not found')
                raise _ConfigError(f"couldn't find key {ref['key']} in {label} {namespace}/{ref.get('name')}")
            return data[ref["key"]].decode(errors="replace")
        return None


_CONDITION_ORDER = {"PodReadyToStartContainers": 0, "Initialized": 1, "Ready": 2, "ContainersReady": 3,
                    "PodScheduled": 4, "DisruptionTarget": 5}


def _bind(node: str) -> Callable[[JSON], None]:
    """The binding a scheduler writes: the pod's spec.nodeName."""
    return lambda pod: pod["spec"].update(nodeName=node)


async def _main_exit(proc: asyncio.subprocess.Process) -> None:
    """The container ends when its main process does, and the runtime kills what it left running.
    ``proc.wait()`` would also wait for the output pipe, which such a leftover process keeps open."""
    while proc.returncode is None:
        await asyncio.sleep(0.05)


async def _pump(proc: asyncio.subprocess.Process, logs: LogBuffer) -> None:
    assert proc.stdout is not None
    while True:
        chunk = await proc.stdout.read(65536)
        if not chunk:
            return
        logs.feed(chunk)


def _decoded(obj: JSON) -> dict[str, bytes]:
    data = {k: str(v).encode() for k, v in (obj.get("data") or {}).items()}
    if obj.get("kind") == "Secret":
        data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
    data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    return data


def _qualified(image: str) -> str:
    name = image if "/" in image.split(":")[0] else f"library/{image}"
    if "." not in name.split("/")[0] and ":" not in name.split("/")[0] and name.split("/")[0] != "localhost":
        name = f"docker.io/{name}"
    return name if (":" in name.rsplit("/", 1)[-1] or "@" in name) else f"{name}:latest"


def _container_id(runtime: PodRuntime, name: str, attempt: int) -> str:
    return "containerd://" + hashlib.sha256(f"{runtime.uid}/{name}/{attempt}".encode()).hexdigest()


def _image_id(image: str) -> str:
    return f"{_qualified(image).rsplit(':', 1)[0]}@sha256:{hashlib.sha256(image.encode()).hexdigest()}"


def _waiting(container: JSON, reason: str) -> JSON:
    return {"name": container["name"], "image": container["image"], "imageID": "", "ready": False,
            "restartCount": 0, "started": False, "state": {"waiting": {"reason": reason}}, "lastState": {}}


def _running_entry(container: JSON, container_id: str, started: str, restarts: int) -> JSON:
    return {"name": container["name"], "image": container["image"], "imageID": _image_id(container["image"]),
            "containerID": container_id, "ready": True, "restartCount": restarts, "started": True,
            "state": {"running": {"startedAt": started}}, "lastState": {}}


def _terminated_entry(container: JSON, container_id: str, code: int, reason: str, message: str | None,
                      started: str, finished: str, restarts: int, *, ready: bool, last: JSON | None = None) -> JSON:
    terminated = {"exitCode": code, "reason": reason, "startedAt": started, "finishedAt": finished,
                  "containerID": container_id}
    if message:
        terminated["message"] = message
    return {"name": container["name"], "image": container["image"], "imageID": _image_id(container["image"]),
            "containerID": container_id, "ready": ready, "restartCount": restarts, "started": False,
            "state": {"terminated": terminated}, "lastState": last or {}}


def _set_entry(status: JSON, key: str, name: str, entry: JSON) -> None:
    entries = status.setdefault(key, [])
    for index, existing in enumerate(entries):
        if existing["name"] == name:
            entries[index] = entry
            return
    entries.append(entry)


def _termination_message(container: JSON, message_file: Path, logs: LogBuffer, code: int) -> str | None:
    """What the container wrote to its terminationMessagePath, of which the kubelet keeps the *last* 4096
    bytes (``tail.ReadAtMost``: getTerminationMessage in pkg/kubelet/kuberuntime/kuberuntime_container.go;
    https://kubernetes.io/docs/tasks/debug/debug-application/determine-reason-pod-failure/); the tail of
    the current log file on failure if the policy says so."""
    try:
        text = message_file.read_bytes()[-_MESSAGE_LIMIT:].decode(errors="replace")
    except OSError:
        text = ""
    if not text and code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
        tail = b"".join(line for _, line in logs.lines[-80:])[-2048:]
        text = tail.decode(errors="replace")
    return text or None


def _default_unschedulable(pod: JSON) -> str:
    wanted = [name for name in _requests(pod) if "gpu" in name] or ["cpu"]
    reasons = ", ".join(f"1 Insufficient {name}" for name in sorted(wanted))
    return (f"0/1 nodes are available: {reasons}. preemption: 0/1 nodes are available: 1 No preemption victims "
            "found for incoming pod.")
