"""A written checkpoint against what vLLM's loader needs, without a GPU.

`python -m nvfp4_pp.verify DIR [--source MODEL]` prints one line per problem, naming the tensor or
field, and exits non-zero if there is any. `verify(DIR, SOURCE)` returns the same lines; the run
calls it on the assembled checkpoint before renaming it into place.

The contract is written down here from vLLM's loaders (0.8-0.33), independently of the writer in
formats/, so a writer bug cannot hide behind a shared table. vLLM itself is silent about most of
these: a missing input scale stays `torch.empty`, unequal fused scales are mis-scaled by `.max()`,
a NaN scale gives garbage on Blackwell and looks fine on Hopper's weight-only fallback.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import re
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from .fp8_source import CONFIG_KEYS as SOURCE_QUANT_KEYS
from .source import SourceError, read_safetensors_header

BLOCK = 16
SCALAR = ((), (1,))


@dataclasses.dataclass(frozen=True)
class Contract:
    """What one quantized Linear [out, in] must carry in a layout."""

    packed: str
    block_scale: str
    weight_scale: str
    input_scale: str
    global_form: bool
    """Per-tensor scales stored as 2688 / amax (compressed-tensors) rather than amax / 2688 (modelopt)."""

    def expected(self, out: int, inp: int) -> dict[str, tuple[str, tuple[tuple[int, ...], ...]]]:
        """suffix -> (safetensors dtype, allowed shapes)."""
        return {
            self.packed: ("U8", ((out, inp // 2),)),
            self.block_scale: ("F8_E4M3", ((out, inp // BLOCK),)),
            self.weight_scale: ("F32", SCALAR),
            self.input_scale: ("F32", SCALAR),
        }


CONTRACTS = {
    "modelopt": Contract(".weight", ".weight_scale", ".weight_scale_2", ".input_scale", global_form=False),
    "compressed-tensors": Contract(".weight_packed", ".weight_scale", ".weight_global_scale",
                                   ".input_global_scale", global_form=True),
}
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
"""vLLM's packed modules: parts loaded into one kernel with one global and one input scale."""
OPTIONAL_SUFFIXES = (".bias", ".k_scale", ".v_scale")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def _json(path: Path, problems: list[str]) -> dict | None:
    if not path.is_file():
        problems.append(f"{path.name}: missing")
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        problems.append(f"{path.name}: not valid JSON ({e})")
        return None


def _ignored(module: str, patterns: list[str], method: str) -> bool:
    """vLLM's matching: compressed-tensors exact names or `re:` + re.match; modelopt `*` wildcards."""
    for p in patterns:
        if method == "compressed-tensors":
            if (p.startswith("re:") and re.match(p[3:], module)) or p == module:
                return True
        elif fnmatch.fnmatchcase(module, p) or module.startswith(p + "."):
            return True
    return False


def _check_quant_config(directory: Path, qc: dict, problems: list[str]) -> tuple[str | None, list[str]]:
    """The quantization_config block; returns (format, ignore list)."""
    method = qc.get("quant_method")
    if method not in CONTRACTS:
        problems.append(f"config.json quantization_config.quant_method: {method!r} is not one of {sorted(CONTRACTS)}")
        return None, []
    if method == "compressed-tensors":
        ignore = qc.get("ignore") or []
        if qc.get("format") != "nvfp4-pack-quantized":
            problems.append(f"quantization_config.format: {qc.get('format')!r}, expected 'nvfp4-pack-quantized'")
        if qc.get("quantization_status") != "compressed":
            problems.append(f"quantization_config.quantization_status: {qc.get('quantization_status')!r}, "
                            "expected 'compressed' (transformers refuses packed weights otherwise)")
        groups = qc.get("config_groups") or {}
        if len(groups) != 1:
            problems.append(f"quantization_config.config_groups: {len(groups)} groups, expected one NVFP4 group")
        for gname, group in groups.items():
            if "Linear" not in (group.get("targets") or []):
                problems.append(f"quantization_config.config_groups.{gname}.targets: {group.get('targets')} lacks 'Linear'")
            for part, dynamic in (("weights", False), ("input_activations", "local")):
                args = group.get(part) or {}
                want = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": BLOCK,
                        "strategy": "tensor_group", "dynamic": dynamic}
                for key, value in want.items():
                    if args.get(key) != value:
                        problems.append(f"quantization_config.config_groups.{gname}.{part}.{key}: "
                                        f"{args.get(key)!r}, expected {value!r}")
        problems.extend(_schema_problems(qc))
    else:
        ignore = qc.get("ignore")
        if qc.get("quant_algo") != "NVFP4":
            problems.append(f"quantization_config.quant_algo: {qc.get('quant_algo')!r}, expected 'NVFP4'")
        if qc.get("group_size", BLOCK) != BLOCK:
            problems.append(f"quantization_config.group_size: {qc.get('group_size')!r}, expected {BLOCK}")
        if ignore is None or qc.get("exclude_modules") != ignore:
            problems.append("quantization_config.ignore / exclude_modules: must both be present and equal "
                            "(vLLM 0.10-0.11 reads exclude_modules, 0.12-0.32 ignore)")
        ignore = ignore or qc.get("exclude_modules") or []
        hf = directory / "hf_quant_config.json"
        if hf.is_file():
            hq = json.loads(hf.read_text()).get("quantization", {})
            if hq.get("quant_algo") != "NVFP4" or hq.get("exclude_modules") != ignore:
                problems.append("hf_quant_config.json: quant_algo / exclude_modules disagree with config.json")
    for p in ignore:
        if p.endswith(".weight"):
            problems.append(f"quantization_config.ignore: {p!r} names a tensor; vLLM matches module names "
                            f"({p.removesuffix('.weight')!r})")
    return method, ignore


def _schema_problems(qc: dict) -> list[str]:
    """Check with compressed-tensors' own schema when the library is installed (it is optional)."""
    try:
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError:
        return []
    try:
        QuantizationConfig.model_validate(qc)
    except ValueError as e:
        return [f"quantization_config: rejected by compressed-tensors' schema: {e}"]
    return []


def _linear_modules(directory: Path, problems: list[str]) -> tuple[dict[str, tuple[int, int]], dict[str, tuple], set[str]] | None:
    """(Linear name -> (out, in), parameter name -> shape, tied parameter names) from config.json, on meta."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(directory)
        config.quantization_config = None
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # transformers raises many types for configs it cannot build
        problems.append(f"config.json: transformers cannot build the model from it ({type(e).__name__}: {e})")
        return None
    linears = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    tied = set()
    seen: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(n)
        seen.setdefault(id(p), n)
    return linears, params, tied


def _check_index(directory: Path, problems: list[str]) -> dict[str, dict] | None:
    """Every tensor's header entry, if the index and the files agree exactly."""
    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        index = _json(index_path, problems)
        weight_map = (index or {}).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            problems.append("model.safetensors.index.json: no weight_map")
            return None
    elif (directory / "model.safetensors").is_file():
        weight_map = None
    else:
        problems.append("model.safetensors.index.json: missing (and no single model.safetensors)")
        return None
    files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
    tensors: dict[str, dict] = {}
    for file in files:
        if not (directory / file).is_file():
            problems.append(f"{file}: named by the index but missing")
            continue
        try:
            header = read_safetensors_header(directory / file)
        except SourceError as e:
            problems.append(f"{file}: {e}")
            continue
        for name, meta in header.items():
            if weight_map is not None and weight_map.get(name) != file:
                problems.append(f"{name}: in {file} but the index says {weight_map.get(name)!r}")
            tensors[name] = {**meta, "file": file}
    if weight_map is not None:
        for name, file in weight_map.items():
            if name not in tensors and (directory / file).is_file():
                problems.append(f"{name}: the index names it in {file}, which does not hold it")
        for stray in sorted({p.name for p in directory.glob("*.safetensors")} - set(files)):
            problems.append(f"{stray}: not named by the index (vLLM would ignore or double-load it)")
    return tensors


def _check_linears(method: str, ignore: list[str], tensors: dict[str, dict], model, problems: list[str]) -> list[str]:
    """Keys, dtypes and shapes per Linear; returns the names of the quantized ones."""
    linears, params, tied = model
    contract = CONTRACTS[method]
    quantized, claimed = [], set()
    for module, (out, inp) in linears.items():
        expected = contract.expected(out, inp)
        present = [s for s in expected if f"{module}{s}" in tensors and s != ".weight"]
        if _ignored(module, ignore, method):
            if present:
                problems.append(f"{module}: listed in ignore but has quantized tensors ({', '.join(present)})")
            continue
        if f"{module}.weight" in tied:
            problems.append(f"{module}: tied to another tensor but not in ignore; vLLM would look for quantized tensors")
            continue
        quantized.append(module)
        for suffix, (dtype, shapes) in expected.items():
            name = f"{module}{suffix}"
            claimed.add(name)
            meta = tensors.get(name)
            if meta is None:
                problems.append(f"{name}: missing (every quantized Linear needs it)")
            elif meta["dtype"] != dtype or tuple(meta["shape"]) not in shapes:
                problems.append(f"{name}: {meta['dtype']}{meta['shape']}, expected {dtype}{list(shapes[0])}")
    expected_plain = {n for n in params if n not in tied and n.removesuffix(".weight") not in quantized}
    for name in sorted(expected_plain - set(tensors)):
        problems.append(f"{name}: missing")
    for name in sorted(set(tensors) - claimed - expected_plain):
        if not name.endswith(OPTIONAL_SUFFIXES):
            problems.append(f"{name}: not a parameter of the model config.json describes (wrong layer count, "
                            "stray or misnamed tensor)")
    for name in sorted(expected_plain & set(tensors)):
        meta = tensors[name]
        if tuple(meta["shape"]) != params[name]:
            problems.append(f"{name}: shape {meta['shape']}, the model needs {list(params[name])}")
    return quantized


def _read(directory: Path, tensors: dict[str, dict], names: list[str]) -> dict[str, torch.Tensor]:
    by_file: dict[str, list[str]] = {}
    for n in names:
        if n in tensors:
            by_file.setdefault(tensors[n]["file"], []).append(n)
    out = {}
    for file, file_names in by_file.items():
        with safe_open(directory / file, "pt") as f:
            for n in file_names:
                out[n] = f.get_tensor(n)
    return out


def _check_scales(directory: Path, method: str, quantized: list[str], tensors: dict[str, dict], problems: list[str]) -> None:
    """Finite positive scales, calibrated input scales, equal scales across fused parts."""
    c = CONTRACTS[method]
    scalars = _read(directory, tensors, [f"{m}{s}" for m in quantized for s in (c.weight_scale, c.input_scale)])
    for name, value in scalars.items():
        v = value.float()
        if not bool(torch.isfinite(v).all()) or not bool((v > 0).all()):
            problems.append(f"{name}: {v.tolist()} is not a finite positive scale")
        elif name.endswith(c.input_scale) and bool((v == 1.0).all()):
            problems.append(f"{name}: exactly 1.0, the uncalibrated placeholder (a constant activation amax of "
                            "2688); calibrate the input quantizers")
    for module in quantized:
        name = f"{module}{c.block_scale}"
        if name in tensors and tensors[name]["dtype"] == "F8_E4M3":
            block = _read(directory, tensors, [name])[name].float()
            bad = int((~torch.isfinite(block)).sum()), int((block <= 0).sum())
            if any(bad):
                problems.append(f"{name}: {bad[0]} NaN and {bad[1]} zero or negative block scales")
    groups: dict[tuple[str, str], list[str]] = {}
    for module in quantized:
        parent, _, leaf = module.rpartition(".")
        for fused, parts in FUSED.items():
            if leaf in parts:
                groups.setdefault((parent, fused), []).append(module)
    for (parent, fused), members in sorted(groups.items()):
        for suffix in (c.weight_scale, c.input_scale):
            values = {m: scalars.get(f"{m}{suffix}") for m in members}
            known = {m: v.float().reshape(-1)[0].item() for m, v in values.items() if v is not None and v.numel()}
            if len(set(known.values())) > 1:
                listing = ", ".join(f"{m.rpartition('.')[2]}={v:.6g}" for m, v in known.items())
                problems.append(f"{parent}.{fused}{suffix}: parts differ ({listing}); vLLM takes one value for the "
                                "fused kernel, the others are silently mis-scaled")


def _check_ignore_agrees(linears: dict, ignore: list[str], method: str, problems: list[str]) -> None:
    for module in linears:
        parent, _, leaf = module.rpartition(".")
        for fused, parts in FUSED.items():
            if leaf == parts[0]:
                states = {p: _ignored(f"{parent}.{p}", ignore, method) for p in parts if f"{parent}.{p}" in linears}
                if len(set(states.values())) > 1:
                    problems.append(f"{parent}.{fused}: ignore covers only some parts {states}; fused parts must agree")


def _check_source(directory: Path, config: dict, source: Path, problems: list[str]) -> None:
    if not (source / "config.json").is_file():
        problems.append(f"source {source}: has no config.json to compare with")
        return
    src_config = json.loads((source / "config.json").read_text())
    for key in sorted((set(src_config) | set(config)) - set(SOURCE_QUANT_KEYS)):
        if src_config.get(key) != config.get(key):
            problems.append(f"config.json {key}: {config.get(key)!r}, the source has {src_config.get(key)!r}")
    for f in sorted(source.glob("*")):
        if f.is_file() and (f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja")):
            if not (directory / f.name).is_file():
                problems.append(f"{f.name}: in the source but missing")


def verify(directory: str | Path, source: str | Path | None = None) -> list[str]:
    """Every problem found in `directory`, one line each, naming the tensor or field (empty: fine)."""
    directory = Path(directory)
    problems: list[str] = []
    if not directory.is_dir():
        return [f"{directory}: not a directory"]
    config = _json(directory / "config.json", problems)
    tensors = _check_index(directory, problems)
    if not any((directory / f).is_file() for f in TOKENIZER_FILES) or not (directory / "tokenizer_config.json").is_file():
        problems.append("tokenizer: tokenizer_config.json and tokenizer.json (or tokenizer.model) are required")
    if source is not None:
        _check_source(directory, config or {}, Path(source), problems)
    if config is None:
        return problems
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        problems.append("config.json quantization_config: missing; vLLM would load the model unquantized")
        return problems
    method, ignore = _check_quant_config(directory, qc, problems)
    model = _linear_modules(directory, problems)
    if method is None or model is None or tensors is None:
        return problems
    _check_ignore_agrees(model[0], ignore, method, problems)
    quantized = _check_linears(method, ignore, tensors, model, problems)
    _check_scales(directory, method, quantized, tensors, problems)
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nvfp4_pp.verify", description=__doc__.splitlines()[0])
    p.add_argument("directory", type=Path, help="the quantized checkpoint")
    p.add_argument("--source", type=Path, help="the BF16 source: config fields and tokenizer files must match it")
    args = p.parse_args(argv)
    problems = verify(args.directory, args.source)
    for line in problems:
        print(line)
    print(f"{args.directory}: {len(problems)} problem(s)" if problems else f"{args.directory}: OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
