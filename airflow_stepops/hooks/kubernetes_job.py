"""The ``batch/v1`` Job of one step, built from settings and resources (pure data, no cluster I/O).

Mapping, decided once here: CPU becomes a request (no CPU limit, so a step is never throttled below
what the node can give), memory and ephemeral storage become request = limit, GPUs the device-plugin
resource as limit = request with a toleration for the resource's usual taint, ``gpu_type`` a required
node affinity on ``gpu_type_node_label``, the step's timeout ``activeDeadlineSeconds``, ``backoffLimit``
is 0 (Airflow owns retries) and a pod failure policy fails the Job at once on a disruption so that it
is reported as preemption.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from airflow_stepops.bundle import StepIdentity, entry_program
from airflow_stepops.resources import ResourceSettings
from airflow_stepops.runtime.protocol import Env
from airflow_stepops.settings.kubernetes import (
    DNS_LABEL,
    KubernetesPodOptions,
    KubernetesStepOperatorConfig,
    KubernetesStepOperatorSettings,
    check_annotations,
    check_labels,
)

__all__ = ["DNS_LABEL", "build_job", "checkpoint_dir", "chunked_env", "identity_annotations", "identity_labels",
           "job_name", "pod_path"]

CONTAINER = "step"
MANAGED_BY = {"app.kubernetes.io/managed-by": "airflow-stepops"}
LABEL_PREFIX = "stepops.airflow.apache.org"
STEP_LABEL = f"{LABEL_PREFIX}/step"
STORE_MOUNT = "/var/run/stepops/store"
TERMINATION_LOG = "/dev/termination-log"
STORE_VOLUME = "stepops-artifacts"
CHECKPOINT_MOUNT = "/var/run/stepops/checkpoints"
CHECKPOINT_VOLUME = "stepops-checkpoints"
#: under a claim's mount: installed requirements kept for the next pod (``Env.REQUIREMENTS_CACHE``)
REQUIREMENTS_CACHE_DIR = "/.stepops/requirements"
ENTRY_PROGRAM = entry_program()
#: seconds after the task's execution_timeout at which Kubernetes itself stops the Job
TIMEOUT_BACKSTOP_SECONDS = 60
#: largest single environment value we write (Linux refuses single strings over 128 KiB in exec)
ENV_CHUNK_CHARS = 96 * 1024


def _label_value(text: str) -> str:
    value = re.sub(r"[^A-Za-z0-9_.-]", "-", text)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)


def identity_labels(identity: StepIdentity) -> dict[str, str]:
    """Labels of every step Job and pod: selectable, readable, and one that is unique per try."""
    return {
        **MANAGED_BY,
        STEP_LABEL: identity.digest[:40],
        f"{LABEL_PREFIX}/dag-id": _label_value(identity.dag_id),
        f"{LABEL_PREFIX}/task-id": _label_value(identity.task_id),
        f"{LABEL_PREFIX}/try-number": str(identity.try_number),
    }


def identity_annotations(identity: StepIdentity) -> dict[str, str]:
    """The exact identity (labels are cut to 63 characters): dag, run, task, map index, try."""
    return {
        f"{LABEL_PREFIX}/dag-id": identity.dag_id,
        f"{LABEL_PREFIX}/run-id": identity.run_id,
        f"{LABEL_PREFIX}/task-id": identity.task_id,
        f"{LABEL_PREFIX}/map-index": str(identity.map_index),
        f"{LABEL_PREFIX}/try-number": str(identity.try_number),
    }


def job_name(identity: StepIdentity) -> str:
    return identity.job_name(max_length=63, allowed=r"[^a-z0-9-]")


def _quantity_bytes(value: int) -> str:
    for unit, size in (("Ti", 1 << 40), ("T", 10**12), ("Gi", 1 << 30), ("G", 10**9), ("Mi", 1 << 20),
                       ("M", 10**6), ("Ki", 1 << 10), ("k", 1000)):
        if value % size == 0:
            return f"{value // size}{unit}"
    return str(value)


def _cpu(value: float) -> str:
    millis = round(value * 1000)
    return str(millis // 1000) if millis % 1000 == 0 else f"{millis}m"


def container_resources(resources: ResourceSettings, settings: KubernetesStepOperatorSettings) -> dict[str, Any]:
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if resources.cpu_count is not None:
        requests["cpu"] = _cpu(resources.cpu_count)
    if resources.memory_bytes is not None:
        requests["memory"] = limits["memory"] = _quantity_bytes(resources.memory_bytes)
    if resources.disk_bytes is not None:
        requests["ephemeral-storage"] = limits["ephemeral-storage"] = _quantity_bytes(resources.disk_bytes)
    if resources.wants_gpu:
        requests[settings.gpu_resource_name] = limits[settings.gpu_resource_name] = str(
            resources.effective_gpu_count)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _with_gpu_type(affinity: dict[str, Any] | None, label: str, values: list[str]) -> dict[str, Any]:
    """Add a required ``label In values`` to every node selector term (terms are ORed)."""
    affinity = copy.deepcopy(affinity or {})
    requirement = {"key": label, "operator": "In", "values": list(values)}
    required = affinity.setdefault("nodeAffinity", {}).setdefault(
        "requiredDuringSchedulingIgnoredDuringExecution", {"nodeSelectorTerms": []})
    terms = required.setdefault("nodeSelectorTerms", [])
    if not terms:
        terms.append({})
    for term in terms:
        term.setdefault("matchExpressions", []).append(requirement)
    return affinity


def _store_mount(config: KubernetesStepOperatorConfig) -> tuple[dict[str, Any], dict[str, Any]] | None:
    pvc = config.pvc_store
    if pvc is None:
        return None
    claim, sub = pvc
    volume = {"name": STORE_VOLUME, "persistentVolumeClaim": {"claimName": claim}}
    mount: dict[str, Any] = {"name": STORE_VOLUME, "mountPath": STORE_MOUNT}
    if sub:
        mount["subPath"] = sub
    return volume, mount


def checkpoint_dir(config: KubernetesStepOperatorConfig, identity: StepIdentity
                   ) -> tuple[str, tuple[dict[str, Any], dict[str, Any]] | None] | None:
    """``Env.CHECKPOINT_DIR`` of a step in its pod, and the volume and mount it needs (None when an
    existing mount holds it); None when the step operator has no durable place for it.

    The directory is ``<dag>/<run>/<task>/<map index>/run-<run key>`` (``StepIdentity.step_path``, as on Modal)
    on a PersistentVolumeClaim, plus ``/checkpoints`` beside the try directories of a pvc:// store: the
    same for every try of one incarnation of the run, so a retry after a preemption finds what the preempted
    try wrote. Nothing pod-local would do: the retry is a new Job, so a new pod, often on another node (the
    preempted one's node may be gone: https://kubernetes.io/docs/concepts/workloads/pods/disruptions/), and
    an emptyDir lives only as long as its pod ("When a Pod is removed from a node for any reason, the data in
    the emptyDir is deleted permanently", https://kubernetes.io/docs/concepts/storage/volumes/#emptydir). The
    claim should be ReadWriteMany: a ReadWriteOnce volume is mounted read-write by a single node, so a retry
    (or a concurrent step) on another node waits for it to be detached from the first
    (https://kubernetes.io/docs/concepts/storage/persistent-volumes/#access-modes).

    The claim (or ``checkpoint_volume_path`` inside it, through ``subPath``:
    https://kubernetes.io/docs/concepts/storage/volumes/#using-subpath) is mounted, not the step's own
    directory: the kubelet creates a missing subPath directory as root, which a non-root step could not write
    to, so the runtime creates the step's directory itself (runtime/entry.py)."""
    store = config.pvc_store
    claim = config.checkpoint_volume_claim
    if claim is None:
        if store is None:
            return None
        # on the store's claim, beside the step's try directories
        return identity.step_path(STORE_MOUNT) + "/checkpoints", None
    if store is not None and store[0] == claim:  # the store's claim, elsewhere: one volume, a second mount
        volume_name = STORE_VOLUME
        volume: dict[str, Any] = {}
    else:
        volume_name = CHECKPOINT_VOLUME
        volume = {"name": CHECKPOINT_VOLUME, "persistentVolumeClaim": {"claimName": claim}}
    mount: dict[str, Any] = {"name": volume_name, "mountPath": CHECKPOINT_MOUNT}
    if config.checkpoint_volume_path:
        mount["subPath"] = config.checkpoint_volume_path
    return identity.step_path(CHECKPOINT_MOUNT), (volume, mount)


def requirements_cache(config: KubernetesStepOperatorConfig) -> str | None:
    """``Env.REQUIREMENTS_CACHE`` in the pod: on the claim of a pvc:// store or of the checkpoints, which outlive
    the pod (nothing pod-local does); None without one."""
    if config.pvc_store is not None:
        return STORE_MOUNT + REQUIREMENTS_CACHE_DIR
    if config.checkpoint_volume_claim is not None:
        return CHECKPOINT_MOUNT + REQUIREMENTS_CACHE_DIR
    return None


def pod_path(config: KubernetesStepOperatorConfig, worker_path: str) -> str | None:
    """Where a file of the pvc:// store that workers see at ``worker_path`` is in the step's pod."""
    if config.worker_store_path is None:
        return None
    root = config.worker_store_path.rstrip("/")
    if worker_path != root and not worker_path.startswith(root + "/"):
        return None
    return STORE_MOUNT + worker_path[len(root):]


def build_job(
    *,
    identity: StepIdentity,
    config: KubernetesStepOperatorConfig,
    settings: KubernetesStepOperatorSettings,
    options: KubernetesPodOptions,
    resources: ResourceSettings,
    image: str,
    transport_env: list[dict[str, Any]],
    max_runtime: int | None = None,
    on_demand: bool = False,
) -> dict[str, Any]:
    """The Job manifest (JSON) for one try of one step; ``on_demand``: a spot step's attempt escalated to on-demand
    capacity, placed by the connection's ``on_demand_pod_overrides`` instead of the spot node selector."""
    name = job_name(identity)
    labels = {**options.labels, **identity_labels(identity)}
    annotations = {**options.annotations, **identity_annotations(identity)}
    env = [{"name": k, "value": v} for k, v in {**config.environment, **settings.environment}.items()]
    env += [{"name": Env.FLAVOR, "value": "kubernetes"}, {"name": "PYTHONUNBUFFERED", "value": "1"},
            {"name": Env.MARKER, "value": name}, {"name": Env.TERMINATION_LOG, "value": TERMINATION_LOG},
            *transport_env]
    checkpoints = checkpoint_dir(config, identity)
    if checkpoints is not None:
        env.append({"name": Env.CHECKPOINT_DIR, "value": checkpoints[0]})
    cache = requirements_cache(config)
    if cache is not None:
        env.append({"name": Env.REQUIREMENTS_CACHE, "value": cache})
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "command": ["python3", "-c", ENTRY_PROGRAM],
        "env": env,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if options.container_security_context:
        container["securityContext"] = dict(options.container_security_context)
    res = container_resources(resources, settings)
    if res:
        container["resources"] = res
    volumes = list(options.volumes)
    mounts = list(options.volume_mounts)
    store = _store_mount(config)
    if store is not None:
        volumes.append(store[0])
        mounts.append(store[1])
    if checkpoints is not None and checkpoints[1] is not None:
        volume, mount = checkpoints[1]
        if volume:
            volumes.append(volume)
        mounts.append(mount)
    if mounts:
        container["volumeMounts"] = mounts
    pod_spec: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
    if options.service_account_name:
        pod_spec["serviceAccountName"] = options.service_account_name
    node_selector = dict(options.node_selector)
    tolerations = list(options.tolerations)
    affinity = options.affinity
    overrides = config.on_demand_pod_overrides
    if settings.use_spot and on_demand:
        # the scheduler places a pod only on nodes whose labels match its nodeSelector and whose taints it tolerates
        # (https://kubernetes.io/docs/concepts/scheduling-eviction/assign-pod-node/#nodeselector): without the spot
        # selector and with the on-demand one, the pod lands on on-demand nodes
        if overrides is not None:
            node_selector.update(overrides.node_selector)
            tolerations.extend(dict(t) for t in overrides.tolerations)
            affinity = overrides.affinity if overrides.affinity is not None else affinity
    elif settings.use_spot:
        node_selector.update(settings.spot_node_selector)
        if settings.spot_toleration:
            tolerations.append(dict(settings.spot_toleration))
    if resources.wants_gpu:
        tolerations.append({"key": settings.gpu_resource_name, "operator": "Exists", "effect": "NoSchedule"})
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if resources.gpu_type:
        affinity = _with_gpu_type(affinity, settings.gpu_type_node_label, settings.gpu_node_values(resources.gpu_type))
    if affinity:
        pod_spec["affinity"] = affinity
    if options.security_context:
        pod_spec["securityContext"] = dict(options.security_context)
    if options.priority_class_name:
        pod_spec["priorityClassName"] = options.priority_class_name
    if options.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": secret} for secret in options.image_pull_secrets]
    if volumes:
        pod_spec["volumes"] = volumes
    spec: dict[str, Any] = {
        "backoffLimit": 0,
        "podFailurePolicy": {"rules": [
            {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]},
        "template": {"metadata": {"labels": labels, "annotations": annotations}, "spec": pod_spec},
    }
    if max_runtime:  # max_runtime_in_seconds, the execution_timeout's backstop, what max_cost leaves
        spec["activeDeadlineSeconds"] = max_runtime
    if settings.ttl_seconds_after_finished is not None:
        spec["ttlSecondsAfterFinished"] = settings.ttl_seconds_after_finished
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": config.kubernetes_namespace, "labels": labels,
                     "annotations": annotations},
        "spec": spec,
    }


def check_metadata(job: dict[str, Any]) -> None:
    """What the API server would refuse in the Job we built from merged options: its name, and the
    labels and annotations of the Job and its pod template (ValueError naming the field)."""
    name = job["metadata"]["name"]
    if len(name) > 63 or not DNS_LABEL.match(name):
        raise ValueError(f"metadata.name: {name!r} is not an RFC 1123 label of at most 63 characters")
    for where, meta in (("metadata", job["metadata"]), ("spec.template.metadata", job["spec"]["template"]["metadata"])):
        check_labels(meta.get("labels") or {}, f"{where}.labels")
        check_annotations(meta.get("annotations") or {}, f"{where}.annotations")


def chunked_env(prefix: str, text: str) -> list[dict[str, str]]:
    """``text`` split over ``<prefix>_0..n`` variables, with ``<prefix>_PARTS`` = n."""
    parts = [text[i:i + ENV_CHUNK_CHARS] for i in range(0, len(text), ENV_CHUNK_CHARS)] or [""]
    return [{"name": f"{prefix}_PARTS", "value": str(len(parts))},
            *({"name": f"{prefix}_{i}", "value": part} for i, part in enumerate(parts))]
