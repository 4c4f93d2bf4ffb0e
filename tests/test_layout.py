"""The package's import rule (docs/architecture.md, "Layout"): each part imports only its own modules and
the parts below it, so `ls nvfp4_pp` reads bottom to top as the pipeline and no change drags a higher
part into a lower one. Cheap: reads the source with `ast`, imports nothing."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nvfp4_pp"

GROUND = {"__init__", "errors", "records", "phases", "sizes", "files", "log", "progress", "config", "vllm_contract"}
"""Top-level modules every part may import; they import only each other."""
GROUND_IN_PARTS = {"nvfp4_pp.algorithms.table"}
"""Ground-floor modules kept beside their part: the algorithms table is plain data every part reads
(config's accepted names, the planner's memory terms, the card's words), next to the algorithms it names."""
PARTS = ["runtime", "model", "data", "planning", "algorithms", "checkpoint", "calibration", "publish", "driver"]
"""Subpackages, lowest first: a part imports the ground floor, itself and the parts before it. A streaming
stage writes each layer as it is solved, so calibration sits above checkpoint."""
DOORS = {"run", "launch", "verify", "evaluate", "config_docs", "demo_model"}
"""The commands (`python -m nvfp4_pp.<door>`): they may import anything, nothing imports them."""


def _part(module: str) -> str:
    """'nvfp4_pp.checkpoint.formats.base' -> 'checkpoint'; a ground module -> 'ground'."""
    first = module.split(".")[1] if module.count(".") else "__init__"
    if first in GROUND or module in GROUND_IN_PARTS:
        return "ground"
    return first


def _rank(part: str) -> int:
    if part == "ground":
        return -1
    if part in DOORS:
        return len(PARTS)
    return PARTS.index(part)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported nvfp4_pp module) for every import in the file, function-local ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("nvfp4_pp")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("nvfp4_pp"):
            if node.module == "nvfp4_pp":  # `from nvfp4_pp import x`: x is a module, or a name of __init__
                found += [(node.lineno, f"nvfp4_pp.{a.name}" if (PACKAGE / a.name).exists()
                           or (PACKAGE / f"{a.name}.py").exists() else "nvfp4_pp") for a in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def test_every_module_has_a_place():
    """A new top-level module or package must be placed in the rule (ground floor, a part or a door)."""
    known = GROUND | set(PARTS) | DOORS
    unplaced = sorted(p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
                      if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists())) and p.stem not in known)
    assert not unplaced, f"place {unplaced} in tests/test_layout.py and docs/architecture.md's layout"


def test_no_relative_imports():
    """Absolute imports only: a module's imports name the part they come from."""
    relative = [f"{p.relative_to(PACKAGE.parent)}:{n.lineno}" for p in PACKAGE.rglob("*.py")
                for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.ImportFrom) and n.level]
    assert not relative, relative


def test_parts_import_only_downward():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        own = _part(module)
        for line, imported in _imports(path):
            other = _part(imported)
            if other in DOORS and own != other:
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports the command {imported}")
            elif other != own and _rank(other) > _rank(own):
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({own}) imports {imported} ({other})")
    assert not violations, "imports against the layout rule:\n" + "\n".join(violations)


CHECKERS = ("nvfp4_pp.checkpoint.verify", "nvfp4_pp.checkpoint.decoders", "nvfp4_pp.vllm_contract", "nvfp4_pp.verify")
WRITERS = ("nvfp4_pp.checkpoint.formats", "nvfp4_pp.checkpoint.export", "nvfp4_pp.checkpoint.writer")


def test_checkers_never_import_the_writers():
    """verify and the decoders read what was written with their own tables, so a writer bug cannot hide
    behind a table both share."""
    shared = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {imported}"
              for path in sorted(PACKAGE.rglob("*.py")) if _module_name(path).startswith(CHECKERS)
              for line, imported in _imports(path) if imported.startswith(WRITERS)]
    assert not shared, shared
