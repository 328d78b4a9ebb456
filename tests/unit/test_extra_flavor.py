"""A flavor from outside the package, declared once and registered, reaches every place that lists flavors:
provider info, the ``stepops`` CLI, step settings, the operator's lifecycle and the conformance suite's list,
with no edit to a shared file. Its classes live here; a package would keep them in its own modules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
from pydantic import Field

from airflow_stepops import StepOperatorConfigError, get_provider_info
from airflow_stepops.flavors import FLAVORS, Flavor, flavor_for_conn_type, register_flavor
from airflow_stepops.hooks.local import LocalStepOperatorHook
from airflow_stepops.operators.base import StepOperator
from airflow_stepops.settings.local import LocalStepOperatorConfig, LocalStepOperatorSettings
from airflow_stepops.triggers.base import StepOperatorTrigger

ROOT = Path(__file__).resolve().parents[2]
TOY = Flavor("toy", "Toy", "Toy runner", **{f"{layer}_class": f"{__name__}.Toy{suffix}" for layer, suffix in (
    ("settings", "Settings"), ("config", "Config"), ("hook", "Hook"), ("operator", "StepOperator"),
    ("trigger", "Trigger"))})


class ToySettings(LocalStepOperatorSettings):
    flavor: ClassVar[str] = "toy"


class ToyConfig(LocalStepOperatorConfig):
    flavor: ClassVar[str] = "toy"

    greeting: str = Field(default="hello", title="Greeting", description="What the toy says first.")


class ToyStepOperator(StepOperator):
    flavor: ClassVar[str | None] = "toy"


with pytest.MonkeyPatch.context() as mp:  # hook and trigger take their identity from the registry when made
    mp.setitem(FLAVORS, "toy", TOY)

    class ToyHook(LocalStepOperatorHook):
        """The local backend under another name."""

        flavor = "toy"

    class ToyTrigger(StepOperatorTrigger):
        flavor = "toy"


@pytest.fixture(autouse=True)
def toy_registered(monkeypatch):
    monkeypatch.setitem(FLAVORS, "toy", TOY)


def test_hook_and_trigger_identity_derive_from_the_flavor():
    assert (ToyHook.conn_type, ToyHook.default_conn_name, ToyHook.hook_name) == (
        "stepops_toy", "stepops_toy_default", "Step operator: Toy runner")
    assert ToyTrigger.hook_class_path == f"{__name__}.ToyHook"
    assert flavor_for_conn_type("stepops_toy") is TOY


def test_register_flavor_refuses_a_second_flavor_of_the_same_name_and_a_bad_name():
    register_flavor(TOY)  # the same declaration again (an entry point read twice) is fine
    assert Flavor("toy", "Toy", "Toy", package="toy_stepops").hook_class == "toy_stepops.hooks.toy.ToyStepOperatorHook"
    with pytest.raises(ValueError, match="'toy' is already registered"):
        register_flavor(Flavor("toy", "Other", "Other toy"))
    with pytest.raises(ValueError, match="lowercase letters"):
        register_flavor(Flavor("Toy-2", "Toy", "Toy"))


def test_provider_info_names_its_connection_type_with_the_extra_visible():
    entry = {c["connection-type"]: c for c in get_provider_info()["connection-types"]}["stepops_toy"]
    assert entry["hook-class-name"] == f"{__name__}.ToyHook" and entry["hook-name"] == "Step operator: Toy runner"
    assert "extra" not in entry["ui-field-behaviour"]["hidden-fields"] and "conn-fields" not in entry


def test_settings_dict_is_validated_at_parse_time():
    from airflow_stepops.settings.step import parse_step_settings

    parsed = parse_step_settings({"step_operator.toy": {"nice": 3}}, None, flavor="toy")
    assert isinstance(parsed.for_flavor("toy"), ToySettings) and parsed.for_flavor("toy").nice == 3
    with pytest.raises(StepOperatorConfigError, match=r"step_operator.toy.*nicee: unknown field; did you mean 'nice'"):
        ToyStepOperator(task_id="t", python_callable=lambda: 1, settings={"step_operator.toy": {"nicee": 3}})
    with pytest.raises(StepOperatorConfigError, match=r"allowed keys: .*step_operator\.toy"):
        parse_step_settings({"step_operator.toi": {}}, None)


def test_stepops_describe_reads_its_connection(monkeypatch, tmp_path):
    from airflow_stepops import _cli_connections as conns
    from airflow_stepops import cli

    registry = conns.Registry({"toy_box": ("stepops_toy", json.dumps({"greeting": "hi", "jobs_dir": str(tmp_path)}))})
    described = cli.describe("toy_box", registry)
    assert described["flavor"] == "toy" and described["config"]["greeting"] == "hi"
    assert described["operator_class"] == f"{__name__}.ToyStepOperator"
    assert registry.step_operators() == {"toy_box": "toy"}


def test_a_step_runs_through_its_operator_hook_and_trigger(monkeypatch, tmp_path):
    import asyncio

    from airflow_stepops.operators.base import _first_event

    from .localjobs import make_spec

    monkeypatch.setenv("AIRFLOW_CONN_TOY_BOX", json.dumps({"conn_type": "stepops_toy", "extra": {
        "greeting": "hi", "jobs_dir": str(tmp_path / "jobs"), "artifact_store": f"file://{tmp_path}/store"}}))
    op = ToyStepOperator(task_id="double", step_operator="toy_box", python_callable=lambda: 1, poll_interval=0.2)
    hook = op.get_hook()
    assert isinstance(hook, ToyHook) and hook.config.greeting == "hi"
    handle = hook.submit(make_spec(hook, lambda: print("ran as toy", flush=True)))
    trigger = op.make_trigger(hook, handle, {})
    assert isinstance(trigger, ToyTrigger)
    event = asyncio.run(_first_event(trigger))
    assert event["status"] == "succeeded" and "ran as toy" in event["log_tail"]


def test_a_package_entry_point_registers_it_in_every_process(tmp_path):
    """As an installed package would: an ``airflow_stepops.flavors`` entry point naming its ``Flavor``, read in
    a fresh process by provider info, ``stepops list`` / ``describe`` and the conformance suite's flavor list;
    a broken entry is named and skipped."""
    dist = tmp_path / "toy_stepops-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-stepops\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[airflow_stepops.flavors]\ntoy = toy_stepops:TOY\n"
                                           "broken = no_such_package:FLAVOR\n")
    # the declaration alone, as a package keeps it: read while airflow_stepops loads, it imports nothing else
    (tmp_path / "toy_stepops.py").write_text(f"from airflow_stepops.flavors import Flavor\n\nTOY = {TOY!r}\n")
    (tmp_path / "home").mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), "AIRFLOW_HOME": str(tmp_path / "home"),
           "AIRFLOW_CONN_TOY_BOX": json.dumps({"conn_type": "stepops_toy", "extra": {"greeting": "hi"}})}
    code = """
import json
from airflow_stepops import cli, get_provider_info
print([c["connection-type"] for c in get_provider_info()["connection-types"]][-1])
cli.main(["list"])
print(json.dumps(cli.describe("toy_box")["config"]))
from tests.e2e.test_conformance import FLAVORS
print(FLAVORS)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "flavor entry point broken = no_such_package:FLAVOR (airflow_stepops.flavors) is ignored" in out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "stepops_toy"
    assert any(line.split()[:2] == ["toy_box", "toy"] for line in lines), out.stdout
    assert any(line.startswith("{") and json.loads(line)["greeting"] == "hi" for line in lines), out.stdout
    assert lines[-1] == str(("local", "kubernetes", "sagemaker", "vertex", "azureml", "modal", "toy"))
