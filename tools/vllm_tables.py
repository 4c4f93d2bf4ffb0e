"""Re-derive vLLM's loader tables from a vLLM wheel's source and compare them with the pinned ones.

    python tools/vllm_tables.py vllm-0.34.0-*.whl      # or an unpacked source tree, or --download 0.34.0

`nvfp4_pp/vllm_contract.py` holds, for the release it names (`VLLM_RELEASE`), what vLLM's two
loaders accept: the ModelOpt `quant_algo`s and the per-layer algorithms of `MIXED_PRECISION`, and
the compressed-tensors scheme dispatch with each predicate's conditions. This script reads the same
facts from the release's source by parsing it (ast; vLLM is never imported: it pins its own torch),
prints what it found, and exits 1 when it differs from the pinned tables: the next release is one
command away, and a drift is a diff to read, not a silent change. Only this script fetches a wheel
(`--download` runs `pip download vllm==VERSION --no-deps`); CI reads the pinned tables alone.
"""

from __future__ import annotations

import argparse
import ast
import pprint
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nvfp4_pp import vllm_contract  # noqa: E402

QUANT = "vllm/model_executor/layers/quantization/"
FILES = {"modelopt": QUANT + "modelopt.py", "ct": QUANT + "compressed_tensors/compressed_tensors.py",
         "ct_utils": QUANT + "compressed_tensors/utils.py", "b12x": "vllm/utils/b12x.py",
         "version": "vllm/_version.py"}


class Unreadable(Exception):
    """The source has a shape this parser does not know: read the release by hand and extend it."""


def read_sources(path: Path) -> dict[str, str]:
    if path.is_dir():
        return {k: (path / f).read_text() for k, f in FILES.items() if (path / f).is_file()}
    with zipfile.ZipFile(path) as wheel:
        names = set(wheel.namelist())
        return {k: wheel.read(f).decode() for k, f in FILES.items() if f in names}


def _assigned(tree: ast.Module, name: str) -> ast.expr:
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return node.value
    raise Unreadable(f"no module-level {name}")


def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    found = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)
    if found is None:
        raise Unreadable(f"no class {name}")
    return found


def _method(cls: ast.ClassDef, name: str) -> ast.FunctionDef:
    found = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == name), None)
    if found is None:
        raise Unreadable(f"no {cls.name}.{name}")
    return found


def _returned_string(fn: ast.FunctionDef) -> str:
    returns = [n.value for n in ast.walk(fn) if isinstance(n, ast.Return) and isinstance(n.value, ast.Constant)]
    if len(returns) != 1:
        raise Unreadable(f"{fn.name} does not return one string")
    return returns[0].value


def modelopt_tables(src: str, b12x: str) -> dict:
    """LINEAR_ALGOS (algo -> owning config), QUANT_ALGOS, and what MIXED_PRECISION's Linears accept."""
    tree = ast.parse(src)
    linear = ast.literal_eval(_assigned(tree, "LINEAR_ALGOS"))
    algos = _assigned(tree, "QUANT_ALGOS")
    quant_algos = []
    for element in algos.elts:
        if isinstance(element, ast.Starred) and isinstance(element.value, ast.Name) and element.value.id == "LINEAR_ALGOS":
            quant_algos += list(linear)
        else:
            quant_algos.append(ast.literal_eval(element))
    mixed = _class(tree, "ModelOptMixedPrecisionConfig")
    method = ast.unparse(_method(mixed, "get_quant_method"))
    if "quant_algo not in LINEAR_ALGOS" not in method or "UnquantizedLinearMethod()" not in method:
        raise Unreadable("ModelOptMixedPrecisionConfig.get_quant_method no longer gives Linears outside "
                         "LINEAR_ALGOS an UnquantizedLinearMethod")
    codecs = []
    if "B12X_BLOCK_CODECS" in method:
        codecs = sorted(c.upper() for c in ast.literal_eval(_assigned(ast.parse(b12x), "B12X_BLOCK_CODECS")))
    return {
        "MODELOPT_LINEAR_ALGOS": {algo: owner for algo, (owner, _) in linear.items()},
        "MODELOPT_QUANT_ALGOS": tuple(quant_algos),
        "MODELOPT_MIXED_METHOD": _returned_string(_method(mixed, "get_name")),
        "MODELOPT_MIXED_LINEAR_ALGOS": (*linear, *codecs),
    }


class _Normalise(ast.NodeTransformer):
    """vLLM's predicate expressions with enum members as the strings compressed-tensors stores."""

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        text = ast.unparse(node).removesuffix(".value")
        for prefix, spell in (("QuantizationStrategy.", str.lower), ("QuantizationType.", str.lower),
                              ("CompressionFormat.", lambda s: s.replace("_", "-")), ("torch.", str)):
            if text.startswith(prefix) and text.count(".") == 1:
                return ast.Constant(spell(text.removeprefix(prefix)))
        return self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> ast.AST:
        name = ast.unparse(node.func)
        if name in ("cls._check_scheme_supported", "self._check_scheme_supported"):
            return ast.Constant(True)  # a GPU capability: the table is per scheme, not per GPU
        if name.startswith(("cls._is_", "self._is_")):
            return ast.Call(ast.Name(name.split(".", 1)[1]), [self.visit(a) for a in node.args], [])
        if name == "bool":
            return self.generic_visit(node)
        raise Unreadable(f"call {ast.unparse(node)} in a predicate")


def _predicate(fn: ast.FunctionDef) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(parameters, conditions that must all hold): assignments inlined, `if X: return False` read as
    `not X`; an early `return True` is left out, so the conditions are never looser than vLLM's."""
    params = tuple(a.arg for a in fn.args.args if a.arg not in ("self", "cls"))
    names: dict[str, ast.expr] = {}
    conditions: list[ast.expr] = []

    class Inline(ast.NodeTransformer):
        def visit_Name(self, node: ast.Name) -> ast.AST:
            return names.get(node.id, node)

    def expr(node: ast.expr) -> ast.expr:
        return _Normalise().visit(Inline().visit(node))

    for stmt in fn.body:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # docstring
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            names[stmt.targets[0].id] = expr(stmt.value)
        elif isinstance(stmt, ast.If) and not stmt.orelse and len(stmt.body) == 1 and isinstance(stmt.body[0], ast.Return):
            value = stmt.body[0].value
            if isinstance(value, ast.Constant) and value.value is False:
                conditions.append(ast.UnaryOp(ast.Not(), expr(stmt.test)))
            elif not (isinstance(value, ast.Constant) and value.value is True):
                raise Unreadable(f"{fn.name}: early return of {ast.unparse(value)}")
        elif isinstance(stmt, ast.Return):
            value = expr(stmt.value)
            conditions += value.values if isinstance(value, ast.BoolOp) and isinstance(value.op, ast.And) else [value]
        else:
            raise Unreadable(f"{fn.name}: statement {ast.unparse(stmt)[:80]}")
    return params, tuple(ast.unparse(c) for c in conditions)


def _scheme_dispatch(fn: ast.FunctionDef) -> list[tuple[str, tuple[str, ...]]]:
    """(the branch's test, the schemes it returns) in vLLM's order; the first test that holds wins."""
    rows = []

    def branch(stmts: list[ast.stmt], guard: str | None) -> None:
        for stmt in stmts:
            if not isinstance(stmt, ast.If):
                continue
            if isinstance(stmt.test, ast.Name):  # `if act_quant_format:` (the formats with activation scales)
                branch(stmt.body, stmt.test.id)
                continue
            test = ast.unparse(_Normalise().visit(stmt.test))
            if "_is_" not in test:
                raise Unreadable(f"dispatch test {test}")
            schemes = sorted({ast.unparse(n.value.func) for n in ast.walk(stmt) if isinstance(n, ast.Return)
                              and isinstance(n.value, ast.Call) and ast.unparse(n.value.func).startswith("CompressedTensors")})
            rows.append((f"{guard} and ({test})" if guard else test, tuple(schemes)))

    branch(fn.body, None)
    return rows


def compressed_tensors_tables(src: str, utils: str) -> dict:
    tree = ast.parse(src)
    config = _class(tree, "CompressedTensorsConfig")
    dispatch = _scheme_dispatch(_method(config, "_get_scheme_from_parts"))
    predicates = {}
    for called in sorted({m for test, _ in dispatch for m in re.findall(r"\b(_is_\w+)\(", test)}):
        predicates[called] = _predicate(_method(config, called))
    for params, conditions in list(predicates.values()):  # predicates the dispatched ones call
        for called in sorted({m for c in conditions for m in re.findall(r"\b(_is_\w+)\(", c)}):
            predicates.setdefault(called, _predicate(_method(config, called)))
    formats_fn = next(n for n in ast.parse(utils).body if isinstance(n, ast.FunctionDef)
                      and n.name == "is_activation_quantization_format")
    listed = next(n.value for n in formats_fn.body if isinstance(n, ast.Assign))
    return {
        "CT_SCHEME_DISPATCH": tuple(dispatch),
        "CT_PREDICATES": dict(sorted(predicates.items())),
        "CT_ACTIVATION_FORMATS": tuple(_Normalise().visit(e).value for e in listed.elts),
    }


def derive(sources: dict[str, str]) -> dict:
    missing = sorted(set(FILES) - {"version"} - set(sources))
    if missing:
        raise Unreadable(f"the source lacks {[FILES[m] for m in missing]}")
    version = None
    if "version" in sources:
        for node in ast.walk(ast.parse(sources["version"])):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") in ("__version__", "version") for t in node.targets):
                version = ast.literal_eval(node.value)
    return {"VLLM_RELEASE": version, **modelopt_tables(sources["modelopt"], sources["b12x"]),
            **compressed_tensors_tables(sources["ct"], sources["ct_utils"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tools/vllm_tables.py", description=__doc__.splitlines()[0])
    p.add_argument("source", nargs="?", type=Path, help="a vLLM wheel (.whl) or an unpacked source tree")
    p.add_argument("--download", metavar="VERSION", help="pip download vllm==VERSION (no deps) and read it")
    args = p.parse_args(argv)
    if (args.source is None) == (args.download is None):
        p.error("give a wheel or source tree, or --download VERSION")
    with tempfile.TemporaryDirectory() as tmp:
        source = args.source
        if args.download:
            subprocess.run([sys.executable, "-m", "pip", "download", f"vllm=={args.download}", "--no-deps",
                            "-d", tmp], check=True)
            source = next(Path(tmp).glob("vllm-*.whl"))
        try:
            derived = derive(read_sources(source))
        except Unreadable as e:
            print(f"{source}: cannot derive the tables ({e}); read the loaders by hand and extend this script")
            return 2
    drift = 0
    for name, value in derived.items():
        pinned = getattr(vllm_contract, name)
        if value == pinned:
            print(f"{name}: as pinned")
        else:
            drift += 1
            print(f"{name}: DIFFERS from nvfp4_pp/vllm_contract.py; the release has\n{name} = {pprint.pformat(value, width=110)}")
    print(f"{source.name}: {drift} table(s) drifted from vLLM {vllm_contract.VLLM_RELEASE}" if drift else
          f"{source.name}: reproduces every pinned table of vLLM {vllm_contract.VLLM_RELEASE}")
    return 1 if drift else 0


if __name__ == "__main__":
    sys.exit(main())
