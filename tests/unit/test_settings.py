from __future__ import annotations

import threading
from typing import ClassVar

import pytest

from airflow_stepops import ResourceSettings, StepOperatorConfigError
from airflow_stepops.flavors import FLAVORS, Flavor
from airflow_stepops.settings.base import BaseStepOperatorSettings
from airflow_stepops.settings.local import LocalStepOperatorSettings
from airflow_stepops.settings.step import parse_step_settings


def test_zenml_style_dict_and_models():
    parsed = parse_step_settings(
        {"resources": ResourceSettings(cpu_count=2), "step_operator.local": LocalStepOperatorSettings(nice=5)}
    )
    assert parsed.resources.cpu_count == 2
    assert list(parsed.by_flavor) == ["local"]
    assert parsed.for_flavor("local").nice == 5


def test_dicts_are_validated_into_models():
    parsed = parse_step_settings({"resources": {"memory": "2GB"}, "step_operator.local": {"max_runtime_in_seconds": 5}})
    assert parsed.resources.memory_bytes == 2 * 10**9
    assert parsed.for_flavor("local").max_runtime_in_seconds == 5


def test_resources_shorthand():
    assert parse_step_settings(None, {"cpu_count": 3}).resources.cpu_count == 3


def test_resources_given_twice_is_an_error():
    with pytest.raises(StepOperatorConfigError, match="give it once"):
        parse_step_settings({"resources": {"cpu_count": 1}}, {"cpu_count": 2})


def test_unknown_settings_key_lists_allowed_keys():
    with pytest.raises(StepOperatorConfigError, match=r"unknown key 'orchestrator'; allowed keys: 'resources'"):
        parse_step_settings({"orchestrator": {}})


def test_unknown_flavor_key():
    with pytest.raises(StepOperatorConfigError, match=r"unknown flavor in key 'step_operator.nomad'"):
        parse_step_settings({"step_operator.nomad": {}})


def test_unknown_flavor_field_lists_allowed_fields():
    with pytest.raises(StepOperatorConfigError, match=r"settings\['step_operator.local'\].instance_typ: unknown field; allowed: .*max_runtime_in_seconds"):
        parse_step_settings({"step_operator.local": {"instance_typ": "x"}})


def test_bad_memory_in_settings_names_key_and_field():
    with pytest.raises(StepOperatorConfigError, match=r"settings\['resources'\].memory: .*unknown unit"):
        parse_step_settings({"resources": {"memory": "8 bananas"}})


def test_negative_and_fractional_gpu_count():
    with pytest.raises(StepOperatorConfigError, match=r"gpu_count"):
        parse_step_settings({"resources": {"gpu_count": -2}})
    with pytest.raises(StepOperatorConfigError, match=r"gpu_count must be a whole number"):
        parse_step_settings({"resources": {"gpu_count": 0.5}})


class _OtherSettings(BaseStepOperatorSettings):
    flavor: ClassVar[str] = "other"


@pytest.fixture
def other_flavor(monkeypatch):
    """A second flavor, registered the way every real flavor is."""
    local = FLAVORS["local"]
    monkeypatch.setitem(FLAVORS, "other", Flavor(
        "other", "Other", "Other", settings_class=f"{__name__}._OtherSettings", config_class=local.config_class,
        hook_class=local.hook_class, operator_class=local.operator_class, trigger_class=local.trigger_class))


def test_settings_for_another_flavor_than_the_connection(other_flavor):
    parsed = parse_step_settings({"step_operator.other": {}})
    with pytest.raises(StepOperatorConfigError, match=r"'step_operator.other' settings were given, but no step operator "
                                                      r"of the step is of flavor 'other' \(step operators: 'gpu' \(local\)\)"):
        parsed.check_flavors({"gpu": "local"})


def test_settings_for_another_flavor_than_the_operator_class(other_flavor):
    with pytest.raises(StepOperatorConfigError, match="given to a local step operator"):
        parse_step_settings({"step_operator.other": {}}, flavor="local")


def test_settings_for_several_flavors_serve_a_list_of_step_operators(other_flavor):
    parsed = parse_step_settings({"step_operator.other": {}, "step_operator.local": {"nice": 2}})
    assert parsed.for_flavor("local").nice == 2 and set(parsed.by_flavor) == {"other", "local"}
    parsed.check_flavors({"a": "local", "b": "other"})


def test_wrong_settings_class_for_key(other_flavor):
    with pytest.raises(StepOperatorConfigError, match="expected LocalStepOperatorSettings, got _OtherSettings"):
        parse_step_settings({"step_operator.local": _OtherSettings()})


def test_step_operator_key_takes_a_settings_object():
    assert list(parse_step_settings({"step_operator": LocalStepOperatorSettings()}).by_flavor) == ["local"]
    with pytest.raises(StepOperatorConfigError, match=r"step_operator\.<flavor>"):
        parse_step_settings({"step_operator": {"nice": 1}})


# ---- errors raised while the DAG file is parsed --------------------------------------------------

def _declare(**task_kwargs):
    from airflow.sdk import DAG, task

    with DAG("parse_errors", schedule=None):
        @task.step_operator(step_operator="local_step_operator", **task_kwargs)
        def step(x=None):
            return x

        step()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"settings": {"resources": {"memory": "32XB"}}}, r"memory: .*unknown unit 'XB'"),
        ({"resources": {"gpu_count": -1}}, r"resources.gpu_count"),
        ({"resources": {"gpu_count": 1.5}}, r"gpu_count must be a whole number"),
        ({"settings": {"resourcez": {}}}, r"unknown key 'resourcez'"),
        ({"settings": {"step_operator.local": {"nice": 99}}}, r"nice: Input should be less than or equal to 19"),
        ({"poll_interval": 0}, r"poll_interval: must be > 0"),
    ],
)
def test_bad_settings_fail_when_the_dag_is_parsed(kwargs, message):
    with pytest.raises(StepOperatorConfigError, match=message):
        _declare(**kwargs)


def test_unpicklable_literal_argument_fails_at_parse_time():
    from airflow.sdk import DAG, task

    with pytest.raises(StepOperatorConfigError, match=r"op_kwargs\['lock'\] cannot be serialised by cloudpickle"):
        with DAG("parse_errors_pickle", schedule=None):
            @task.step_operator(step_operator="local_step_operator")
            def step(lock):
                return 1

            step(lock=threading.Lock())


def test_context_objects_that_do_not_exist_remotely_are_refused():
    from airflow.sdk import DAG, task

    with pytest.raises(StepOperatorConfigError, match=r"parameter 'ti' of step"):
        with DAG("parse_errors_ctx", schedule=None):
            @task.step_operator(step_operator="local_step_operator")
            def step(ti=None):
                return 1

            step()


def test_missing_step_operator_for_the_generic_decorator():
    from airflow.sdk import DAG, task

    with pytest.raises(StepOperatorConfigError, match="step_operator: required"):
        with DAG("parse_errors_missing", schedule=None):
            @task.step_operator()
            def step():
                return 1

            step()


@pytest.mark.parametrize("model", [getattr(FLAVORS[name], kind)() for name in sorted(FLAVORS)
                                   for kind in ("settings_model", "config_model")], ids=lambda m: m.__name__)
def test_unknown_field_in_class_form_lists_allowed_fields(model):
    """``Settings(foo=1)`` says what ``{"foo": 1}`` says: the field, a close match and every allowed field."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        model(max_runtime_in_second=1)
    line = next(e for e in err.value.errors() if e["loc"] == ("max_runtime_in_second",))
    assert line["msg"].endswith("allowed: " + ", ".join(model.model_fields))
    if "max_runtime_in_seconds" in model.model_fields:
        assert "did you mean 'max_runtime_in_seconds'?" in line["msg"]


def test_parse_time_settings_import_nothing_above_them():
    """Settings are the bottom layer: validating every flavor's settings loads no hook, operator, trigger or
    connection lookup (and so nothing of a backend's SDK)."""
    import subprocess
    import sys

    code = """
import sys
from airflow_stepops.flavors import FLAVORS
from airflow_stepops.settings.step import parse_step_settings
for name in FLAVORS:
    parse_step_settings({"resources": {"cpu_count": 1}, f"step_operator.{name}": {}})
print(sorted(m for m in sys.modules if m.startswith(("airflow_stepops.hooks", "airflow_stepops.operators",
                                                      "airflow_stepops.triggers", "airflow_stepops.connections"))))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]"
