"""A catalogue of mistakes a new user makes, each parsed as Airflow parses a DAG file (DagBag import errors).

Every entry must be refused when the file is parsed, with a message naming the field (or thing) at fault and
what is allowed instead. Entries are DAG-file fragments: the step decorator's arguments and, where the
mistake is in the function, its body.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

#: id -> (decorator arguments, function signature and body, fragments the import error must contain)
CATALOGUE: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # ResourceSettings
    "memory_bare_int": ('resources={"memory": 32}', "", ("memory", '"32GB"')),
    "memory_bare_string": ('resources={"memory": "32"}', "", ("memory", "unit")),
    "memory_bad_unit": ('resources={"memory": "32 gigs"}', "", ("memory",)),
    "disk_bare_int": ('resources={"disk_size": 100}', "", ("disk_size", "unit")),
    "gpu_count_string": ('resources={"gpu_count": "1"}', "", ("gpu_count", "gpu_count=1")),
    "gpu_count_fraction": ('resources={"gpu_count": 0.5}', "", ("gpu_count",)),
    "gpu_count_negative": ('resources={"gpu_count": -1}', "", ("gpu_count",)),
    "cpu_count_negative": ('resources={"cpu_count": -2}', "", ("cpu_count",)),
    "resources_unknown_field": ('resources={"gpus": 1}', "", ("gpus", "gpu_count", "cpu_count", "memory")),
    "resources_zenml_accelerator_count": ('resources={"accelerator_count": 1}', "", ("accelerator_count",
                                                                                     "gpu_count")),
    "gpu_type_unknown": ('resources={"gpu_count": 1, "gpu_type": "Z999"}', "", ("gpu_type",)),
    # the settings dict
    "settings_unknown_key": ('settings={"resource": {"memory": "1GB"}}', "", ("resource", "resources")),
    "settings_unknown_flavor": ('settings={"step_operator.lambda": {}}', "", ("step_operator.lambda",)),
    # flavor settings
    "sagemaker_unknown_field": ('settings={"step_operator.sagemaker": {"instance": "ml.m5.large"}}', "",
                                ("instance", "instance_type")),
    "sagemaker_bad_instance": ('settings={"step_operator.sagemaker": {"instance_type": "m5.large"}}', "",
                               ("instance_type",)),
    "sagemaker_wait_below_runtime": ('settings={"step_operator.sagemaker": {"use_spot_instances": True, '
                                     '"max_runtime_in_seconds": 7200, "max_wait_time_in_seconds": 3600}}', "",
                                     ("max_wait_time_in_seconds", "max_runtime_in_seconds")),
    "sagemaker_volume_negative": ('settings={"step_operator.sagemaker": {"volume_size_in_gb": -5}}', "",
                                  ("volume_size_in_gb",)),
    "sagemaker_tag_tilde": ('settings={"step_operator.sagemaker": {"tags": {"team": "a~b"}}}', "", ("tags",)),
    "vertex_a100_on_n1": ('settings={"step_operator.vertex": {"machine_type": "n1-highmem-8", '
                          '"accelerator_type": "NVIDIA_TESLA_A100", "accelerator_count": 1}}', "",
                          ("NVIDIA_TESLA_A100", "a2-highgpu-1g")),
    "vertex_k80": ('settings={"step_operator.vertex": {"machine_type": "n1-standard-4", '
                   '"accelerator_type": "NVIDIA_TESLA_K80", "accelerator_count": 1}}', "", ("K80",)),
    "vertex_t4_count_3": ('settings={"step_operator.vertex": {"machine_type": "n1-standard-8", '
                          '"accelerator_type": "NVIDIA_TESLA_T4", "accelerator_count": 3}}', "",
                          ("accelerator_count=3", "allowed")),
    "vertex_unknown_machine": ('settings={"step_operator.vertex": {"machine_type": "n1-standard-7"}}', "",
                               ("n1-standard-7", "n1-standard-8")),
    "vertex_tpu_without_machine": ('settings={"step_operator.vertex": {"accelerator_type": "TPU_V5_LITEPOD", '
                                   '"accelerator_count": 4}}', "", ("TPU_V5_LITEPOD", "ct5lp-hightpu")),
    "vertex_bad_label": ('settings={"step_operator.vertex": {"labels": {"Team": "ml"}}}', "", ("labels", "Team")),
    "azureml_bad_tier": ('settings={"step_operator.azureml": {"job_tier": "cheap"}}', "", ("job_tier",)),
    "azureml_unknown_field": ('settings={"step_operator.azureml": {"vm_size": "Standard_NC6"}}', "",
                              ("vm_size", "instance_type")),
    "modal_memory_with_unit": ('settings={"step_operator.modal": {"memory": "16GB"}}', "", ("memory", "MiB")),
    "requirements_file_missing": ('settings={"step_operator.sagemaker": {"requirements": "missing-reqs.txt"}}', "",
                                  ("requirements", "missing-reqs.txt", "does not exist", "DAG file's folder")),
    "requirements_bad_specifier": ('settings={"step_operator.vertex": {"requirements": ["numpy>>1.0"]}}', "",
                                   ("requirements[0]", "numpy>>1.0", "requirement specifier")),
    "requirements_include": ('settings={"step_operator.kubernetes": {"requirements": ["-r other.txt"]}}', "",
                             ("requirements[0]", "-r other.txt", "does not travel")),
    "requirements_local_path": ('settings={"step_operator.azureml": {"requirements": ["./my_pkg"]}}', "",
                                ("requirements[0]", "./my_pkg", "local paths")),
    "requirements_file_includes": ('settings={"step_operator.azureml": {"requirements": "includes.txt"}}', "",
                                   ("includes.txt, line 2", "-c constraints.txt", "does not travel")),
    "kubernetes_image_other_python": ('settings={"step_operator.kubernetes": {"image": "python:3.9-slim"}}', "",
                                      ("image", "Python 3.9", f"Python {sys.version_info[0]}.{sys.version_info[1]}")),
    "preemption_retries_negative": ("preemption_retries=-1", "", ("preemption_retries", "greater than or equal to 0")),
    "on_preemption_unknown": ('on_preemption="spot_forever"', "", ("on_preemption", "on_demand_last")),
    "max_queue_seconds_zero": ("max_queue_seconds=0", "", ("max_queue_seconds", "greater than 0")),
    "settings_preemption_retries_negative": ('settings={"step_operator.vertex": {"preemption_retries": -2}}', "",
                                             ("preemption_retries",)),
    "step_operator_list_empty": ("step_operator=[]", "", ("step_operator", "non-empty list")),
    "step_operator_list_twice": ('step_operator=["a_gpu", "b_gpu", "a_gpu"]', "", ("step_operator", "'a_gpu'",
                                                                                     "twice")),
    "modal_unknown_gpu": ('settings={"step_operator.modal": {"gpu": "Z999"}}', "", ("gpu",)),
    "kubernetes_toleration_exist": ('settings={"step_operator.kubernetes": {"tolerations": [{"key": "gpu", '
                                    '"operator": "Exist", "effect": "NoSchedule"}]}}', "",
                                    ("operator", "Exists")),
    "kubernetes_toleration_effect": ('settings={"step_operator.kubernetes": {"tolerations": [{"key": "gpu", '
                                     '"operator": "Exists", "effect": "NoScheduled"}]}}', "",
                                     ("effect", "NoSchedule")),
    "kubernetes_negative_size_limit": ('settings={"step_operator.kubernetes": {"volumes": [{"name": "scratch", '
                                       '"emptyDir": {"sizeLimit": "-1Gi"}}]}}', "", ("sizeLimit",)),
    "kubernetes_bad_label": ('settings={"step_operator.kubernetes": {"labels": {"team": "ML team"}}}', "",
                             ("labels",)),
    "local_unknown_field": ('settings={"step_operator.local": {"niceness": 5}}', "", ("niceness", "nice")),
    "runtime_negative": ('settings={"step_operator.local": {"max_runtime_in_seconds": -1}}', "",
                         ("max_runtime_in_seconds",)),
    # the step function
    "generator_step": ("", "def f():\n    yield 1", ("generator",)),
    "async_step": ("", "async def f():\n    return 1", ("async def",)),
    "worker_only_parameter": ("", "def f(ti=None):\n    return 1", ("ti",)),
    "context_ti_lookup": ("", 'def f(**context):\n    return context["ti"].try_number', ("context['ti']",)),
    "variable_get": ("", 'def f():\n    from airflow.sdk import Variable\n    return Variable.get("x")',
                     ("Variable.get", "{{ var.value.")),
    "connection_get": ("", 'def f():\n    from airflow.sdk.bases.hook import BaseHook\n'
                           '    return BaseHook.get_connection("db").password', ("get_connection",)),
}


#: id -> (decorator arguments, function, call): correct files near the mistakes above, which must still parse
VALID: dict[str, tuple[str, str, str]] = {
    "sizes_with_units": ('resources={"memory": "1.5GB", "disk_size": "16Gi", "cpu_count": 2, "gpu_count": 0}', "",
                         "f()"),
    "own_kwargs_key_named_like_context": ("", 'def f(**hp):\n    return hp["task"]', 'f(task="classify", lr=0.1)'),
    "own_variable_class": ("", 'def f():\n    return Variable.get("lr")', "f()"),
    "local_named_variable": ("", 'def f(cfg=None):\n    Variable = cfg or {}\n    return Variable.get("lr")', "f()"),
    "dict_get": ("", 'def f(conf=None):\n    return (conf or {}).get("x")', "f()"),
    "portable_context": ("", "def f(ds=None, params=None, **context):\n    return context['run_id']", "f()"),
    "requirements_file_beside_the_dag": ('settings={"step_operator.vertex": {"requirements": "requirements.txt"}}',
                                         "", "f()"),
    "requirements_list": ('settings={"step_operator.sagemaker": {"requirements": ["numpy>=1.26", '
                          '"torch==2.4.*; python_version >= \'3.10\'", "--extra-index-url https://pypi.example/simple"]}}',
                          "", "f()"),
    "failover_list_with_settings_per_flavor": ('step_operator=["sagemaker_gpu", "vertex_gpu"], preemption_retries=2, '
                                               'on_preemption="on_demand", max_queue_seconds=600, settings={'
                                               '"step_operator.sagemaker": {"use_spot_instances": True}, '
                                               '"step_operator.vertex": {"use_spot": True, "preemption_retries": 1}}',
                                               "", "f()"),
    "sagemaker_unicode_tags": ('settings={"step_operator.sagemaker": {"tags": {"équipe": "données ml"}}}', "", "f()"),
}
_OWN_VARIABLE = """

class Variable:
    @classmethod
    def get(cls, key):
        return {"lr": 0.1}[key]
"""


def _dag_file(decorator_args: str, function: str, call: str = "f()") -> str:
    function = function or "def f():\n    return 1"
    own = 'step_operator="local_step_operator"' if "step_operator=" not in decorator_args else ""
    args = ", ".join(a for a in (own, decorator_args) if a)
    return textwrap.dedent("""\
        from airflow.sdk import dag, task
        {own}

        @dag(schedule=None)
        def catalogue():
            @task.step_operator({args})
        {function}

            {call}


        catalogue()
        """).format(args=args, function=textwrap.indent(function, "    "), call=call,
                    own=_OWN_VARIABLE if "Variable.get" in function and "import" not in function and "cfg" not in function else "")


@pytest.fixture(scope="module")
def parsed(tmp_path_factory) -> dict[str, str]:
    """Every entry in a DAG file of its own, parsed in one DagBag: the import error of each file."""
    from airflow.dag_processing.dagbag import DagBag

    folder: Path = tmp_path_factory.mktemp("catalogue")
    (folder / "includes.txt").write_text("numpy\n-c constraints.txt\n")
    for name, (decorator_args, function, _) in CATALOGUE.items():
        (folder / f"{name}.py").write_text(_dag_file(decorator_args, function))
    bag = DagBag(dag_folder=str(folder))
    return {Path(path).stem: str(error) for path, error in bag.import_errors.items()}


@pytest.mark.parametrize("name", CATALOGUE)
def test_a_mistake_is_refused_when_the_dag_file_is_parsed_naming_the_field(parsed, name):
    *_, fragments = CATALOGUE[name]
    assert name in parsed, f"{name}: the DAG file parsed without an error"
    missing = [fragment for fragment in fragments if fragment not in parsed[name]]
    assert not missing, f"{name}: the error does not name {missing}:\n{parsed[name]}"


@pytest.mark.parametrize("name", VALID)
def test_a_correct_file_near_a_mistake_parses_cleanly(tmp_path, name):
    from airflow.dag_processing.dagbag import DagBag

    (tmp_path / f"{name}.py").write_text(_dag_file(*VALID[name]))
    (tmp_path / "requirements.txt").write_text("# what the step needs\nnumpy>=1.26  # arrays\n--prefer-binary\n")
    bag = DagBag(dag_folder=str(tmp_path))
    assert not bag.import_errors, bag.import_errors
    assert list(bag.dags) == ["catalogue"]
