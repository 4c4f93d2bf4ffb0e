"""The documentation stays true to the code: the generated config reference is current."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvfp4_pp import config_docs
from nvfp4_pp.config import config_keys

REPO = Path(__file__).resolve().parents[1]


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

