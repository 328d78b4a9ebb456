"""Modal settings: what Modal would refuse when the function is created is refused at parse time."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from airflow_stepops.exceptions import StepOperatorConfigError
from airflow_stepops.resources import ResourceSettings
from airflow_stepops.runtime.protocol import Env
from airflow_stepops.settings.modal import ModalStepOperatorConfig, ModalStepOperatorSettings

from ..flavorjobs import declare


def _operator(**kwargs):
    from airflow.sdk import DAG

    from airflow_stepops.operators.modal import ModalStepOperator

    with DAG("modal_operator_checks", schedule=None):
        return ModalStepOperator(task_id="step", python_callable=lambda: None, **kwargs)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"gpu": "B300"}, r"gpu: unknown Modal GPU type 'B300'; allowed: T4, L4, A10, .*H100, .*any"),
    ({"gpu": "V100"}, r"unknown Modal GPU type 'V100'"),
    ({"gpu": "H100:9"}, r"gpu: 'H100:9': Modal gives a container at most 8 H100 GPUs"),
    ({"gpu": "A10:5"}, r"at most 4 A10 GPUs"),
    ({"gpu": "any:8"}, r"at most 4 ANY GPUs"),
    ({"gpu": "T4:0"}, r"the GPU count after ':' must be a whole number >= 1"),
    ({"gpu": "T4:two"}, r"the GPU count after ':' must be a whole number"),
    ({"gpu": []}, r"gpu: an empty list"),
    ({"gpu": ["H100", "B300"]}, r"gpu\[1\]: unknown Modal GPU type 'B300'"),
    ({"gpu": ["H100", "h100:2"]}, r"names a GPU type twice"),
    ({"memory": 64}, r"memory: 64 MiB; Modal reserves 128 MiB \(its minimum\) to 344064 MiB"),
    ({"memory": 400_000}, r"memory: 400000 MiB"),
    ({"memory": "16GB"}, r"memory: Modal's memory is a number of MiB, not a size string; '16GB' is 15259 MiB: use "
     r"memory=15259, or ResourceSettings\(memory='16GB'\)"),
    ({"memory": "16GiB"}, r"'16GiB' is 16384 MiB: use memory=16384"),
    ({"memory": "lots"}, r"memory: Modal's memory is a whole number of MiB, got 'lots'"),
    ({"ephemeral_disk": "100GiB"}, r"'100GiB' is 102400 MiB: use ephemeral_disk=102400, or "
     r"ResourceSettings\(disk_size='100GiB'\)"),
    ({"cpu": 0.1}, r"cpu\s+Input should be greater than or equal to 0.125"),
    ({"cpu": 96}, r"cpu\s+Input should be less than or equal to 64"),
    ({"timeout": 90_000}, r"timeout: 90000 s; a Modal function's timeout is 1 s to 86400 s \(24 h\)"),
    ({"timeout": 0}, r"timeout: 0 s"),
    ({"max_runtime_in_seconds": 100_000}, r"max_runtime_in_seconds: 100000 is over Modal's longest"),
    ({"timeout": 60, "max_runtime_in_seconds": 120}, r"they are the same limit; give one"),
    ({"cloud": "azure"}, r"cloud\s+Input should be 'aws', 'gcp', 'oci' or 'auto'"),
    ({"region": "US East"}, r"region: 'US East' is not a Modal region"),
    ({"environment": {"STEPOPS_X": "1"}}, r"reserved for the runtime"),
    ({"gpus": "T4"}, r"gpus\s+unknown field; did you mean 'gpu'\? allowed: "),
    ({"ephemeral_disk": 4 * 2**20}, r"ephemeral_disk\s+Input should be less than or equal to 3145728"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        ModalStepOperatorSettings(**kwargs)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"settings": {"step_operator.modal": {"gpu": "B300"}}}, r"settings\['step_operator.modal'\].gpu: .*unknown "
                                                             r"Modal GPU type 'B300'"),
    ({"settings": {"step_operator.modal": {"gpu": "H100:16"}}}, r"at most 8 H100 GPUs"),
    ({"settings": {"step_operator.modal": {"memory": 100}}}, r"memory: 100 MiB; Modal reserves 128 MiB"),
    ({"settings": {"step_operator.modal": {"timeout": 2 * 86400}}}, r"timeout: 172800 s"),
    ({"resources": {"gpu_type": "V100"}, "settings": {"step_operator.modal": {}}},
     r"resources.gpu_type: Modal has no V100 GPUs; Modal offers A10, A100, A100-80GB, B200, H100"),
    ({"resources": {"gpu_type": "H100", "gpu_count": 9}, "settings": {"step_operator.modal": {}}},
     r"^resources.gpu_count: Modal gives a container at most 8 H100 GPUs, got 9"),
    ({"resources": {"gpu_type": "A10G", "gpu_count": 5}, "settings": {"step_operator.modal": {}}},
     r"^resources.gpu_count: Modal gives a container at most 4 A10G GPUs, got 5"),
    ({"resources": {"gpu_count": 6}, "settings": {"step_operator.modal": {}}},
     r"resources.gpu_count: 6 GPUs without a gpu_type become Modal's gpu=\"any:6\"; \"any\" promises at most 4"),
    ({"resources": {"disk_size": "4TiB"}, "settings": {"step_operator.modal": {}}},
     r"resources.disk_size: Modal gives a container at most 3 TiB"),
    ({"resources": {"memory": "64MiB"}, "settings": {"step_operator.modal": {}}},
     r"resources.memory: Modal reserves 128 MiB to 344064 MiB, got 64MiB"),
    ({"resources": {"gpu_count": 2}, "settings": {"step_operator.modal": {"gpu": "T4"}}},
     r"gpu: 'T4' and ResourceSettings\(gpu_count=2, gpu_type=None\) ask for different GPUs"),
])
def test_bad_input_fails_when_the_dag_is_parsed(kwargs, message):
    with pytest.raises(StepOperatorConfigError, match=message):
        declare("modal", **kwargs)


def test_the_modal_operator_checks_resources_without_modal_settings():
    """The flavor is known from the class, so ResourceSettings are checked against Modal at parse time."""
    with pytest.raises(StepOperatorConfigError, match=r"resources: modal step operators cannot honour them: "
                                                      r"resources.gpu_type: Modal has no P100 GPUs"):
        _operator(resources=ResourceSettings(gpu_type="P100"))
    _operator(resources=ResourceSettings(gpu_type="H100", gpu_count=8))


@pytest.mark.parametrize(("resources", "settings", "expected"), [
    (ResourceSettings(gpu_type="H100", gpu_count=2), {}, {"gpu": "H100:2"}),
    (ResourceSettings(gpu_type="A100-80GB"), {}, {"gpu": "A100-80GB"}),
    (ResourceSettings(gpu_type="NVIDIA_L4"), {}, {"gpu": "L4"}),
    (ResourceSettings(gpu_type="A10G", gpu_count=4), {}, {"gpu": "A10:4"}),
    (ResourceSettings(gpu_count=2), {}, {"gpu": "any:2"}),
    (ResourceSettings(gpu_count=1), {}, {"gpu": "any"}),
    (ResourceSettings(gpu_count=0), {}, {"gpu": None}),
    (ResourceSettings(cpu_count=8, memory="32GB"), {}, {"cpu": 8.0, "memory": 30518}),
    (ResourceSettings(memory="16GiB", disk_size="100GiB"), {}, {"memory": 16384, "ephemeral_disk": 102400}),
    (ResourceSettings(cpu_count=8, memory="32GB"), {"cpu": 2.5, "memory": 4096}, {"cpu": 2.5, "memory": 4096}),
    (ResourceSettings(gpu_type="H100"), {"gpu": ["h100", "a100-80gb"]}, {"gpu": ["H100", "A100-80GB"]}),
    (ResourceSettings(), {"gpu": "any", "cpu": 4.0, "memory": 16384}, {"gpu": "any", "cpu": 4.0, "memory": 16384}),
])
def test_resources_map_onto_function_options(resources, settings, expected):
    options = ModalStepOperatorSettings(**settings).function_resources(resources)
    assert {key: options[key] for key in expected} == expected


def test_zenml_example_parses():
    settings = ModalStepOperatorSettings(gpu="any", cpu=4.0, memory=16384)
    assert (settings.gpu, settings.cpu, settings.memory) == ("any", 4.0, 16384)
    declare("modal", settings={"step_operator.modal": settings})
    assert ModalStepOperatorSettings(max_runtime_in_seconds=600).effective_timeout == 600
    assert ModalStepOperatorSettings(gpu="h100!:2").gpu == "H100!:2"


@pytest.mark.parametrize(("extra", "message"), [
    ({"app_name": "my app"}, r"app_name: 'my app' is not a Modal app name prefix"),
    ({"python_version": "3"}, r"python_version: expected MAJOR.MINOR"),
    ({"secrets": ["hf token"]}, r"secrets: 'hf token' is not a Modal secret name"),
    ({"volumes": {"data": "datasets"}}, r"volumes: 'data' is not a mount path Modal allows"),
    ({"volumes": {"/root": "datasets"}}, r"not a mount path Modal allows"),
    ({"region": ["us-east", "Mars"]}, r"region: 'Mars' is not a Modal region"),
    ({"cloud": "azure"}, r"cloud"),
    ({"environment_variables": {"STEPOPS_FLAVOR": "x"}}, r"reserved for the runtime"),
    ({"environment": {"A": "1"}}, r"environment\s+Input should be a valid string"),
    ({"token_secret": "as-123"}, r"token_secret\s+unknown field; allowed: "),
])
def test_bad_connection_extras(extra, message):
    with pytest.raises(ValidationError, match=message):
        ModalStepOperatorConfig(**extra)


def test_render_prints_the_function_options():
    """``stepops render``'s content: the deployed function's options and its app, without a network."""
    from airflow_stepops.bundle import StepIdentity
    from airflow_stepops.hooks.base import StepSpec
    from airflow_stepops.hooks.modal import ModalStepOperatorHook

    config = ModalStepOperatorConfig(app_name="ml", secrets=["hf-token"], volumes={"/data": "datasets"},
                                     region="us-east", environment="main", pip_packages=["torch==2.5.0"],
                                     environment_variables={"TEAM": "ml"})
    hook = ModalStepOperatorHook("m", config=config)
    spec = StepSpec(identity=StepIdentity("d", "r", "t", -1, 1), bundle_uri="file:///tmp/b", output_uri="file:///o",
                    resources=ResourceSettings(gpu_type="H100", gpu_count=2, memory="64GiB"),
                    settings=ModalStepOperatorSettings(cpu=8, timeout=7200, environment={"SEED": "1"}))
    body = hook.render(spec)
    assert body["app_name"].startswith("ml-") and len(body["app_name"]) == len("ml-") + 12
    assert body["function"] == "run_step" and body["environment"] == "main"
    options = body["options"]
    assert options["gpu"] == "H100:2" and options["cpu"] == 8.0 and options["memory"] == 65536
    assert options["timeout"] == 7200 and options["region"] == "us-east" and options["retries"] == 0
    assert options["secrets"] == ["hf-token"] and options["volumes"] == {"/data": "datasets"}
    import cloudpickle

    assert options["image"]["pip_install"] == ["torch==2.5.0", f"cloudpickle=={cloudpickle.__version__}"]
    assert options["single_use_containers"] is True  # no warm GPU container left billing after the step
    env = body["call"]["args"][1]
    assert env["TEAM"] == "ml" and env["SEED"] == "1" and env[Env.FLAVOR] == "modal"
    # other options, other app; same options, same app (the deployment is shared)
    same = hook.render(spec)
    assert same["app_name"] == body["app_name"]
    other = hook.render(StepSpec(identity=spec.identity, bundle_uri=spec.bundle_uri, output_uri=spec.output_uri,
                                 resources=ResourceSettings(gpu_type="T4"), settings=ModalStepOperatorSettings()))
    assert other["app_name"] != body["app_name"] and other["options"]["timeout"] == 86400
    # without a timeout of its own, the step's execution_timeout bounds the call (rounded up: few apps)
    bounded = hook.render(StepSpec(identity=spec.identity, bundle_uri=spec.bundle_uri, output_uri=spec.output_uri,
                                   resources=ResourceSettings(), settings=ModalStepOperatorSettings(),
                                   timeout_seconds=2400))
    assert bounded["options"]["timeout"] == 3600
