"""Parse the ZenML-style ``settings={...}`` dict of one step into validated models.

Runs when the DAG file is parsed, so every mistake surfaces there with the key or field named.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from airflow_stepops.exceptions import StepOperatorConfigError
from airflow_stepops.flavors import FLAVORS, get_flavor
from airflow_stepops.resources import ResourceSettings
from airflow_stepops.settings.base import BaseStepOperatorSettings, format_validation_error

RESOURCES_KEY = "resources"
FLAVOR_KEY_PREFIX = "step_operator."
_Model = TypeVar("_Model", bound=BaseModel)


def _allowed_keys() -> str:
    keys = [RESOURCES_KEY, "step_operator"] + [FLAVOR_KEY_PREFIX + name for name in sorted(FLAVORS)]
    return ", ".join(repr(k) for k in keys)


@dataclass(frozen=True)
class StepSettings:
    """Validated settings of one step: resources plus the settings of each flavor its step operators may have (a
    step with a list of step operators has one per flavor of the list)."""

    resources: ResourceSettings = field(default_factory=ResourceSettings)
    by_flavor: Mapping[str, BaseStepOperatorSettings] = field(default_factory=dict)

    def for_flavor(self, flavor: str) -> BaseStepOperatorSettings:
        """The flavor's settings (defaults if none were given)."""
        found = self.by_flavor.get(flavor)
        return found if found is not None else get_flavor(flavor).settings_model()()

    def check_flavors(self, flavors: Mapping[str, str]) -> None:
        """Refuse settings of a flavor none of the step operators (``flavors``: id -> flavor) has."""
        unused = sorted(set(self.by_flavor) - set(flavors.values()))
        if unused:
            have = ", ".join(f"{conn!r} ({flavor})" for conn, flavor in flavors.items())
            raise StepOperatorConfigError(
                f"settings: 'step_operator.{unused[0]}' settings were given, but no step operator of the step is of "
                f"flavor {unused[0]!r} (step operators: {have}); use the key of their flavor "
                f"({', '.join(sorted({repr(FLAVOR_KEY_PREFIX + f) for f in flavors.values()}))}) or add a "
                f"{unused[0]} step operator")

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {RESOURCES_KEY: self.resources.model_dump(exclude_none=True)}
        for flavor, settings in self.by_flavor.items():
            data[FLAVOR_KEY_PREFIX + flavor] = settings.model_dump(mode="json")
        return data


def validated(model: type[_Model], data: Mapping[str, Any], where: str) -> _Model:
    """``data`` as ``model``, or one error naming ``where`` and each wrong field."""
    try:
        return model.model_validate(dict(data))
    except ValidationError as err:
        raise StepOperatorConfigError(format_validation_error(err, where)) from None


def validate_resources(value: Any, where: str) -> ResourceSettings:
    if isinstance(value, ResourceSettings):
        return value
    if isinstance(value, Mapping):
        return validated(ResourceSettings, value, where)
    raise StepOperatorConfigError(
        f"{where}: expected ResourceSettings(...) or a dict of its fields, got {type(value).__name__}"
    )


def _flavor_settings(flavor: str, value: Any, where: str) -> BaseStepOperatorSettings:
    model = get_flavor(flavor).settings_model()
    if isinstance(value, BaseStepOperatorSettings):
        if not isinstance(value, model):
            raise StepOperatorConfigError(
                f"{where}: expected {model.__name__}, got {type(value).__name__} "
                f"(settings of flavor {value.flavor!r})"
            )
        return value
    if isinstance(value, Mapping):
        return validated(model, value, where)
    raise StepOperatorConfigError(f"{where}: expected {model.__name__}(...) or a dict, got {type(value).__name__}")


def parse_step_settings(
    settings: Mapping[str, Any] | None = None,
    resources: ResourceSettings | Mapping[str, Any] | None = None,
    *,
    flavor: str | None = None,
) -> StepSettings:
    """Validate ``settings``/``resources``; ``flavor`` is set when the operator class fixes it."""
    if settings is not None and not isinstance(settings, Mapping):
        raise StepOperatorConfigError(
            f"settings: expected a dict with keys {_allowed_keys()}, got {type(settings).__name__}"
        )
    if resources is None and settings is not None and len(settings) == 1:  # the common case, fast
        only = settings.get(RESOURCES_KEY)
        if isinstance(only, ResourceSettings):
            _check_with_defaults(flavor, only)
            return StepSettings(resources=only)
    settings = dict(settings or {})
    parsed_resources: ResourceSettings | None = None
    if resources is not None:
        if RESOURCES_KEY in settings:
            raise StepOperatorConfigError(
                "resources: given both as resources= and as settings['resources']; give it once"
            )
        parsed_resources = validate_resources(resources, "resources")

    found: list[BaseStepOperatorSettings] = []
    for key, value in settings.items():
        if key == RESOURCES_KEY:
            parsed_resources = validate_resources(value, f"settings[{key!r}]")
        elif key == "step_operator":
            if not isinstance(value, BaseStepOperatorSettings):
                raise StepOperatorConfigError(
                    "settings['step_operator']: expected a flavor settings object such as "
                    "LocalStepOperatorSettings(...); for a dict use the key 'step_operator.<flavor>'"
                )
            found.append(value)
        elif isinstance(key, str) and key.startswith(FLAVOR_KEY_PREFIX):
            name = key[len(FLAVOR_KEY_PREFIX):]
            if name not in FLAVORS:
                raise StepOperatorConfigError(
                    f"settings: unknown flavor in key {key!r}; allowed keys: {_allowed_keys()}"
                )
            found.append(_flavor_settings(name, value, f"settings[{key!r}]"))
        else:
            raise StepOperatorConfigError(f"settings: unknown key {key!r}; allowed keys: {_allowed_keys()}")

    by_flavor: dict[str, BaseStepOperatorSettings] = {}
    for given in found:
        if given.flavor in by_flavor:
            raise StepOperatorConfigError(f"settings: the {given.flavor} settings were given twice (as "
                                          "'step_operator' and as 'step_operator.<flavor>'); give them once")
        by_flavor[given.flavor] = given
    other = sorted(set(by_flavor) - {flavor}) if flavor else []
    if other:
        raise StepOperatorConfigError(
            f"settings: 'step_operator.{other[0]}' settings were given to a {flavor} step "
            f"operator; use 'step_operator.{flavor}'"
        )
    resources_ = parsed_resources or ResourceSettings()
    if not by_flavor:
        _check_with_defaults(flavor, resources_)
    for flavor_settings in by_flavor.values():
        try:
            flavor_settings.check_resources(resources_)
        except ValueError as exc:
            raise settings_error(flavor_settings.flavor, exc) from None
    return StepSettings(resources=resources_, by_flavor=by_flavor)


def settings_error(flavor: str, exc: ValueError) -> StepOperatorConfigError:
    """A flavor settings check's error, named by where the conflict is: the resources or the flavor settings."""
    where = "" if str(exc).startswith("resources") else f"settings['step_operator.{flavor}']."
    return StepOperatorConfigError(f"{where}{exc}")


def _check_with_defaults(flavor: str | None, resources: ResourceSettings) -> None:
    """An operator class that fixes its flavor gets ResourceSettings checked at parse time even without
    flavor settings (the flavor's defaults apply then)."""
    if not flavor or flavor not in FLAVORS or resources.empty:
        return
    model = FLAVORS[flavor].settings_model()
    if not model.resources_checkable_alone:
        return  # what fits depends on the connection (a cluster, a default machine): checked at submit
    try:
        model().check_resources(resources)
    except ValueError as exc:
        raise StepOperatorConfigError(f"resources: {flavor} step operators cannot honour them: {exc}") from None
