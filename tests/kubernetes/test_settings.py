"""Settings of the kubernetes flavor: validated before anything reaches a cluster."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from airflow_stepops.settings.kubernetes import (
    KubernetesStepOperatorConfig,
    KubernetesStepOperatorSettings,
    merged_pod_options,
)


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
        ({"ttl_seconds_after_finished": -1}, "greater than or equal to 0"),
        ({"unschedulable_timeout_seconds": 0}, "greater than 0"),
        ({"service_account_name": "Not_Valid"}, "not a valid Kubernetes name"),
        ({"instance_type": "ml.p3.2xlarge"}, "Extra inputs are not permitted"),
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
