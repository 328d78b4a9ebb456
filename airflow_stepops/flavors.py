"""The registry of flavors: names to dotted paths, so nothing heavy is imported to look one up.

Other packages add flavors through the entry point group ``airflow_stepops.flavors``, each entry a ``Flavor``
in a module that imports only this one: entries are read while this module loads, once per process, as
Airflow reads its providers, so every Airflow component knows them.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow_stepops.settings.base import BaseStepOperatorConfig, BaseStepOperatorSettings


@dataclass(frozen=True)
class Flavor:
    """A backend, declared once: its name (the module of each layer: ``settings/<name>.py``, ``hooks/``,
    ``operators/``, ``triggers/``), the prefix of its class names and a display name. Class paths, the
    connection type and the default connection id derive from them; a class kept elsewhere is named.
    Another package's flavor names its ``package`` (``<package>.hooks.<name>`` ...) or its class paths."""

    name: str
    prefix: str
    display_name: str
    package: str = "airflow_stepops"
    settings_class: str = ""
    config_class: str = ""
    hook_class: str = ""
    operator_class: str = ""
    trigger_class: str = ""

    def __post_init__(self) -> None:
        for attr, layer, suffix in (("settings_class", "settings", "Settings"), ("config_class", "settings", "Config"),
                                    ("hook_class", "hooks", "Hook"), ("operator_class", "operators", ""),
                                    ("trigger_class", "triggers", "Trigger")):
            if not getattr(self, attr):
                object.__setattr__(self, attr, f"{self.package}.{layer}.{self.name}.{self.prefix}StepOperator{suffix}")

    @property
    def conn_type(self) -> str:
        return f"stepops_{self.name}"

    @property
    def default_conn_id(self) -> str:
        return f"stepops_{self.name}_default"

    @property
    def hook_name(self) -> str:
        return f"Step operator: {self.display_name}"

    def connection_type(self) -> dict[str, Any]:
        """Its entry in provider info's ``connection-types``, without form fields (those come from the config
        model, see ``_provider_info_gen``): the JSON extra then stays visible for its settings."""
        return {"hook-class-name": self.hook_class, "hook-name": self.hook_name, "connection-type": self.conn_type,
                "ui-field-behaviour": {"hidden-fields": ["host", "schema", "login", "password", "port"],
                                       "relabeling": {}, "placeholders": {}}}

    def settings_model(self) -> type[BaseStepOperatorSettings]:
        return _import(self.settings_class)

    def config_model(self) -> type[BaseStepOperatorConfig]:
        return _import(self.config_class)

    def hook(self) -> Any:
        return _import(self.hook_class)

    def trigger(self) -> Any:
        return _import(self.trigger_class)


BUILTIN_FLAVORS: tuple[Flavor, ...] = (
    Flavor("local", "Local", "Local subprocess"),
    Flavor("kubernetes", "Kubernetes", "Kubernetes Job"),
    Flavor("sagemaker", "SageMaker", "SageMaker Training Job"),
    Flavor("vertex", "Vertex", "Vertex AI CustomJob"),
    Flavor("azureml", "AzureML", "Azure ML command job"),
    Flavor("modal", "Modal", "Modal function call"),
)
FLAVORS: dict[str, Flavor] = {}
ENTRY_POINT_GROUP = "airflow_stepops.flavors"


def register_flavor(flavor: Flavor) -> Flavor:
    """Add a flavor to this process's registry; a package's entry point does it in every Airflow process."""
    if not isinstance(flavor, Flavor) or not re.fullmatch(r"[a-z][a-z0-9_]*", flavor.name):
        raise ValueError(f"a flavor must be a Flavor named in lowercase letters, digits and '_', got {flavor!r}")
    if FLAVORS.setdefault(flavor.name, flavor) != flavor:
        raise ValueError(f"flavor {flavor.name!r} is already registered as {FLAVORS[flavor.name]}")
    return flavor


def _register_entry_points() -> None:
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            register_flavor(entry.load())
        except Exception as exc:  # one broken package must not take the other flavors down
            warnings.warn(f"flavor entry point {entry.name} = {entry.value} ({ENTRY_POINT_GROUP}) is ignored: "
                          f"{exc}", stacklevel=2)


def get_flavor(name: str) -> Flavor:
    try:
        return FLAVORS[name]
    except KeyError:
        from airflow_stepops.exceptions import StepOperatorConfigError  # imports Airflow: only when needed

        raise StepOperatorConfigError(
            f"unknown step operator flavor {name!r}; available flavors: {', '.join(sorted(FLAVORS))}"
        ) from None


def flavor_for_conn_type(conn_type: str | None) -> Flavor | None:
    for flavor in FLAVORS.values():
        if flavor.conn_type == conn_type:
            return flavor
    return None


@cache
def _import(path: str) -> Any:
    from importlib import import_module

    module, _, attr = path.rpartition(".")
    return getattr(import_module(module), attr)


# last: another package's flavor module may import this one while it loads
for _flavor in BUILTIN_FLAVORS:
    register_flavor(_flavor)
_register_entry_points()
