"""docs/configuration.md, generated from config.py so the reference cannot drift from the code.

    python -m nvfp4_pp.config_docs docs/configuration.md     (or `make docs`; no argument: stdout)

Each key's text is the string literal written right after its field in config.py, each section's
the docstring of its dataclass; types are worded as config errors word them (config._type_name),
defaults are the dataclass defaults. tests/test_docs.py fails when the file in docs/ is stale.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import sys
import textwrap
import typing
from pathlib import Path

from nvfp4_pp.config import RunConfig, _dataclass_list, _type_name

COMMAND = "python -m nvfp4_pp.config_docs docs/configuration.md"
SEE_ALSO = {
    "calibration.": "[calibration-data.md](calibration-data.md)",
    "calibration.dataset[].": "[calibration-data.md](calibration-data.md#mixes)",
    "pipeline.": "[planner.md](planner.md) and [multi-node.md](multi-node.md)",
    "gather.": "[multi-node.md](multi-node.md#gather)",
}
"""Hand-written guides for a section, linked under its docstring (tests/test_docs.py checks the links)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Key:
    """One row of the reference: a dotted key, its type, default and docstring."""

    name: str
    type: str
    default: str
    doc: str


@dataclasses.dataclass(frozen=True, slots=True)
class Section:
    """The keys of one config dataclass, under its dotted prefix, with the class docstring."""

    prefix: str
    title: str
    doc: str
    keys: tuple[Key, ...]


def field_docstrings(cls: type) -> dict[str, str]:
    """Field name -> the string literal right after the field in the class body (one line of text)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    definition = tree.body[0]
    assert isinstance(definition, ast.ClassDef)  # the source of a class
    body = definition.body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    return f"`{json.dumps(value)}`"  # JSON is YAML: null, false, "auto", [], {}


def sections(cls: type = RunConfig, prefix: str = "", title: str = "Top level") -> list[Section]:
    """Every config dataclass reachable from `cls` as a section, in field order (as config_keys)."""
    hints = typing.get_type_hints(cls)
    docs = field_docstrings(cls)
    keys, nested = [], []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            nested += sections(tp, f"{prefix}{f.name}.", f"`{prefix}{f.name}`")
            continue
        if f.name not in docs:
            raise ValueError(f"config field {cls.__name__}.{f.name} has no docstring; write one as a string "
                             "literal on the line after the field, then run: " + COMMAND)
        keys.append(Key(f"{prefix}{f.name}", _type_name(tp), _default(f), docs[f.name]))
        listed = _dataclass_list(tp)
        if listed is not None:  # a list of mappings (a calibration mix): its keys are a section too
            nested += sections(listed, f"{prefix}{f.name}[].", f"`{prefix}{f.name}` as a list (a mix)")
    if not cls.__doc__:
        raise ValueError(f"config section {cls.__name__} has no class docstring")
    return [Section(prefix, title, " ".join(cls.__doc__.split()), tuple(keys)), *nested]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _yaml_skeleton(all_sections: list[Section]) -> list[str]:
    """Every key at its default, nested as a YAML file would be."""
    lines = []
    for s in all_sections:
        if "[]" in s.prefix:
            continue  # list entries: shown in their own table
        depth = s.prefix.count(".")
        if s.prefix:
            lines.append("  " * (depth - 1) + s.prefix.rstrip(".").rpartition(".")[2] + ":")
        for k in s.keys:
            value = "..." if k.default == "required" else k.default.strip("`")
            note = "  # required" if k.default == "required" else ""
            lines.append("  " * depth + f"{k.name.rpartition('.')[2]}: {value}{note}")
    return lines


def render() -> str:
    """The whole of docs/configuration.md."""
    all_sections = sections()
    out = [
        "<!-- Generated from nvfp4_pp/config.py by `" + COMMAND + "` (or `make docs`).",
        "     Do not edit: change the field's docstring in config.py and regenerate. -->",
        "# Configuration reference",
        "",
        "A run is configured by one YAML file, `torchrun ... -m nvfp4_pp.run CONFIG.yaml`. Any key can be",
        "overridden on the command line with `--set a.b=value` (the value is read as YAML:",
        "`--set pipeline.layers=[41,41,6]`). Every key is validated before any weight is loaded: an unknown",
        "key, a wrong type or a value out of range is refused with one line naming the key and the fix",
        "(see [faults.md](faults.md)). Seed configs live in [configs/](../configs/).",
        "",
        "Every key at its default:",
        "",
        "```yaml",
        *_yaml_skeleton(all_sections),
        "```",
    ]
    for s in all_sections:
        more = f" More in {SEE_ALSO[s.prefix]}." if s.prefix in SEE_ALSO else ""
        out += ["", f"## {s.title}", "", s.doc + more, "", "| key | type | default | meaning |", "|---|---|---|---|"]
        out += [f"| `{k.name}` | {_cell(k.type)} | {_cell(k.default)} | {_cell(k.doc)} |" for k in s.keys]
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if not argv:
        sys.stdout.write(text)
        return 0
    Path(argv[0]).write_text(text)  # rendered first: a config without docstrings leaves the file as it was
    print(f"wrote {argv[0]} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
