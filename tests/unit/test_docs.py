"""The documentation cannot drift: generated tables equal their models, included examples are DAG files the
tests parse, and every relative link in README.md and docs/ points at a file (and heading) that exists."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from airflow_stepops.flavors import FLAVORS
from scripts import gen_docs
from tests.unit.test_examples import dag_files

ROOT = gen_docs.ROOT
PAGES = gen_docs.doc_files()
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_generated_blocks_match_their_sources(page: Path) -> None:
    """Regenerated in memory from the config and settings models and the included files: a table edited by
    hand, or a model field added, renamed or re-described without `python -m scripts.gen_docs`, fails."""
    text = page.read_text()
    fresh = gen_docs.expand(text)
    diff = "".join(difflib.unified_diff(text.splitlines(True), fresh.splitlines(True), "committed", "generated"))
    assert fresh == text, f"{_rel(page)} is stale; run `python -m scripts.gen_docs`:\n{diff}"


def test_every_flavor_has_its_generated_pages() -> None:
    for name in FLAVORS:
        assert ("connection-extras", name) in gen_docs.blocks((ROOT / "docs/connections" / f"{name}.md").read_text())
        flavor_page = gen_docs.blocks((ROOT / "docs/flavors" / f"{name}.md").read_text())
        assert ("step-settings", name) in flavor_page
        assert any(kind == "include" for kind, _ in flavor_page), f"docs/flavors/{name}.md includes no example"


def test_a_field_without_description_renders_an_empty_cell() -> None:
    class Model(BaseModel):
        plain: int = 3
        described: list[str] = Field(default_factory=list, description="a | b")
        needed: str | None

    rows = gen_docs._table(Model, "extra").splitlines()
    assert rows[2:] == ["| `plain` | `int` | `3` |  |", "| `described` | `list[str]` | `[]` | a \\| b |",
                        "| `needed` | `str \\| None` | **required** |  |"]


def _includes() -> list[str]:
    return sorted({arg for page in PAGES for kind, arg in gen_docs.blocks(page.read_text()) if kind == "include"})


@pytest.mark.parametrize("path", _includes())
def test_included_examples_are_dag_files_the_tests_parse(path: str) -> None:
    """An include must name an example DAG that tests/unit/test_examples.py loads into its DagBag (no import
    errors allowed, every ``@dag`` file a DAG), so an included example is never code no test runs."""
    assert ROOT / path in dag_files(), (
        f"{path}: docs include only the example DAGs tests/unit/test_examples.py parses: "
        f"{sorted(str(p.relative_to(ROOT)) for p in dag_files())}")


def _anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", page.read_text(), re.MULTILINE)}


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)  # code blocks hold no links
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    assert not broken, f"{_rel(page)}: broken links: {broken}"
