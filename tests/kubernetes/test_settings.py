"""Settings of the kubernetes flavor: validated before anything reaches a cluster."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from airflow_stepops.resources import ResourceSettings
from airflow_stepops.settings.kubernetes import (
    KubernetesStepOperatorConfig,
    KubernetesStepOperatorSettings,
    check_labels,
    merged_pod_options,
)

from ..flavorjobs import declare


def test_step_settings_merge_over_operator_defaults():
    config = KubernetesStepOperatorConfig(
        image="registry.local/train:1", node_selector={"pool": "gpu"}, labels={"team": "ml"},
        tolerations=[{"key": "gpu", "operator": "Exists"}], service_account_name="trainer")
    settings = KubernetesStepOperatorSettings(
        node_selector={"zone": "a"}, labels={"run": "nightly"},
        tolerations=[{"key": "spot", "operator": "Exists"}])
    merged = merged_pod_options(config, settings)
    assert merged.node_selector == {"pool": "gpu", "zone": "a"}
    assert merged.labels == {"team": "ml", "run": "nightly"}
    assert [t["key"] for t in merged.tolerations] == ["gpu", "spot"]
    assert merged.service_account_name == "trainer"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gpu_resource_name": "gpu"}, "gpu_resource_name: 'gpu' is not a GPU resource"),
        ({"labels": {"owner": "x" * 64}}, "is not a valid label value"),
        ({"labels": {"bad key!": "x"}}, "is not a valid label key"),
        ({"max_runtime_in_seconds": -5}, "greater than 0"),
        ({"ttl_seconds_after_finished": 0}, "greater than or equal to 60"),
        ({"unschedulable_timeout_seconds": 0}, "greater than 0"),
        ({"service_account_name": "Not_Valid"}, "not a valid Kubernetes name"),
        ({"instance_type": "ml.p3.2xlarge"}, r"instance_type\s+unknown field; allowed: "),
    ],
)
def test_bad_step_settings_are_refused(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        KubernetesStepOperatorSettings(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kubernetes_namespace": "ML_Team"}, "not a valid namespace name"),
        ({"kubernetes_namespace": "n" * 64}, "not a valid namespace name"),
        ({"incluster": True, "kubernetes_context": "prod"}, "incluster=true cannot be combined"),
        ({"kubernetes_conn_id": "k8s", "config_file": "/x"}, "kubernetes_conn_id already names the cluster"),
        ({"artifact_store": "pvc://Bad_Claim/x"}, "expected pvc://CLAIM/path"),
    ],
)
def test_bad_operator_config_is_refused(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        KubernetesStepOperatorConfig(**kwargs)


def test_credentials_source_is_described():
    assert KubernetesStepOperatorConfig(kubernetes_conn_id="k8s").credentials_source() == "kubernetes connection 'k8s'"
    assert KubernetesStepOperatorConfig(incluster=True).credentials_source() == "in-cluster service account"
    described = KubernetesStepOperatorConfig(kubernetes_context="gpu").credentials_source()
    assert described == "default kubeconfig, context 'gpu'"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"resources": {"cpu_count": -2}}, r"resources.cpu_count: Input should be greater than 0"),
        ({"resources": {"memory": "-1GB"}}, r"resources.memory"),
        ({"settings": {"step_operator.kubernetes": {"gpu_resource_name": "gpus"}}},
         r"gpu_resource_name: 'gpus' is not a GPU resource"),
        ({"settings": {"step_operator.kubernetes": {"labels": {"run": "not valid!"}}}},
         r"labels\['run'\]: 'not valid!' is not a valid label value"),
        ({"settings": {"step_operator.kubernetes": {"node_selector": {"pool": "p" * 64}}}},
         r"node_selector\['pool'\].*at most 63 characters"),
        ({"settings": {"step_operator.kubernetes": {"environment": {"STEPOPS_BUNDLE_0": "x"}}}},
         r"names starting with STEPOPS_ are reserved"),
        ({"settings": {"resources": ResourceSettings(gpu_count=1, gpu_type="T4"),
                       "step_operator.kubernetes": KubernetesStepOperatorSettings(gpu_type_node_label="gpu-model")}},
         r"gpu_type_node_values: no node label values known for gpu_type 'T4' on node label 'gpu-model'"),
    ],
)
def test_bad_kubernetes_step_settings_fail_at_parse_time(kwargs, message):
    from airflow_stepops.exceptions import StepOperatorConfigError

    with pytest.raises(StepOperatorConfigError, match=message):
        declare("kubernetes", **kwargs)


def test_gpu_type_on_a_custom_node_label_needs_its_values():
    custom = {"gpu_type_node_label": "gpu-model", "gpu_type_node_values": {"nvidia-tesla-t4": ["t4"]}}
    declare("kubernetes", settings={"resources": ResourceSettings(gpu_count=1, gpu_type="t4"),
                                    "step_operator.kubernetes": KubernetesStepOperatorSettings(**custom)})
    settings = KubernetesStepOperatorSettings(gpu_type_node_label="cloud.google.com/gke-accelerator")
    assert settings.gpu_node_values("L4") == ["nvidia-l4"]


def test_job_names_are_valid_and_at_most_63_characters():
    from airflow_stepops.bundle import StepIdentity
    from airflow_stepops.hooks.kubernetes_job import DNS_LABEL, identity_labels, job_name

    identity = StepIdentity("A" * 200 + "_DAG", "manual__2026-01-01T00:00:00+00:00", "Train.Model_" * 20, 1234, 3)
    name = job_name(identity)
    assert len(name) <= 63 and DNS_LABEL.match(name) and name.endswith(f"-m1234-t3-{identity.digest[:10]}")
    assert name != job_name(identity.for_try(4))
    check_labels(identity_labels(identity), "labels")  # every generated label is valid


def test_pvc_store_needs_the_worker_mount_path():
    with pytest.raises(ValidationError, match="worker_artifact_path: required with a pvc:// artifact_store"):
        KubernetesStepOperatorConfig(artifact_store="pvc://data/steps")
    config = KubernetesStepOperatorConfig(artifact_store="pvc://data/steps", worker_artifact_path="/mnt/data")
    assert config.pvc_store == ("data", "steps") and config.worker_store_path == "/mnt/data/steps"
    with pytest.raises(ValidationError, match="inline_transfer_max_size: '4MiB' is over 1MiB"):
        KubernetesStepOperatorConfig(inline_transfer_max_size="4MiB")


def test_active_deadline_from_max_runtime_execution_timeout_and_max_cost():
    from airflow_stepops.hooks.base import StepSpec
    from airflow_stepops.hooks.kubernetes import KubernetesStepOperatorHook
    from airflow_stepops.hooks.kubernetes_job import TIMEOUT_BACKSTOP_SECONDS

    def deadline(timeout=None, cost_seconds=None, **settings):
        spec = StepSpec(identity=None, bundle_uri="", output_uri="", resources=None,
                        settings=KubernetesStepOperatorSettings(**settings), timeout_seconds=timeout,
                        cost_seconds=cost_seconds)
        return KubernetesStepOperatorHook.max_runtime(None, spec)

    assert deadline() is None
    assert deadline(max_runtime_in_seconds=600) == 600
    assert deadline(99.5) == 100 + TIMEOUT_BACKSTOP_SECONDS
    assert deadline(30, max_runtime_in_seconds=600) == 30 + TIMEOUT_BACKSTOP_SECONDS
    assert deadline(30, cost_seconds=20, max_runtime_in_seconds=600) == 20  # what max_cost leaves the attempt


def test_without_credentials_the_cncf_default_connection_is_used():
    assert KubernetesStepOperatorConfig().credentials_source().startswith("kubernetes connection 'kubernetes_default'")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tolerations": [{"key": "gpu", "operator": "Exist"}]},
     r"tolerations\[0\].operator: 'Exist' is not allowed; did you mean 'Exists'\? \(allowed: Exists, Equal\)"),
    ({"tolerations": [{"key": "gpu", "effect": "NoSchedul"}]}, r"did you mean 'NoSchedule'\?"),
    ({"tolerations": [{"key": "gpu", "opertor": "Exists"}]}, r"unknown toleration field 'opertor'"),
    ({"tolerations": [{"operator": "Equal", "value": "x"}]}, r"without a key must have operator 'Exists'"),
    ({"tolerations": [{"key": "gpu", "operator": "Exists", "value": "x"}]}, r"operator 'Exists' takes no value"),
    ({"tolerations": [{"key": "gpu", "value": "a b"}]}, r"tolerations\[0\].value.*not a valid label value"),
    ({"tolerations": [{"key": "gpu", "tolerationSeconds": 60}]}, r"only with effect 'NoExecute'"),
    ({"spot_toleration": {"key": "spot", "operator": "exists"}}, r"spot_toleration.operator: 'exists'"),
    ({"volumes": [{"name": "scratch", "emptyDir": {"sizeLimit": "-1Gi"}}]},
     r"volumes\[0\].emptyDir.sizeLimit: '-1Gi' is not a non-negative Kubernetes quantity"),
    ({"volumes": [{"name": "scratch", "emptyDir": {"sizeLimit": "10 GB"}}]}, r"not a non-negative Kubernetes quantity"),
    ({"volumes": [{"name": "Scratch", "emptyDir": {}}]}, r"volumes\[0\].name: 'Scratch' is not a volume name"),
    ({"volumes": [{"name": "data"}]}, r"a volume has exactly one source"),
    ({"volume_mounts": [{"name": "data", "mountPath": "/data", "subPath": "../x"}]}, r"without '\.\.'"),
    ({"volume_mounts": [{"name": "data", "mount_path": "/data"}]}, r"unknown volume mount field 'mount_path'"),
    ({"volume_mounts": [{"name": "data", "mountPath": "/d", "mountPropagation": "Both"}]}, r"mountPropagation"),
    ({"image_pull_secrets": ["Registry Creds"]}, r"'Registry Creds' is not a Secret name"),
])
def test_pod_spec_fields_are_checked_at_parse_time(kwargs, message):
    """What the API server would refuse when the Job is created fails when the DAG is parsed instead."""
    with pytest.raises(ValidationError, match=message):
        KubernetesStepOperatorSettings(**kwargs)
    if "spot_toleration" not in kwargs:  # the same pod options as the step operator's defaults
        with pytest.raises(ValidationError, match=message):
            KubernetesStepOperatorConfig(**kwargs)


def test_valid_pod_spec_fields_pass():
    settings = KubernetesStepOperatorSettings(
        tolerations=[{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}, {"operator": "Exists"},
                     {"key": "pool", "operator": "Equal", "value": "a100", "effect": "NoExecute",
                      "tolerationSeconds": 30}],
        volumes=[{"name": "scratch", "emptyDir": {"sizeLimit": "10Gi", "medium": "Memory"}},
                 {"name": "data", "persistentVolumeClaim": {"claimName": "datasets"}}],
        volume_mounts=[{"name": "data", "mountPath": "/data", "subPath": "v1", "readOnly": True}],
        image_pull_secrets=["registry-creds"])
    assert len(settings.tolerations) == 3 and settings.volumes[0]["emptyDir"]["sizeLimit"] == "10Gi"


def test_no_cluster_credentials_names_the_sources_tried(monkeypatch, tmp_path):
    from airflow_stepops.exceptions import StepOperatorConfigError
    from airflow_stepops.hooks.kubernetes import KubernetesStepOperatorHook

    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "AIRFLOW_CONN_KUBERNETES_DEFAULT"):
        monkeypatch.delenv(name, raising=False)
    hook = KubernetesStepOperatorHook("k8s", config=KubernetesStepOperatorConfig())
    with pytest.raises(StepOperatorConfigError) as err:
        assert hook.api_client is None  # raises
    assert str(err.value) == (
        "kubernetes: no cluster credentials found; tried Airflow connection 'kubernetes_default' (absent, or without a "
        "kubeconfig); the in-cluster service account (KUBERNETES_SERVICE_HOST is not set: not in a pod); the kubeconfig "
        f"{tmp_path}/.kube/config (no such file). Set one in the extras of step operator connection 'k8s': "
        "\"kubernetes_conn_id\" (a kubernetes connection), \"kubernetes_context\" (with \"config_file\" for a "
        "kubeconfig elsewhere) or \"incluster\": true")
