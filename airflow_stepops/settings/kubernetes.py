"""Settings and configuration of the ``kubernetes`` flavor (steps as ``batch/v1`` Jobs).

Pod options exist twice on purpose: as defaults in the registered step operator (connection
extras) and as per-step overrides in ``KubernetesStepOperatorSettings``; ``merged_pod_options``
combines them (dicts merge, lists append, scalars override).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from airflow_stepops.settings.base import BaseStepOperatorConfig, BaseStepOperatorSettings

#: RFC 1123 label: Job, namespace and container names
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
#: label values: empty, or alphanumerics with -_. inside
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
#: qualified names (label keys, extended resources): optional DNS prefix and a name part
QUALIFIED_NAME = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
#: device-plugin resources of the common GPU and accelerator vendors
KNOWN_GPU_RESOURCES = ("nvidia.com/gpu", "amd.com/gpu", "gpu.intel.com/i915", "gpu.intel.com/xe",
                       "habana.ai/gaudi", "aws.amazon.com/neuron", "aws.amazon.com/neuroncore")


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


class KubernetesPodOptions(BaseModel):
    """Pod-level options shared by the step operator's defaults and per-step settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    service_account_name: str | None = Field(default=None, description="Kubernetes service account of the pod.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="nodeSelector of the pod.")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Pod tolerations.")
    affinity: dict[str, Any] | None = Field(default=None, description="Pod affinity (Kubernetes JSON).")
    volumes: list[dict[str, Any]] = Field(default_factory=list, description="Extra pod volumes.")
    volume_mounts: list[dict[str, Any]] = Field(default_factory=list, description="Mounts in the step container.")
    image_pull_secrets: list[str] = Field(default_factory=list, description="Names of image pull secrets.")
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels of the Job and pod.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Extra annotations of the Job and pod.")
    priority_class_name: str | None = Field(default=None, description="priorityClassName of the pod.")

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        return check_labels(value, "labels")

    @field_validator("node_selector")
    @classmethod
    def _selector(cls, value: dict[str, str]) -> dict[str, str]:
        return check_labels(value, "node_selector")

    @field_validator("service_account_name", "priority_class_name")
    @classmethod
    def _dns_name(cls, value: str | None, info: Any) -> str | None:
        if value is not None and (len(value) > 253 or not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", value)):
            raise ValueError(f"{info.field_name}: {value!r} is not a valid Kubernetes name")
        return value


class KubernetesStepOperatorSettings(BaseStepOperatorSettings, KubernetesPodOptions):
    """Per-step options of the kubernetes flavor."""

    flavor: ClassVar[str] = "kubernetes"

    image: str | None = Field(default=None, description="Container image for this step (overrides the operator's).")
    gpu_resource_name: str = Field(default="nvidia.com/gpu", description="Extended resource that counts GPUs.")
    gpu_type_node_label: str = Field(
        default="nvidia.com/gpu.product",
        description="Node label that tells the GPU model (set by NVIDIA's GPU feature discovery).",
    )
    gpu_type_node_values: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Node label values per gpu_type, e.g. {'A100': ['NVIDIA-A100-SXM4-40GB']}; default: the "
        "values GPU feature discovery reports for common models.",
    )
    use_spot: bool = Field(default=False, description="Run on spot/preemptible nodes.")
    spot_node_selector: dict[str, str] = Field(
        default_factory=lambda: {"karpenter.sh/capacity-type": "spot"},
        description="nodeSelector added when use_spot (EKS: eks.amazonaws.com/capacityType=SPOT, "
        "GKE: cloud.google.com/gke-spot=true).",
    )
    spot_toleration: dict[str, Any] | None = Field(
        default=None, description="Toleration added when use_spot, for tainted spot node pools."
    )
    ttl_seconds_after_finished: int | None = Field(default=3600, ge=0, description="Job ttlSecondsAfterFinished.")
    unschedulable_timeout_seconds: int = Field(
        default=600, gt=0, description="Fail when the pod stays unschedulable this long (e.g. no node has the GPU)."
    )

    @field_validator("gpu_resource_name")
    @classmethod
    def _gpu_resource(cls, value: str) -> str:
        if value not in KNOWN_GPU_RESOURCES and ("/" not in value or not QUALIFIED_NAME.match(value)):
            raise ValueError(
                f"gpu_resource_name: {value!r} is not a GPU resource; use a device-plugin resource such as "
                f"{', '.join(KNOWN_GPU_RESOURCES)} (or another '<vendor-domain>/<name>')"
            )
        return value

    @field_validator("spot_node_selector")
    @classmethod
    def _spot_selector(cls, value: dict[str, str]) -> dict[str, str]:
        return check_labels(value, "spot_node_selector")


class KubernetesStepOperatorConfig(BaseStepOperatorConfig, KubernetesPodOptions):
    """Connection extras of a ``stepops_kubernetes`` step operator."""

    flavor: ClassVar[str] = "kubernetes"

    kubernetes_conn_id: str | None = Field(
        default=None, description="A cncf-kubernetes 'kubernetes' connection to take cluster credentials from."
    )
    kubernetes_context: str | None = Field(default=None, description="kubeconfig context to use.")
    config_file: str | None = Field(default=None, description="Path of a kubeconfig file.")
    incluster: bool = Field(default=False, description="Use the pod's service account (Airflow runs in the cluster).")
    kubernetes_namespace: str = Field(default="default", description="Namespace of the step Jobs.")
    image: str | None = Field(default=None, description="Container image steps run in (Python + cloudpickle).")

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
        where = self.config_file or "default kubeconfig"
        return f"{where}" + (f", context {self.kubernetes_context!r}" if self.kubernetes_context else "")


def merged_pod_options(config: KubernetesStepOperatorConfig,
                       settings: KubernetesStepOperatorSettings) -> KubernetesPodOptions:
    """Step settings over operator defaults: dicts merge, lists append, scalars override."""
    merged: dict[str, Any] = {}
    for name, field in KubernetesPodOptions.model_fields.items():
        base, over = getattr(config, name), getattr(settings, name)
        if isinstance(base, dict) and isinstance(over, dict) and name != "affinity":
            merged[name] = {**base, **over}
        elif isinstance(base, list):
            merged[name] = [*base, *over]
        else:
            merged[name] = over if over not in (None, field.default) else base
    return KubernetesPodOptions(**merged)
