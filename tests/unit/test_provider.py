"""Provider metadata, the import budget of DAG files, and the stepops command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from airflow_stepops import get_provider_info
from airflow_stepops._provider_info_gen import TARGET, render
from airflow_stepops.flavors import BUILTIN_FLAVORS


def test_committed_provider_info_is_the_generators_output():
    assert TARGET.read_text() == render(), "regenerate it: python -m airflow_stepops._provider_info_gen"


def test_provider_info_imports_neither_pydantic_nor_airflow():
    code = ("import sys; from airflow_stepops import get_provider_info; get_provider_info(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'pydantic', 'airflow'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_airflow_providers_manager_sees_each_flavor_with_its_hook_and_form():
    """What Airflow reads: the connection types and form fields from provider info, and the hook class's
    conn_type / conn_name_attr / hook_name when it imports the hook (a missing one drops the type)."""
    from airflow.providers_manager import ProvidersManager
    from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

    manager = ProvidersManager()
    ui = {m.connection_type: m for m in manager.iter_connection_type_hook_ui_metadata()}
    widgets = manager._connection_form_widgets_from_metadata  # what the connection form shows
    for flavor in BUILTIN_FLAVORS:
        hook = ProvidersManagerTaskRuntime().hooks[flavor.conn_type]
        assert hook is not None and (hook.hook_class_name, hook.connection_id_attribute_name, hook.hook_name) == (
            flavor.hook_class, "step_operator_conn_id", flavor.hook_name), flavor.name
        assert ui[flavor.conn_type].field_behaviour["hidden_fields"][-1] == "extra"
        prefix = f"extra__{flavor.conn_type}__"
        fields = {key[len(prefix):] for key in widgets if key.startswith(prefix)}
        assert fields == set(flavor.config_model().model_fields), flavor.name


def test_every_dotted_path_in_provider_info_imports():
    from importlib import import_module

    info = get_provider_info()
    paths = [c["hook-class-name"] for c in info["connection-types"]]
    paths += [d["class-name"] for d in info["task-decorators"]] + info["extra-links"]
    for path in paths:
        module, _, name = path.rpartition(".")
        assert hasattr(import_module(module), name), path
    for group in ("hooks", "operators", "triggers"):
        for item in info[group]:
            for module in item["python-modules"]:
                import_module(module)


def test_declaring_step_tasks_imports_no_cloud_sdk():
    code = """
import sys
from airflow.sdk import dag, task
import airflow_stepops
from airflow_stepops import ResourceSettings
from airflow_stepops.settings import LocalStepOperatorSettings

@dag(schedule=None)
def d():
    @task.step_operator(step_operator="x", settings={"resources": ResourceSettings(gpu_count=1),
                        "step_operator.local": LocalStepOperatorSettings()})
    def s(): return 1
    s()
d()
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"boto3", "botocore", "aiobotocore", "kubernetes",
        "kubernetes_asyncio", "modal", "azure", "sagemaker"} or m.startswith(("google.cloud.", "google.api_core")))
print(heavy)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.usefixtures("airflow_db")
def test_airflow_providers_list_shows_the_provider():
    out = subprocess.run([sys.executable, "-m", "airflow", "providers", "list", "--output", "json"],
                         capture_output=True, text=True, check=True, timeout=180)
    providers = {p["package_name"]: p for p in json.loads(out.stdout[out.stdout.index("["):])}
    assert "airflow-stepops" in providers


@pytest.mark.usefixtures("airflow_db")
def test_stepops_cli_list_describe_render(tmp_path):
    env = {**os.environ, "AIRFLOW_CONN_GPU_BOX": json.dumps(
        {"conn_type": "stepops_local", "extra": {"jobs_dir": str(tmp_path / "jobs")}})}
    run = lambda *args: subprocess.run([sys.executable, "-m", "airflow_stepops.cli", *args], capture_output=True,  # noqa: E731
                                       text=True, env=env, timeout=180)
    listed = run("list")
    assert listed.returncode == 0
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert "local" in rows["gpu_box"] and "none (runs on the worker host)" in rows["gpu_box"]

    described = json.loads(run("describe", "gpu_box").stdout)
    assert described["flavor"] == "local" and described["jobs_dir"] == str(tmp_path / "jobs")

    missing = run("describe", "gpu_bx")
    assert missing.returncode == 2 and "registered step operators: " in missing.stderr and "gpu_box (local)" in missing.stderr

    rendered = run("render", "step_features", "stats")
    assert rendered.returncode == 0, rendered.stderr
    body = json.loads(rendered.stdout[rendered.stdout.index("{"):])
    assert body["flavor"] == "local" and body["step_operator"] == "local_step_operator"
    assert body["request"]["argv"][-1].endswith("/step_features/render/stats/-1/try-1/output")
    assert body["arguments"]["op_args"][0].startswith("<resolved at run time")
    assert not os.path.exists(body["request"]["job_dir"]), "render must not start anything"

    not_a_step = run("render", "step_features", "numbers")
    assert not_a_step.returncode == 2 and "not a step task" in not_a_step.stderr


@pytest.mark.usefixtures("airflow_db")
def test_stepops_render_of_mapped_step_tasks():
    for dag_id, task_id, index, expected in [("local_training", "fit", 2, {"op_args": [0.5], "op_kwargs": {}}),
                                              ("step_features", "square", 0, None)]:
        out = subprocess.run([sys.executable, "-m", "airflow_stepops.cli", "render", dag_id, task_id,
                              "--map-index", str(index)], capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr
        body = json.loads(out.stdout[out.stdout.index("{"):])
        assert body["output_uri"].endswith(f"/{task_id}/{index}/try-1/output")
        if expected:
            assert body["arguments"] == expected
        else:
            assert body["arguments"]["op_kwargs"]["x"].startswith("<mapped at run time")
