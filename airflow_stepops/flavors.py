"""The registry of flavors: names to dotted paths, so nothing heavy is imported to look one up."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow_stepops.settings.base import BaseStepOperatorConfig, BaseStepOperatorSettings


@dataclass(frozen=True)
class Flavor:
    """A backend, declared once: its name (the module of each layer: ``settings/<name>.py``, ``hooks/``,
    ``operators/``, ``triggers/``), the prefix of its class names and a display name. Class paths, the
    connection type and the default connection id derive from them; a class kept elsewhere is named."""

    name: str
    prefix: str
    display_name: str
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
                object.__setattr__(self, attr, f"airflow_stepops.{layer}.{self.name}.{self.prefix}StepOperator{suffix}")

    @property
    def conn_type(self) -> str:
        return f"stepops_{self.name}"

    @property
    def default_conn_id(self) -> str:
        return f"stepops_{self.name}_default"

    def settings_model(self) -> type[BaseStepOperatorSettings]:
        return _import(self.settings_class)

    def config_model(self) -> type[BaseStepOperatorConfig]:
        return _import(self.config_class)

    def hook(self) -> Any:
        return _import(self.hook_class)

    def trigger(self) -> Any:
        return _import(self.trigger_class)


FLAVORS: dict[str, Flavor] = {f.name: f for f in (
    Flavor("local", "Local", "Local subprocess"),
    Flavor("kubernetes", "Kubernetes", "Kubernetes Job"),
    Flavor("sagemaker", "SageMaker", "SageMaker Training Job"),
    Flavor("vertex", "Vertex", "Vertex AI CustomJob"),
    Flavor("azureml", "AzureML", "Azure ML command job"),
    Flavor("modal", "Modal", "Modal function call"),
)}


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
