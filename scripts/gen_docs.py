"""Rewrite the generated blocks of README.md and docs/ in place, so they cannot drift from their sources.

A block sits between ``<!-- generated: KIND ARG -->`` and ``<!-- end generated -->``:
``connection-extras FLAVOR`` is the table of a flavor's connection extras, read from its config model's
pydantic fields (name, type, default, ``Field(description=...)``), ``step-settings FLAVOR`` the same for
its per-step settings model and ``resource-settings all`` for ``ResourceSettings``; ``include PATH`` is a
file of the repository (an example DAG) as a code block. ``python -m scripts.gen_docs`` rewrites them;
``--check`` only reports the files that differ (tests/unit/test_docs.py does the same in memory).
"""

from __future__ import annotations

import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- generated: (?P<kind>[\w-]+) (?P<arg>\S+) -->\n)(?P<body>.*?)(<!-- end generated -->)",
                   re.DOTALL)


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _type(annotation: Any) -> str:
    """``str | None`` rather than ``typing.Optional[str]``: how a user writes the value, not how Python spells it."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type(a) for a in args)
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _table(model: Any, head: str) -> str:
    """One row per pydantic field of a model, in declaration order: name, type, default, description."""
    rows = [f"| {head} | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if field.is_required():
            default = "**required**"
        elif field.default_factory is not None:
            default = f"`{json.dumps(field.default_factory(), default=str)}`"
        elif field.default is None:
            default = ""
        else:
            default = f"`{json.dumps(field.default, default=str)}`"
        rows.append(f"| `{field.alias or name}` | `{_type(field.annotation)}` | {default} | "
                    f"{_cell(field.description or '')} |")
    return "\n".join(rows) + "\n"


def connection_extras(flavor: str) -> str:
    """The extras of a flavor's ``stepops_<flavor>`` connection: its config model."""
    from airflow_stepops.flavors import FLAVORS

    return _table(FLAVORS[flavor].config_model(), "extra")


def step_settings(flavor: str) -> str:
    """The per-step ``step_operator.<flavor>`` settings: its settings model."""
    from airflow_stepops.flavors import FLAVORS

    return _table(FLAVORS[flavor].settings_model(), "setting")


def resource_settings(_: str) -> str:
    from airflow_stepops.resources import ResourceSettings

    return _table(ResourceSettings, "setting")


def include(path: str) -> str:
    """A repository file as a code block, headed by its path (the file is what the tests run)."""
    source = ROOT / path
    fence = {".py": "python", ".json": "json", ".sh": "bash"}.get(source.suffix, "")
    return f"`{path}`:\n\n```{fence}\n{source.read_text()}```\n"


RENDERERS = {"connection-extras": connection_extras, "step-settings": step_settings,
             "resource-settings": resource_settings, "include": include}


def blocks(text: str) -> list[tuple[str, str]]:
    """The (kind, arg) of every generated block of a page."""
    return [(m["kind"], m["arg"]) for m in BLOCK.finditer(text)]


def expand(text: str) -> str:
    def render(m: re.Match[str]) -> str:
        if m["kind"] not in RENDERERS:
            raise ValueError(f"unknown generated block {m['kind']!r}; known: {', '.join(RENDERERS)}")
        return m.group(1) + RENDERERS[m["kind"]](m["arg"]) + m.group(5)

    return BLOCK.sub(render, text)


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for page in doc_files():
        text = page.read_text()
        new = expand(text)
        if new != text:
            stale.append(page.relative_to(ROOT))
            if not check:
                page.write_text(new)
    for page in stale:
        print(f"{'stale' if check else 'rewrote'}: {page}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
