from __future__ import annotations

import pytest
from pydantic import ValidationError

from airflow_stepops import ResourceSettings
from airflow_stepops.resources import normalize_gpu_type, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("32GB", 32 * 10**9),
        ("512MiB", 512 * 2**20),
        ("1.5TB", int(1.5 * 10**12)),
        ("2Gi", 2 * 2**30),
        ("100", 100),
        (" 4 gib ", 4 * 2**30),
        (1024, 1024),
    ],
)
def test_parse_size_accepts_common_spellings(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["32XB", "GB", "-1GB", "0", "1,5GB", "", True])
def test_parse_size_rejects_bad_sizes_naming_the_field(text):
    with pytest.raises(ValueError, match=r"memory: .*(expected|greater than zero|unknown unit)"):
        parse_size(text, field="memory")


def test_resource_settings_fields_and_helpers():
    res = ResourceSettings(cpu_count=8, memory="32GB", gpu_count=1, gpu_type="nvidia_tesla_a100", disk_size="100GiB")
    assert res.memory_bytes == 32 * 10**9
    assert res.get_memory("GB") == 32
    assert res.disk_bytes == 100 * 2**30
    assert res.gpu_type == "A100"
    assert res.effective_gpu_count == 1
    assert ResourceSettings().empty


def test_gpu_type_alone_means_one_gpu():
    assert ResourceSettings(gpu_type="T4").effective_gpu_count == 1


@pytest.mark.parametrize("count", [-1, 1.5, "two", True])
def test_gpu_count_must_be_a_whole_non_negative_number(count):
    with pytest.raises(ValidationError, match="gpu_count"):
        ResourceSettings(gpu_count=count)


def test_whole_float_gpu_count_is_accepted():
    assert ResourceSettings(gpu_count=2.0).gpu_count == 2


def test_bad_memory_string_names_field_and_format():
    with pytest.raises(ValidationError) as info:
        ResourceSettings(memory="lots")
    text = str(info.value)
    assert "memory" in text and "512MiB" in text


def test_unknown_field_rejected():
    with pytest.raises(ValidationError, match="gpus"):
        ResourceSettings(gpus=1)  # type: ignore[call-arg]


def test_unknown_gpu_type_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown GPU type 'RTX9999'; allowed: .*A100.*H100"):
        normalize_gpu_type("RTX9999")


@pytest.mark.parametrize(("alias", "canonical"), [("h100", "H100"), ("NVIDIA_L4", "L4"), ("A100_80GB", "A100-80GB")])
def test_gpu_aliases(alias, canonical):
    assert normalize_gpu_type(alias) == canonical


def test_gpu_type_with_zero_gpus_is_contradictory():
    with pytest.raises(ValidationError, match="gpu_type='T4' with gpu_count=0"):
        ResourceSettings(gpu_type="T4", gpu_count=0)


@pytest.mark.parametrize(("field", "value"), [("memory", 32), ("memory", "32"), ("disk_size", 100), ("disk_size", 1.5)])
def test_a_size_without_unit_is_refused_with_the_fix(field, value):
    # ZenML's sizes carry a unit; a bare number used to mean bytes and the step died without memory
    with pytest.raises(ValidationError, match=rf'{field}=.* has no unit .*e\.g\. {field}="[0-9.]+GB"'):
        ResourceSettings(**{field: value})


def test_a_gpu_count_given_as_a_string_says_how_to_write_it():
    with pytest.raises(ValidationError, match=r"gpu_count must be a whole number .* e\.g\. gpu_count=1"):
        ResourceSettings(gpu_count="1")


@pytest.mark.parametrize("form", ["class", "dict"])
def test_an_unknown_field_lists_the_allowed_ones(form):
    from airflow_stepops.exceptions import StepOperatorConfigError
    from airflow_stepops.settings.step import parse_step_settings

    allowed = r"allowed: cpu_count, memory, gpu_count, gpu_type, disk_size; for 'accelerator_count' use gpu_count"
    if form == "class":
        with pytest.raises(ValidationError, match=rf"unknown field\(s\) 'accelerator_count'.*{allowed}"):
            ResourceSettings(accelerator_count=1)  # type: ignore[call-arg]
    else:
        with pytest.raises(StepOperatorConfigError, match=rf"settings\['resources'\].*'accelerator_count'.*{allowed}"):
            parse_step_settings({"resources": {"accelerator_count": 1}})
