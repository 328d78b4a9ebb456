"""Writes ``get_provider_info.py`` from the flavor registry and the config models' fields (title, description,
default, type): ``python -m airflow_stepops._provider_info_gen``. Airflow imports provider info in every
process, so the written file holds literal dicts and imports neither pydantic nor the models."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from airflow_stepops.flavors import BUILTIN_FLAVORS, Flavor

TARGET = Path(__file__).with_name("get_provider_info.py")
_INTEGRATION = "Step Operators"


def conn_fields(flavor: Flavor) -> dict[str, Any]:
    """The connection form: one field per config model field, every one optional in the form (the model
    says what is required when the connection is used)."""
    fields = {}
    for name, prop in flavor.config_model().model_json_schema()["properties"].items():
        types = [t for alt in prop.get("anyOf", [prop]) if (t := alt.get("type", "object")) != "null"]
        schema = {"type": [*types, "null"]} | ({"default": prop["default"]} if prop.get("default") is not None else {})
        fields[name] = {"label": prop["title"], "schema": schema} | (
            {"description": prop["description"]} if prop.get("description") else {})
    return fields


def connection_type(flavor: Flavor) -> dict[str, Any]:
    entry = flavor.connection_type()
    entry["ui-field-behaviour"]["hidden-fields"].append("extra")  # every extra has its own form field
    return entry | {"conn-fields": conn_fields(flavor)}


def provider_info() -> dict[str, Any]:
    def modules(attr: str) -> list[dict[str, Any]]:
        paths = [getattr(f, attr).rpartition(".")[0] for f in BUILTIN_FLAVORS]
        return [{"integration-name": _INTEGRATION, "python-modules": paths}]

    return {
        "package-name": "airflow-stepops",
        "name": _INTEGRATION,
        "description": "Run chosen Python tasks on Kubernetes, SageMaker, Vertex AI, Azure ML, Modal or a detached "
        "local process: the step-operator model for Airflow.",
        "versions": ["0.1.0"],
        "connection-types": [connection_type(f) for f in BUILTIN_FLAVORS],
        "config": {"stepops": {"description": "Defaults of airflow-stepops step operators.", "options": {
            "default_deferrable": {
                "description": "Whether step tasks wait for their remote job in the triggerer unless the task sets "
                "deferrable=. The environment variable AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE, when set, takes "
                "precedence.",
                "version_added": "0.1.0", "type": "boolean", "example": None, "default": "True"}}}},
        "task-decorators": [
            {"name": "step_operator", "class-name": "airflow_stepops.decorators.step_operator.step_operator_task"}],
        "extra-links": ["airflow_stepops.links.StepJobLink", "airflow_stepops.links.StepCostLink"],
        "hooks": modules("hook_class"),
        "operators": modules("operator_class"),
        "triggers": modules("trigger_class"),
        "integrations": [{"integration-name": _INTEGRATION, "tags": ["software"],
                          "external-doc-url": "https://pypi.org/project/airflow-stepops/"}],
    }


def shared(info: dict[str, Any]) -> dict[str, Any]:
    """What the connection types repeat, to be written once: the form behaviour, the fields every built-in
    flavor has alike, and each other field value two or more flavors have alike."""
    types = info["connection-types"]
    first = types[0]["conn-fields"]
    common = {k: v for k, v in first.items() if all(t["conn-fields"].get(k) == v for t in types)}
    consts: dict[str, Any] = {"_UI": types[0]["ui-field-behaviour"], "_COMMON_FIELDS": common}
    for i, entry in enumerate(types):
        for name, value in entry["conn-fields"].items():
            if name not in common and any(t["conn-fields"].get(name) == value for t in types[i + 1:]):
                consts.setdefault(f"_{name.upper()}", value)
    return {name: value for name, value in consts.items() if value}  # an empty one would stand for every {}


def _literal(value: Any, consts: dict[str, Any], indent: int = 0, depth: int = 0) -> str:
    """``repr`` laid out one connection field, option or list of names a line, so a change shows as a one-line
    diff; a value of ``consts`` (a run of its items, for a dict) is written as its name."""
    names = [n for n, c in consts.items() if c == value]
    if names:
        return names[0]
    flat = repr(value)
    names_only = isinstance(value, list) and all(isinstance(v, str) for v in value)
    if depth >= 4 or not isinstance(value, (dict, list)) or len(flat) + indent <= 120 or names_only:
        return flat
    pad = " " * (indent + 4)
    if isinstance(value, list):
        items = [_literal(v, consts, indent + 4, depth + 1) for v in value]
    else:
        items, rest = [], list(value.items())
        while rest:
            run = next((n for n, c in consts.items() if isinstance(c, dict) and c and
                        list(c.items()) == rest[:len(c)]), None)
            if run:
                items.append(f"**{run}")
                rest = rest[len(consts[run]):]
            else:
                (k, v), *rest = rest
                items.append(f"{k!r}: {_literal(v, consts, indent + 4, depth + 1)}")
    body = "".join(f"{pad}{item},\n" for item in items)
    return ("{\n" if isinstance(value, dict) else "[\n") + body + " " * indent + ("}" if isinstance(value, dict) else "]")


_TEMPLATE = '''\
# Generated by `python -m airflow_stepops._provider_info_gen` from the flavor registry and the config models: do not edit.
"""Provider metadata read by Airflow's providers manager; it imports only the flavor registry (stdlib only)."""

from __future__ import annotations

import json
from typing import Any

from airflow_stepops.flavors import FLAVORS

{consts}
_INFO: dict[str, Any] = {info}


def get_provider_info() -> dict[str, Any]:
    """The built-in flavors' metadata, plus the connection types of flavors other packages register (entry
    point group ``airflow_stepops.flavors``): named, with their settings in the connection's JSON extra."""
    info = json.loads(json.dumps(_INFO))  # a fresh copy, sharing no dict between connection types
    known = {{c["connection-type"] for c in info["connection-types"]}}
    info["connection-types"] += [f.connection_type() for f in FLAVORS.values() if f.conn_type not in known]
    return info
'''


def render() -> str:
    info = provider_info()
    consts = shared(info)
    lines = [f"{name}: dict[str, Any] = {_literal(value, {}, depth=3 + (name != '_COMMON_FIELDS'))}\n"
             for name, value in consts.items()]
    return _TEMPLATE.format(consts="".join(lines), info=_literal(info, consts))


if __name__ == "__main__":
    TARGET.write_text(render())
    print(f"wrote {TARGET}", file=sys.stderr)
