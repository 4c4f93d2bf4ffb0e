"""The documentation stays true to the code: the generated config reference is current, README is
short, and every relative link (file and #anchor) resolves. Cheap: no network, no model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nvfp4_pp import config_docs
from nvfp4_pp.config import config_keys

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200
LINKED_DOCS = [REPO / "README.md", REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)\)")
FENCED = re.compile(r"^```.*?^```", flags=re.S | re.M)


def test_configuration_reference_is_current():
    written = (REPO / "docs" / "configuration.md").read_text()
    assert written == config_docs.render(), (
        f"docs/configuration.md is stale (config.py changed); regenerate it with: {config_docs.COMMAND} "
        "(or `make docs`)")


def test_every_config_key_is_documented():
    text = config_docs.render()
    missing = [k for k in config_keys() if f"| `{k}` |" not in text]
    assert not missing, f"keys without a row in docs/configuration.md: {missing}"
    documented = [k for s in config_docs.sections() for k in s.keys]
    assert all(k.doc and k.type and k.default for k in documented)


def test_a_field_without_docstring_is_refused():
    import dataclasses

    @dataclasses.dataclass
    class Section:
        """A section."""

        documented: int = 1
        """Has its text."""
        bare: int = 2

    with pytest.raises(ValueError, match="Section.bare has no docstring"):
        config_docs.sections(Section)


def test_readme_is_short():
    lines = (REPO / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; keep it to {README_MAX_LINES}, move detail to docs/"


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code (links there are not links)."""
    return re.sub(r"`[^`\n]*`", "", FENCED.sub("", text))


def _anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lowercase, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", FENCED.sub("", path.read_text()), flags=re.M):
        heading = LINK.sub(r"\1", heading)
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


@pytest.mark.parametrize("doc", LINKED_DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc):
    broken = []
    for _, target in LINK.findall(_prose(doc.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not checked (no network)
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            broken.append(f"{target} (no file {path})")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{target} (no heading #{anchor} in {path.relative_to(REPO)})")
    assert not broken, f"{doc.relative_to(REPO)} has broken links: {broken}"
