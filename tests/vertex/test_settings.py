"""Vertex settings and machine choice: combinations Vertex would refuse are refused at parse time."""

from __future__ import annotations

import sys

import pytest
from pydantic import ValidationError

from airflow_stepops.exceptions import StepOperatorConfigError
from airflow_stepops.resources import ResourceSettings
from airflow_stepops.settings.vertex import VertexStepOperatorConfig, VertexStepOperatorSettings
from airflow_stepops.settings.vertex_machines import check_machine, choose_machine

from ..flavorjobs import declare


@pytest.mark.parametrize(("resources", "machine", "accelerator", "count"), [
    (ResourceSettings(cpu_count=2), "e2-highmem-2", None, 0),
    (ResourceSettings(cpu_count=8, memory="32GB"), "e2-standard-8", None, 0),
    (ResourceSettings(cpu_count=8, memory="60GB"), "e2-highmem-8", None, 0),
    (ResourceSettings(gpu_count=1), "n1-highmem-2", "NVIDIA_TESLA_T4", 1),
    (ResourceSettings(gpu_type="T4", cpu_count=8), "n1-standard-8", "NVIDIA_TESLA_T4", 1),
    (ResourceSettings(gpu_type="A100"), "a2-highgpu-1g", "NVIDIA_TESLA_A100", 1),
    (ResourceSettings(gpu_type="A100-80GB", gpu_count=2), "a2-ultragpu-2g", "NVIDIA_A100_80GB", 2),
    (ResourceSettings(gpu_type="L4", memory="16GB"), "g2-standard-4", "NVIDIA_L4", 1),
    (ResourceSettings(gpu_type="L4", gpu_count=2), "g2-standard-24", "NVIDIA_L4", 2),
    (ResourceSettings(gpu_type="V100", gpu_count=2, cpu_count=20), "n1-standard-32", None, None),
    (ResourceSettings(gpu_type="H100", gpu_count=8), "a3-highgpu-8g", "NVIDIA_H100_80GB", 8),
])
def test_cheapest_machine_that_fits(resources, machine, accelerator, count):
    if accelerator is None and count is None:  # 20 vCPUs is more than 2 V100s allow on N1
        with pytest.raises(ValueError, match=r"no Vertex AI machine type fits; nearest: n1-highcpu-16 \(16 vCPU, "
                                             r"14.4 GB, 2 x NVIDIA_TESLA_V100"):
            choose_machine(resources)
        return
    choice = choose_machine(resources)
    assert (choice.machine_type, choice.accelerator_type, choice.accelerator_count) == (machine, accelerator, count)


@pytest.mark.parametrize(("resources", "message"), [
    (ResourceSettings(gpu_type="V100", gpu_count=3), r"gpu_count=3: Vertex AI offers NVIDIA_TESLA_V100 in counts of "
                                                       r"1, 2, 4, 8"),
    (ResourceSettings(gpu_type="A10"), r"gpu_type: A10 is not offered by Vertex AI"),
    (ResourceSettings(cpu_count=500), r"no Vertex AI machine type fits; nearest: n1-highcpu-96 .*set machine_type"),
])
def test_impossible_resources_list_what_exists(resources, message):
    with pytest.raises(ValueError, match=message):
        choose_machine(resources)


@pytest.mark.parametrize(("machine", "accelerator", "count", "message"), [
    ("n1-highmem-8", "NVIDIA_TESLA_A100", 1, r"NVIDIA_TESLA_A100 cannot be attached to n1-highmem-8; machine types "
                                            r"for NVIDIA_TESLA_A100: a2-highgpu-1g"),
    ("g2-standard-8", "NVIDIA_TESLA_T4", 1, r"g2-standard-8 comes with 1 x NVIDIA_L4; machine types for "
                                           r"NVIDIA_TESLA_T4: n1-standard-4"),
    ("n1-standard-4", "NVIDIA_TESLA_T4", 3, r"accelerator_count=3 is not allowed for NVIDIA_TESLA_T4 on "
                                           r"n1-standard-4; allowed: 1, 2, 4"),
    ("n1-standard-32", "NVIDIA_TESLA_V100", 1, r"allowed: 4, 8; n1-standard-32 has too many vCPUs"),
    ("a2-highgpu-1g", "NVIDIA_TESLA_A100", 2, r"accelerator_count=2 is not allowed .* allowed: 1$"),
    ("e2-standard-4", "NVIDIA_L4", 1, r"NVIDIA_L4 cannot be attached to e2-standard-4; machine types for NVIDIA_L4: "
                                      r"g2-standard-4"),
    ("n1-standard-5", None, None, r"unknown Vertex AI machine type 'n1-standard-5'; n1 types: n1-standard-4"),
    ("N1_STANDARD_4", None, None, r"is not a Compute Engine machine type name"),
    ("n1-standard-4", None, 2, r"accelerator_count=2 without accelerator_type"),
])
def test_bad_combinations(machine, accelerator, count, message):
    with pytest.raises(ValueError, match=message):
        check_machine(machine, accelerator, count)


def test_fixed_gpu_machine_implies_its_accelerator():
    choice = check_machine("a2-highgpu-4g", None, None)
    assert (choice.accelerator_type, choice.accelerator_count) == ("NVIDIA_TESLA_A100", 4)
    assert check_machine("ct5lp-hightpu-4t", "TPU_V5_LITEPOD", 4).machine_type == "ct5lp-hightpu-4t"  # not in table


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"settings": {"step_operator.vertex": {"accelerator_type": "NVIDIA_TESLA_K80"}}}, r"K80 GPUs are retired"),
    ({"settings": {"step_operator.vertex": {"accelerator_type": "TPU_V9"}}},
     r"accelerator_type: 'TPU_V9' is not a Vertex AI accelerator; allowed: .*NVIDIA_L4"),
    ({"settings": {"step_operator.vertex": {"accelerator_type": "TPU_V5_LITEPOD"}}},
     r"machine_type: required with accelerator_type=TPU_V5_LITEPOD; use machine_type='ct5lp-hightpu-1t' or "
     r"'ct5lp-hightpu-4t' or 'ct5lp-hightpu-8t'"),
    ({"settings": {"step_operator.vertex": {"accelerator_type": "TPU_V3", "accelerator_count": 8}}},
     r"machine_type: required with accelerator_type=TPU_V3; use machine_type='cloud-tpu' with accelerator_count=8"),
    ({"settings": {"step_operator.vertex": {"accelerator_type": "TPU_V4_POD"}}}, r"'ct4p-hightpu-4t'"),
    ({"settings": {"step_operator.vertex": {"accelerator_type": "NVIDIA_H100_MEGA_80GB"}}},
     r"use machine_type='a3-megagpu-8g'"),
    ({"settings": {"step_operator.vertex": {"machine_type": "n1-standard-8", "accelerator_type": "TPU_V2"}}},
     r"cannot be attached to n1-standard-8; machine types for TPU_V2: cloud-tpu"),
    ({"settings": {"step_operator.vertex": {"machine_type": "n1-highmem-8", "accelerator_type": "A100",
                                            "accelerator_count": 1}}}, r"cannot be attached to n1-highmem-8"),
    ({"settings": {"step_operator.vertex": {"machine_type": "n1-standard-8", "accelerator_type": "V100",
                                            "accelerator_count": 3}}}, r"allowed: 1, 2, 4"),
    ({"settings": {"step_operator.vertex": {"disk_size_gb": 50}}}, r"disk_size_gb: Input should be greater than or "
                                                                    r"equal to 100"),
    ({"settings": {"step_operator.vertex": {"max_runtime_in_seconds": 8 * 86400}}}, r"max_runtime_in_seconds"),
    ({"settings": {"step_operator.vertex": {"labels": {"Team": "ml"}}}}, r"'Team' is not a valid label key"),
    ({"settings": {"step_operator.vertex": {"labels": {"stepops-step": "x"}}}}, r"are the step operator's own"),
    ({"settings": {"step_operator.vertex": {"boot_disk_type": "ssd"}}}, r"boot_disk_type"),
    ({"settings": {"step_operator.vertex": {"environment": {"STEPOPS_X": "1"}}}}, r"reserved for the runtime"),
    ({"settings": {"step_operator.vertex": {"environment": {"MY.VAR": "1"}}}}, r"Vertex AI takes C identifiers"),
    ({"settings": {"step_operator.vertex": {"labels": {"k" * 64: "v"}}}}, r"is not a valid label key"),
    ({"settings": {"step_operator.vertex": {"labels": {"k": "V"}}}}, r"'V' is not a valid label value"),
    ({"settings": {"step_operator.vertex": {"labels": {"_k": "v"}}}}, r"'_k' is not a valid label key"),
    ({"resources": {"gpu_type": "L4", "gpu_count": 3}, "settings": {"step_operator.vertex": {}}}, r"gpu_count=3: Vertex AI offers NVIDIA_L4 in counts of 1, 2, "
                                                        r"4, 8"),
    ({"resources": {"cpu_count": 16}, "settings": {"step_operator.vertex": {"machine_type": "n1-standard-8"}}},
     r"n1-standard-8 \(8 vCPU, 30 GB\) does not have the resources"),
    ({"resources": {"gpu_type": "T4"}, "settings": {"step_operator.vertex": {"accelerator_type": "L4"}}},
     r"accelerator_type=NVIDIA_L4 and resources.gpu_type=T4 disagree"),
])
def test_bad_settings_fail_at_parse_time(kwargs, message):
    with pytest.raises((StepOperatorConfigError, ValidationError, ValueError), match=message):
        declare("vertex", **kwargs)


def test_labels_follow_googles_rules():
    """International characters are allowed in label keys and values; the body's labels (the connection's,
    the step's and the identity's together) stay within 64."""
    from airflow_stepops.bundle import StepIdentity
    from airflow_stepops.hooks.base import StepSpec
    from airflow_stepops.hooks.vertex import VertexStepOperatorHook

    assert VertexStepOperatorSettings(labels={"équipe": "données", "チーム": "ml", "v": ""}).labels["équipe"]
    spec = StepSpec(identity=StepIdentity("d", "r", "t", -1, 1), bundle_uri="gs://bkt/p/x/bundle",
                    output_uri="gs://bkt/p/x/output", resources=ResourceSettings(),
                    settings=VertexStepOperatorSettings(labels={"a": "1", "b": "2"}))

    def hook(user_labels: int) -> VertexStepOperatorHook:
        return VertexStepOperatorHook("v", config=VertexStepOperatorConfig(
            location="us-central1", project="stepops-tests", image="img", artifact_store="gs://bkt/p",
            labels={f"l{i}": "x" for i in range(user_labels)}))

    ours = len(hook(0).render(spec)["labels"])  # the step's and the identity's
    assert len(hook(64 - ours).render(spec)["labels"]) == 64
    with pytest.raises(StepOperatorConfigError, match="labels: at most 64 labels, got 65"):
        hook(65 - ours).render(spec)


def test_zenml_examples_parse():
    settings = VertexStepOperatorSettings(machine_type="n1-standard-8", accelerator_type="NVIDIA_TESLA_V100",
                                          accelerator_count=2)
    assert settings.machine_for(ResourceSettings()).describe() == "n1-standard-8 (8 vCPU, 30 GB, 2 x NVIDIA_TESLA_V100)"
    declare("vertex", settings={"step_operator.vertex": {"machine_type": "a2-highgpu-1g", "disk_size_gb": 200,
                                                          "use_preemptible": True}})
    assert VertexStepOperatorSettings(use_preemptible=True).spot
    # an accelerator without a machine type: the smallest machine for it
    assert VertexStepOperatorSettings(accelerator_type="L4", accelerator_count=2).machine_for(
        ResourceSettings()).machine_type == "g2-standard-24"


@pytest.mark.parametrize(("extra", "message"), [
    ({}, r"location\s*Field required"),
    ({"location": "US Central"}, r"location: 'US Central' is not a Vertex AI region"),
    ({"location": "us-central1", "project": "My_Project"}, r"project: 'My_Project' is not a GCP project id"),
    ({"location": "us-central1", "artifact_store": "s3://b/p"}, r"expected gs://bucket/prefix"),
    ({"location": "us-central1", "reserved_ip_ranges": ["r1"]}, r"reserved_ip_ranges: only used with network"),
    ({"location": "us-central1", "service_account": "trainer"}, r"not a service account email"),
    ({"location": "us-central1", "encryption_spec_key_name": "key"}, r"not a Cloud KMS key name"),
    ({"location": "us-central1", "accelerator_type": "TPU_V2"}, r"machine_type: required with accelerator_type=TPU_V2"),
    ({"location": "us-central1", "machine_type": "a2-highgpu-1g", "accelerator_type": "T4"},
     r"a2-highgpu-1g comes with 1 x NVIDIA_TESLA_A100"),
])
def test_bad_connection_extras(extra, message):
    with pytest.raises(ValidationError, match=message):
        VertexStepOperatorConfig(**extra)


def test_settings_are_checked_in_the_hook_too():
    """A step operator whose default machine does not fit the step is not used for it."""
    from airflow_stepops.bundle import StepIdentity
    from airflow_stepops.hooks.base import StepSpec
    from airflow_stepops.hooks.vertex import VertexStepOperatorHook

    hook = VertexStepOperatorHook("v", config=VertexStepOperatorConfig(
        location="us-central1", project="stepops-tests", machine_type="n1-standard-4", image="img",
        artifact_store="gs://bkt/p"))
    spec = StepSpec(identity=StepIdentity("d", "r", "t", -1, 1), bundle_uri="gs://bkt/p/x/bundle",
                    output_uri="gs://bkt/p/x/output", resources=ResourceSettings(gpu_type="L4"),
                    settings=VertexStepOperatorSettings())
    assert hook.machine(spec).machine_type == "g2-standard-4"
    spec_cpu = StepSpec(identity=spec.identity, bundle_uri=spec.bundle_uri, output_uri=spec.output_uri,
                        resources=ResourceSettings(), settings=VertexStepOperatorSettings())
    assert hook.machine(spec_cpu).machine_type == "n1-standard-4"
    bare = VertexStepOperatorHook("v", config=VertexStepOperatorConfig(location="us-central1", project="p-1234",
                                                                       artifact_store="gs://bkt/p"))  # no image
    container = bare.render(spec)["jobSpec"]["workerPoolSpecs"][0]["containerSpec"]
    assert container["imageUri"] == f"python:{sys.version_info[0]}.{sys.version_info[1]}-slim"
