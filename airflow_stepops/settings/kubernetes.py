"""Settings and configuration of the ``kubernetes`` flavor (steps as ``batch/v1`` Jobs).

Pod options exist twice on purpose: as defaults in the registered step operator (connection
extras) and as per-step overrides in ``KubernetesStepOperatorSettings``; ``merged_pod_options``
combines them (dicts merge, lists append, scalars override).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from airflow_stepops.settings.base import BaseStepOperatorConfig, ContainerStepSettings, EnvVars, checked_by

#: RFC 1123 label: Job, namespace and container names
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
#: RFC 1123 subdomain: PersistentVolumeClaim names (at most 253 characters)
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
#: label values: empty, or alphanumerics with -_. inside
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
#: qualified names (label keys, extended resources): optional DNS prefix and a name part
QUALIFIED_NAME = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
#: all annotations of one object, keys and values, in bytes (TotalAnnotationSizeLimitB in
#: https://github.com/kubernetes/apimachinery/blob/master/pkg/api/validation/objectmeta.go)
ANNOTATIONS_MAX_BYTES = 256 * 1024
#: device-plugin resources of the common GPU and accelerator vendors
KNOWN_GPU_RESOURCES = ("nvidia.com/gpu", "amd.com/gpu", "gpu.intel.com/i915", "gpu.intel.com/xe",
                       "habana.ai/gaudi", "aws.amazon.com/neuron", "aws.amazon.com/neuroncore")
#: ``nvidia.com/gpu.product`` values that NVIDIA GPU feature discovery reports, per canonical gpu_type
GFD_PRODUCTS: dict[str, list[str]] = {
    "T4": ["Tesla-T4"],
    "L4": ["NVIDIA-L4"],
    "A10": ["NVIDIA-A10"],
    "A10G": ["NVIDIA-A10G"],
    "L40S": ["NVIDIA-L40S"],
    "V100": ["Tesla-V100-SXM2-16GB", "Tesla-V100-SXM2-32GB", "Tesla-V100-PCIE-16GB", "Tesla-V100-PCIE-32GB"],
    "P100": ["Tesla-P100-PCIE-16GB", "Tesla-P100-SXM2-16GB"],
    "P4": ["Tesla-P4"],
    "K80": ["Tesla-K80"],
    "A100": ["NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-PCIE-40GB", "NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-80GB-PCIe"],
    "A100-80GB": ["NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-80GB-PCIe"],
    "H100": ["NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe", "NVIDIA-H100-NVL"],
    "H200": ["NVIDIA-H200", "NVIDIA-H200-141GB-HBM3e"],
    "B200": ["NVIDIA-B200"],
}
#: ``cloud.google.com/gke-accelerator`` values on GKE
GKE_ACCELERATORS: dict[str, list[str]] = {
    "T4": ["nvidia-tesla-t4"], "L4": ["nvidia-l4"], "V100": ["nvidia-tesla-v100"], "P100": ["nvidia-tesla-p100"],
    "P4": ["nvidia-tesla-p4"], "K80": ["nvidia-tesla-k80"], "A100": ["nvidia-tesla-a100", "nvidia-a100-80gb"],
    "A100-80GB": ["nvidia-a100-80gb"], "H100": ["nvidia-h100-80gb", "nvidia-h100-mega-80gb"],
    "H200": ["nvidia-h200-141gb"], "B200": ["nvidia-b200"],
}
#: Toleration and VolumeMount fields and their enums, as the API reference documents them (Pod v1, "Scheduling"
#: and "Volumes": https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/pod-v1/)
TOLERATION_FIELDS = ("key", "operator", "value", "effect", "tolerationSeconds")
TOLERATION_OPERATORS = ("Exists", "Equal")
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
MOUNT_FIELDS = ("name", "mountPath", "subPath", "subPathExpr", "readOnly", "recursiveReadOnly", "mountPropagation")
MOUNT_PROPAGATIONS = ("None", "HostToContainer", "Bidirectional")
#: a resource quantity (https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/quantity/)
QUANTITY = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?$")
KNOWN_GPU_NODE_LABELS = {"nvidia.com/gpu.product": GFD_PRODUCTS, "cloud.google.com/gke-accelerator": GKE_ACCELERATORS}


def check_labels(labels: dict[str, str], field: str) -> dict[str, str]:
    for key, value in labels.items():
        name = key.rsplit("/", 1)[-1]
        if not QUALIFIED_NAME.match(key) or len(name) > 63 or len(key.rsplit("/", 1)[0]) > 253:
            raise ValueError(f"{field}: {key!r} is not a valid label key (an optional DNS prefix and '/', then "
                             "at most 63 alphanumerics, '-', '_' or '.')")
        if len(value) > 63 or not LABEL_VALUE.match(value):
            raise ValueError(f"{field}[{key!r}]: {value!r} is not a valid label value (at most 63 characters: "
                             "alphanumerics, '-', '_' or '.', starting and ending alphanumeric)")
    return labels


def _one_of(value: Any, allowed: tuple[str, ...], field: str) -> None:
    if value not in allowed:
        import difflib

        close = difflib.get_close_matches(str(value), allowed, n=1)
        raise ValueError(f"{field}: {value!r} is not allowed" + (f"; did you mean {close[0]!r}?" if close else "")
                         + f" (allowed: {', '.join(allowed)})")


def check_toleration(toleration: dict[str, Any], field: str) -> dict[str, Any]:
    """The rules the API server applies to a toleration (ValidateTolerations), checked before submitting."""
    unknown = sorted(set(toleration) - set(TOLERATION_FIELDS))
    if unknown:
        raise ValueError(f"{field}: unknown toleration field {unknown[0]!r} (allowed: {', '.join(TOLERATION_FIELDS)})")
    operator, key, value = toleration.get("operator") or "Equal", toleration.get("key") or "", toleration.get("value")
    _one_of(operator, TOLERATION_OPERATORS, f"{field}.operator")
    if toleration.get("effect"):
        _one_of(toleration["effect"], TAINT_EFFECTS, f"{field}.effect")
    if key:
        check_labels({key: ""}, f"{field}.key")
    elif operator != "Exists":
        raise ValueError(f"{field}: a toleration without a key must have operator 'Exists' (it matches every taint)")
    if operator == "Exists" and value:
        raise ValueError(f"{field}: operator 'Exists' takes no value (got {value!r}); use operator 'Equal' to match it")
    if operator == "Equal" and value:
        check_labels({"x": str(value)}, f"{field}.value")
    seconds = toleration.get("tolerationSeconds")
    if seconds is not None and (not isinstance(seconds, int) or toleration.get("effect") != "NoExecute"):
        raise ValueError(f"{field}.tolerationSeconds: a whole number of seconds, only with effect 'NoExecute'")
    return toleration


def check_quantity(value: Any, field: str) -> None:
    """A non-negative resource quantity such as 10Gi, 500M or 1.5."""
    text = str(value)
    if not QUANTITY.match(text) or text.startswith("-"):
        raise ValueError(f"{field}: {value!r} is not a non-negative Kubernetes quantity (e.g. 10Gi, 500Mi, 1G)")


def check_volume(volume: dict[str, Any], field: str) -> dict[str, Any]:
    name = volume.get("name")
    if not isinstance(name, str) or len(name) > 63 or not DNS_LABEL.match(name):
        raise ValueError(f"{field}.name: {name!r} is not a volume name (an RFC 1123 label: at most 63 lowercase "
                         "alphanumerics or '-')")
    sources = [k for k in volume if k != "name"]
    if len(sources) != 1:
        raise ValueError(f"{field}: a volume has exactly one source (emptyDir, persistentVolumeClaim, configMap, "
                         f"secret, ...), got {sources or 'none'}")
    empty_dir = volume.get("emptyDir") or {}
    if empty_dir.get("sizeLimit") is not None:
        check_quantity(empty_dir["sizeLimit"], f"{field}.emptyDir.sizeLimit")
    return volume


def check_volume_mount(mount: dict[str, Any], field: str) -> dict[str, Any]:
    unknown = sorted(set(mount) - set(MOUNT_FIELDS))
    if unknown:
        raise ValueError(f"{field}: unknown volume mount field {unknown[0]!r} (allowed: {', '.join(MOUNT_FIELDS)})")
    if not isinstance(mount.get("name"), str) or not DNS_LABEL.match(mount["name"]):
        raise ValueError(f"{field}.name: {mount.get('name')!r} must name a volume (an RFC 1123 label)")
    if not mount.get("mountPath") or ":" in str(mount["mountPath"]):
        raise ValueError(f"{field}.mountPath: required, a path without ':' (got {mount.get('mountPath')!r})")
    sub = str(mount.get("subPath") or "")
    if sub.startswith("/") or ".." in sub.split("/"):
        raise ValueError(f"{field}.subPath: {sub!r} must be a relative path without '..'")
    if mount.get("mountPropagation") is not None:
        _one_of(mount["mountPropagation"], MOUNT_PROPAGATIONS, f"{field}.mountPropagation")
    return mount


def check_annotations(annotations: dict[str, str], field: str) -> dict[str, str]:
    """Keys are qualified names (checked lowercased, as the API server does); 256 KiB in all.
    https://kubernetes.io/docs/concepts/overview/working-with-objects/annotations/#syntax-and-character-set"""
    for key in annotations:
        prefix, _, name = key.lower().rpartition("/")
        if not QUALIFIED_NAME.match(key.lower()) or len(name) > 63 or len(prefix) > 253:
            raise ValueError(f"{field}: {key!r} is not a valid annotation key (an optional DNS subdomain prefix and "
                             "'/', then at most 63 alphanumerics, '-', '_' or '.', starting and ending alphanumeric)")
    size = sum(len(key.encode()) + len(value.encode()) for key, value in annotations.items())
    if size > ANNOTATIONS_MAX_BYTES:
        raise ValueError(f"{field}: {size} bytes of annotations; Kubernetes allows at most {ANNOTATIONS_MAX_BYTES} "
                         "per object")
    return annotations


class KubernetesPodOptions(BaseModel):
    """Pod-level options shared by the step operator's defaults and per-step settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    service_account_name: str | None = Field(
        title="Service account", default=None, description="Kubernetes service account of the pod.")
    node_selector: dict[str, str] = Field(
        title="Node selector", default_factory=dict, description="nodeSelector of the pod.")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Pod tolerations.")
    affinity: dict[str, Any] | None = Field(default=None, description="Pod affinity (Kubernetes JSON).")
    volumes: list[dict[str, Any]] = Field(default_factory=list, description="Extra pod volumes.")
    volume_mounts: list[dict[str, Any]] = Field(
        title="Volume mounts", default_factory=list, description="Mounts in the step container.")
    image_pull_secrets: list[str] = Field(
        title="Image pull secrets", default_factory=list, description="Names of image pull secrets.")
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels of the Job and pod.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Extra annotations of the Job and pod.")
    priority_class_name: str | None = Field(
        title="Priority class", default=None, description="priorityClassName of the pod.")
    security_context: dict[str, Any] | None = Field(
        title="Pod security context",
        default=None, description="Pod securityContext (e.g. runAsNonRoot, fsGroup, seccompProfile).")
    container_security_context: dict[str, Any] | None = Field(
        title="Container security context",
        default=None, description="securityContext of the step container (e.g. allowPrivilegeEscalation: false).")

    _labels = checked_by(check_labels, "labels")

    _annotations = checked_by(check_annotations, "annotations")

    _selector = checked_by(check_labels, "node_selector")

    @field_validator("tolerations", "volumes", "volume_mounts")
    @classmethod
    def _pod_spec_items(cls, value: list[dict[str, Any]], info: ValidationInfo) -> list[dict[str, Any]]:
        field = str(info.field_name)
        check = {"tolerations": check_toleration, "volumes": check_volume, "volume_mounts": check_volume_mount}[field]
        return [check(item, f"{field}[{i}]") for i, item in enumerate(value)]

    @field_validator("image_pull_secrets")
    @classmethod
    def _pull_secrets(cls, value: list[str]) -> list[str]:
        for name in value:
            if len(name) > 253 or not DNS_SUBDOMAIN.match(name):
                raise ValueError(f"image_pull_secrets: {name!r} is not a Secret name (a DNS subdomain: lowercase "
                                 "alphanumerics, '-' or '.')")
        return value

    @field_validator("service_account_name", "priority_class_name")
    @classmethod
    def _dns_name(cls, value: str | None, info: Any) -> str | None:
        if value is not None and (len(value) > 253 or not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", value)):
            raise ValueError(f"{info.field_name}: {value!r} is not a valid Kubernetes name")
        return value


class KubernetesOnDemandPodOverrides(BaseModel):
    """Where the pod of an attempt escalated to on-demand capacity goes: these replace the step's spot node selector
    and toleration (``use_spot``), e.g. ``{"node_selector": {"karpenter.sh/capacity-type": "on-demand"}}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    node_selector: dict[str, str] = Field(
        default_factory=dict, description="nodeSelector entries added to the pod (over the step's own).")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Tolerations added to the pod.")
    affinity: dict[str, Any] | None = Field(
        default=None, description="Pod affinity (Kubernetes JSON), replacing the step's own.")

    @field_validator("node_selector")
    @classmethod
    def _selector(cls, value: dict[str, str]) -> dict[str, str]:
        return check_labels(value, "on_demand_pod_overrides.node_selector")

    @field_validator("tolerations")
    @classmethod
    def _tolerations(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [check_toleration(item, f"on_demand_pod_overrides.tolerations[{i}]") for i, item in enumerate(value)]


class KubernetesStepOperatorSettings(ContainerStepSettings, KubernetesPodOptions):
    """Per-step options of the kubernetes flavor."""

    flavor: ClassVar[str] = "kubernetes"

    image: str | None = Field(default=None, description="Container image for this step (overrides the operator's).")
    gpu_resource_name: str = Field(default="nvidia.com/gpu", description="Extended resource that counts GPUs.")
    gpu_type_node_label: str = Field(
        default="nvidia.com/gpu.product", description="Node label that tells the GPU model (set by NVIDIA's GPU "
        "feature discovery).")
    gpu_type_node_values: dict[str, list[str]] = Field(
        default_factory=dict, description="Node label values per gpu_type, e.g. {'A100': ['NVIDIA-A100-SXM4-40GB']}; "
        "default: the values GPU feature discovery reports for common models.")
    use_spot: bool = Field(default=False, description="Run on spot/preemptible nodes.")
    spot_node_selector: dict[str, str] = Field(
        default_factory=lambda: {"karpenter.sh/capacity-type": "spot"}, description="nodeSelector added when use_spot "
        "(EKS: eks.amazonaws.com/capacityType=SPOT, GKE: cloud.google.com/gke-spot=true).")
    spot_toleration: dict[str, Any] | None = Field(
        default=None, description="Toleration added when use_spot, for tainted spot node pools.")
    ttl_seconds_after_finished: int | None = Field(
        default=3600, ge=60, description="Job ttlSecondsAfterFinished (at least 60: Airflow reads the finished pod's "
        "log for the step's output).")
    unschedulable_timeout_seconds: int = Field(
        default=900, gt=0, description="Fail when no pod is created, or it stays unschedulable, this long (e.g. no "
        "node has the GPU); leave room for node auto-scaling, which takes minutes for GPU nodes.")
    start_timeout_seconds: int = Field(
        default=1800, gt=0, description="Fail when a scheduled pod has not started its container this long (large "
        "image pulls count; volumes that cannot mount, container errors).")
    require_checkpoint_dir: bool = Field(
        default=False, description="Refuse to submit unless the step operator gives the step a durable "
        "STEPOPS_CHECKPOINT_DIR (a checkpoint_volume_claim or a pvc:// artifact_store), rather than run a step that "
        "could not resume after a preemption.")

    @field_validator("gpu_resource_name")
    @classmethod
    def _gpu_resource(cls, value: str) -> str:
        if value not in KNOWN_GPU_RESOURCES and ("/" not in value or not QUALIFIED_NAME.match(value)):
            raise ValueError(
                f"gpu_resource_name: {value!r} is not a GPU resource; use a device-plugin resource such as "
                f"{', '.join(KNOWN_GPU_RESOURCES)} (or another '<vendor-domain>/<name>')"
            )
        return value

    @field_validator("spot_toleration")
    @classmethod
    def _spot_toleration(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return value if value is None else check_toleration(value, "spot_toleration")

    _spot_selector = checked_by(check_labels, "spot_node_selector")

    @field_validator("gpu_type_node_label")
    @classmethod
    def _gpu_label(cls, value: str) -> str:
        check_labels({value: ""}, "gpu_type_node_label")
        return value

    @field_validator("gpu_type_node_values")
    @classmethod
    def _gpu_values(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        from airflow_stepops.resources import normalize_gpu_type

        out: dict[str, list[str]] = {}
        for gpu_type, values in value.items():
            if not values:
                raise ValueError(f"gpu_type_node_values[{gpu_type!r}]: give at least one node label value")
            for node_value in values:
                check_labels({"x": node_value}, f"gpu_type_node_values[{gpu_type!r}]")
            out[normalize_gpu_type(gpu_type)] = list(values)
        return out

    def gpu_node_values(self, gpu_type: str) -> list[str]:
        """Values of ``gpu_type_node_label`` that mean ``gpu_type`` (canonical name)."""
        if gpu_type in self.gpu_type_node_values:
            return self.gpu_type_node_values[gpu_type]
        table = KNOWN_GPU_NODE_LABELS.get(self.gpu_type_node_label, {})
        if gpu_type not in table:
            known = ", ".join(sorted(KNOWN_GPU_NODE_LABELS))
            raise ValueError(
                f"gpu_type_node_values: no node label values known for gpu_type {gpu_type!r} on node label "
                f"{self.gpu_type_node_label!r}; set gpu_type_node_values={{{gpu_type!r}: [...]}} (built-in tables "
                f"exist for {known})"
            )
        return table[gpu_type]

    def check_resources(self, resources: Any) -> None:
        if resources.gpu_type:
            self.gpu_node_values(resources.gpu_type)


class KubernetesStepOperatorConfig(BaseStepOperatorConfig, KubernetesPodOptions):
    """Connection extras of a ``stepops_kubernetes`` step operator."""

    flavor: ClassVar[str] = "kubernetes"

    kubernetes_conn_id: str | None = Field(
        title="Kubernetes connection id", default=None, description="A cncf-kubernetes 'kubernetes' connection to "
        "take cluster credentials from.")
    kubernetes_context: str | None = Field(
        title="kubeconfig context", default=None, description="kubeconfig context to use.")
    config_file: str | None = Field(
        title="kubeconfig file path", default=None, description="Path of a kubeconfig file.")
    incluster: bool = Field(
        title="In cluster", default=False, description="Use the pod's service account (Airflow runs in the cluster).")
    kubernetes_namespace: str = Field(title="Namespace", default="default", description="Namespace of the step Jobs.")
    image: str | None = Field(default=None, description="Container image steps run in, with the workers' Python "
                              "(default: python:<major.minor>-slim; cloudpickle is installed when missing).")
    environment: EnvVars = Field(
        title="Environment variables", default_factory=dict, description="Environment of every step (no secrets).")
    worker_artifact_path: str | None = Field(
        title="Worker path of the pvc:// store", default=None, description="With a pvc:// artifact store: where that "
        "claim (its root) is mounted on Airflow workers and triggerers; the store's path inside the claim is "
        "appended.")
    checkpoint_volume_claim: str | None = Field(
        title="Checkpoint volume claim", default=None, description="PersistentVolumeClaim (ReadWriteMany, so a retry "
        "on another node can mount it) holding STEPOPS_CHECKPOINT_DIR; default: the claim of a pvc:// artifact_store. "
        "Without either, steps get no STEPOPS_CHECKPOINT_DIR.")
    checkpoint_volume_path: str = Field(
        title="Checkpoint path in the claim", default="", description="Directory inside checkpoint_volume_claim under "
        "which step checkpoint directories are made (default: the claim's root).")
    inline_transfer_max_size: str = Field(
        title="Max inline transfer size", default="512KiB", description="Bundles and outputs up to this size "
        "(compressed) travel in the pod spec and pod log; larger ones through the artifact store.")
    api_timeout_seconds: float = Field(
        title="API call timeout (s)", default=60.0, gt=0, description="Seconds one Kubernetes API call may wait for "
        "its answer before it is retried (at most 3 more times, with back-off): a lost reply never hangs a worker or "
        "triggerer.")
    console_url_template: str | None = Field(
        title="Console URL template", default=None, description="Link to a Job in your dashboard, with {namespace} "
        "and {name}, e.g. https://dashboard.example/#/job/{namespace}/{name}")
    on_demand_pod_overrides: KubernetesOnDemandPodOverrides | None = Field(
        title="On-demand pod overrides", default=None, description="For attempts escalated to on-demand capacity "
        "(steps with use_spot): node_selector, tolerations and affinity of on-demand nodes, which replace the spot "
        "node selector and toleration, e.g. {\"node_selector\": {\"karpenter.sh/capacity-type\": \"on-demand\"}}.")

    @field_validator("inline_transfer_max_size")
    @classmethod
    def _inline_size(cls, value: str) -> str:
        from airflow_stepops.resources import parse_size

        size = parse_size(value, field="inline_transfer_max_size")
        if size > 1 << 20:
            raise ValueError(f"inline_transfer_max_size: {value!r} is over 1MiB; a Job object must stay well "
                             "under etcd's 1.5MiB limit (use the artifact store for large data)")
        return value

    @property
    def inline_transfer_max_bytes(self) -> int:
        from airflow_stepops.resources import parse_size

        return parse_size(self.inline_transfer_max_size, field="inline_transfer_max_size")

    @field_validator("console_url_template")
    @classmethod
    def _console(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                value.format(namespace="ns", name="job")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"console_url_template: {value!r} may use only {{namespace}} and {{name}} "
                                 f"({exc!r})") from None
        return value

    @field_validator("kubernetes_namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        if len(value) > 63 or not DNS_LABEL.match(value):
            raise ValueError(f"kubernetes_namespace: {value!r} is not a valid namespace name (RFC 1123 label, "
                             "at most 63 lowercase alphanumerics or '-')")
        return value

    @field_validator("artifact_store")
    @classmethod
    def _store(cls, value: str | None) -> str | None:
        if value is not None and value.startswith("pvc://") and not re.match(r"^pvc://[a-z0-9]([-a-z0-9.]*[a-z0-9])?(/.*)?$", value):
            raise ValueError(f"artifact_store: {value!r}: expected pvc://CLAIM/path with a valid claim name")
        return value

    @field_validator("checkpoint_volume_claim")
    @classmethod
    def _checkpoint_claim(cls, value: str | None) -> str | None:
        if value is not None and (len(value) > 253 or not DNS_SUBDOMAIN.match(value)):
            raise ValueError(f"checkpoint_volume_claim: {value!r} is not a valid PersistentVolumeClaim name (a DNS "
                             "subdomain: at most 253 lowercase alphanumerics, '-' or '.', starting and ending "
                             "alphanumeric)")
        return value

    @field_validator("checkpoint_volume_path")
    @classmethod
    def _checkpoint_path(cls, value: str) -> str:
        # it becomes a volumeMount subPath, which the API server refuses absolute or with '..'; a leading '/'
        # means the claim's root, as in pvc://CLAIM/path
        parts = [part for part in value.split("/") if part not in ("", ".")]
        if ".." in parts:
            raise ValueError(f"checkpoint_volume_path: {value!r} must be a path inside the claim, without '..'")
        return "/".join(parts)

    @model_validator(mode="after")
    def _checkpoint_path_needs_claim(self) -> KubernetesStepOperatorConfig:
        if self.checkpoint_volume_path and not self.checkpoint_volume_claim:
            raise ValueError("checkpoint_volume_path: only used with checkpoint_volume_claim")
        return self

    @model_validator(mode="after")
    def _pvc_needs_worker_path(self) -> KubernetesStepOperatorConfig:
        if self.artifact_store and self.artifact_store.startswith("pvc://") and not self.worker_artifact_path:
            raise ValueError("worker_artifact_path: required with a pvc:// artifact_store (the path where the "
                             "claim is mounted on Airflow workers and triggerers)")
        if self.worker_artifact_path and not (self.artifact_store or "").startswith("pvc://"):
            raise ValueError("worker_artifact_path: only used with a pvc:// artifact_store")
        return self

    @property
    def worker_store_path(self) -> str | None:
        """Where workers see the pvc:// store: the claim's mount plus the path inside the claim."""
        pvc = self.pvc_store
        if pvc is None or not self.worker_artifact_path:
            return None
        root = self.worker_artifact_path.rstrip("/") or "/"
        return f"{root}/{pvc[1]}" if pvc[1] else root

    @property
    def pvc_store(self) -> tuple[str, str] | None:
        """(claim, path inside the claim) of a pvc:// artifact store."""
        if not self.artifact_store or not self.artifact_store.startswith("pvc://"):
            return None
        claim, _, sub = self.artifact_store[len("pvc://"):].partition("/")
        return claim, sub.strip("/")

    @model_validator(mode="after")
    def _one_credential_source(self) -> KubernetesStepOperatorConfig:
        given = [n for n in ("kubernetes_conn_id", "kubernetes_context", "config_file") if getattr(self, n)]
        if self.incluster and given:
            raise ValueError(f"incluster=true cannot be combined with {', '.join(given)}")
        if self.kubernetes_conn_id and (self.kubernetes_context or self.config_file):
            raise ValueError("kubernetes_conn_id already names the cluster: drop kubernetes_context/config_file")
        return self

    def credentials_source(self) -> str:
        if self.kubernetes_conn_id:
            return f"kubernetes connection {self.kubernetes_conn_id!r}"
        if self.incluster:
            return "in-cluster service account"
        if not (self.config_file or self.kubernetes_context):
            return "kubernetes connection 'kubernetes_default' (else in-cluster, else ~/.kube/config)"
        where = self.config_file or "default kubeconfig"
        return f"{where}" + (f", context {self.kubernetes_context!r}" if self.kubernetes_context else "")


def merged_pod_options(config: KubernetesStepOperatorConfig,
                       settings: KubernetesStepOperatorSettings) -> KubernetesPodOptions:
    """Step settings over operator defaults: dicts merge, lists append, scalars override."""
    merged: dict[str, Any] = {}
    for name, field in KubernetesPodOptions.model_fields.items():
        base, over = getattr(config, name), getattr(settings, name)
        if isinstance(base, dict) and isinstance(over, dict) and name not in ("affinity", "security_context",
                                                                            "container_security_context"):
            merged[name] = {**base, **over}
        elif isinstance(base, list):
            merged[name] = [*base, *over]
        else:
            merged[name] = over if over not in (None, field.default) else base
    return KubernetesPodOptions(**merged)
