"""Base models for per-step settings and for a registered step operator's configuration."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from airflow_stepops.capacity import CapacityFields
from airflow_stepops.images import check_image
from airflow_stepops.resources import parse_size
from airflow_stepops.runtime.protocol import Env


def format_validation_error(error: ValidationError, where: str) -> str:
    """One line per problem, each naming the field path and what is allowed."""
    lines = []
    for item in error.errors():
        path = ".".join(str(p) for p in item["loc"]) or "(root)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":  # a model that does not name them itself (see _Strict)
            message = f"unknown field; {allowed_fields_hint(error.title, item['loc'][-1])}"
        lines.append(f"{where}.{path}: {message} (got {item.get('input')!r})")
    return "\n".join(lines)


_MODEL_FIELDS: dict[str, list[str]] = {}
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def check_environment(value: dict[str, str]) -> dict[str, str]:
    """Environment variable names every backend accepts; STEPOPS_* is the runtime's own."""
    for name in value:
        if not _ENV_NAME.match(name):
            raise ValueError(f"environment: {name!r} is not a valid variable name (a letter or '_', then "
                             "letters, digits, '_', '.' or '-')")
        if name.upper().startswith(Env.PREFIX):
            raise ValueError(f"environment: {name!r}: names starting with {Env.PREFIX} are reserved for the runtime")
    return value


#: environment variables: a field of this type refuses names no backend takes (see ``check_environment``)
EnvVars = Annotated[dict[str, str], AfterValidator(check_environment)]


def checked_by(check: Callable[[Any, str], Any], field: str) -> Any:
    """A validator of ``field``: ``check(value, field)``, whose errors name the field."""
    return field_validator(field, check_fields=False)(classmethod(lambda cls, value: check(value, field)))


def matches(field: str, pattern: re.Pattern[str], allowed: str) -> Any:
    """A validator of ``field`` (None passes): a value ``pattern`` does not match is refused as
    ``<field>: <value> is not <allowed>``."""
    def check(cls: Any, value: str | None) -> str | None:
        if value is not None and not pattern.match(value):
            raise ValueError(f"{field}: {value!r} is not {allowed}")
        return value
    return field_validator(field, check_fields=False)(classmethod(check))


def allowed_fields_hint(model_name: str, name: object = None) -> str:
    fields = _MODEL_FIELDS.get(model_name)
    if not fields:
        return "see the documentation for allowed fields"
    close = difflib.get_close_matches(str(name), fields, n=1, cutoff=0.8) if name is not None else []
    return (f"did you mean {close[0]!r}? " if close else "") + f"allowed: {', '.join(fields)}"


class _Strict(BaseModel):
    """Frozen, validated defaults, and unknown fields named with the allowed ones, whether the model is
    built as ``Model(foo=1)`` or from a dict."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        _MODEL_FIELDS[cls.__name__] = list(cls.model_fields)

    @model_validator(mode="wrap")
    @classmethod
    def _unknown_fields(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(data)
        except ValidationError as err:
            if not any(e["type"] == "extra_forbidden" and len(e["loc"]) == 1 for e in err.errors()):
                raise
            errors: list[Any] = [
                {"type": PydanticCustomError("unknown_field", "unknown field; {hint}",
                                             {"hint": allowed_fields_hint(cls.__name__, e["loc"][0])}),
                 "loc": e["loc"], "input": e["input"]}
                if e["type"] == "extra_forbidden" and len(e["loc"]) == 1 else e
                for e in err.errors()]
            raise ValidationError.from_exception_data(err.title, errors) from None


class BaseStepOperatorSettings(_Strict, CapacityFields):
    """Per-step settings of one flavor, given as ``settings={"step_operator.<flavor>": ...}``."""

    flavor: ClassVar[str] = ""
    #: whether ``check_resources`` of default settings is meaningful without the connection
    resources_checkable_alone: ClassVar[bool] = False

    max_runtime_in_seconds: int | None = Field(
        default=None, gt=0, description="Hard limit enforced by the backend; the job is stopped after it.")
    environment: EnvVars = Field(default_factory=dict, description="Extra environment variables for the step "
                                 "(no secrets).")

    def check_resources(self, resources: Any) -> None:
        """Refuse ``ResourceSettings`` this flavor cannot honour with these settings (parse time)."""


def _check_requirements(value: list[str] | str | None) -> list[str] | str | None:
    from airflow_stepops.requirements import check_list

    if isinstance(value, str):
        if not value.strip() or "\n" in value:
            raise ValueError(f"requirements: {value!r} is not a file path; give the path of a requirements file "
                             "or a list of requirements")
        return value
    return None if value is None else check_list(value)


class ContainerStepSettings(BaseStepOperatorSettings):
    """Settings of the flavors whose steps run in a container image."""

    requirements: Annotated[list[str] | str | None, AfterValidator(_check_requirements)] = Field(
        default=None, description="Python packages pip installs when the job starts, before the step runs: a list "
        "of requirement specifiers, or the path of a requirements file (relative to the DAG file's folder), "
        "shipped with the step. Kept in the step operator's cache where the backend offers one.")

    _image = checked_by(check_image, "image")  # the flavors with a per-step image


class BaseStepOperatorConfig(_Strict):
    """A registered step operator: the extras of an Airflow connection of type ``stepops_<flavor>``."""

    flavor: ClassVar[str] = ""

    artifact_store: str | None = Field(
        title="Artifact store URI", default=None, description="URI where bundles and results live (s3://, gs://, "
        "abfs://, file://).")
    max_result_size: str = Field(
        title="Max result size", default="10GB", description="Largest result a step may store; bigger results fail "
        "clearly.")
    inline_result_max_size: str = Field(
        title="Max inline (XCom) result size", default="48KB", description="JSON results up to this size go to XCom "
        "directly; larger become ArtifactRefs.")

    prices: dict[str, Any] | str | None = Field(
        title="Prices", default=None, description="Prices for cost estimates, max_cost and the recorded cost, over "
        "the flavor's list prices: {\"currency\": \"USD\", \"discount\": 0.2, \"machines\": {\"<type>\": "
        "{\"on_demand\": 1.2, \"spot\": 0.4}}, \"on_demand\": {\"cpu_hour\": 0.04, \"memory_gib_hour\": 0.005, "
        "\"gpu_hour\": {\"A100\": 2.9}}, \"spot\": {...}}, or the path or URI of a JSON file of that shape.")

    _image = checked_by(check_image, "image")  # the flavors with an image

    @field_validator("prices")
    @classmethod
    def _prices(cls, value: dict[str, Any] | str | None) -> dict[str, Any] | str | None:
        """Checked when the connection is read (``prices.Prices``, imported then: DAG files never need it)."""
        if isinstance(value, str) and not value.strip().lower().endswith(".json"):
            raise ValueError(f"prices: {value!r} is not a JSON file's path or URI; give the prices as an object "
                             "or the path of a .json file")
        if isinstance(value, dict):
            from airflow_stepops.prices import Prices

            try:
                Prices.model_validate(value)
            except ValidationError as err:
                raise ValueError(format_validation_error(err, "prices")) from None
        return value

    @field_validator("max_result_size", "inline_result_max_size")
    @classmethod
    def _size(cls, value: str, info: Any) -> str:
        parse_size(value, field=info.field_name)
        return value

    @property
    def max_result_bytes(self) -> int:
        return parse_size(self.max_result_size, field="max_result_size")

    @property
    def inline_result_max_bytes(self) -> int:
        return parse_size(self.inline_result_max_size, field="inline_result_max_size")

    def credentials_source(self) -> str:
        """Where this step operator's credentials come from, for ``stepops list``."""
        return "none"
