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

SCALAR = ((), (1,))


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One tensor a quantized Linear [out, in] carries: name suffix, dtype, shape and role."""

    suffix: str
    dtype: str
    shape: str
    """"scalar", "full" [out, in], "packed" [out, in/2], or "per-N" [out, in/N] block scales."""
    role: str = ""
    """"weight_scale" / "input_scale" for per-tensor scales (checked finite, fused parts equal)."""

    def shapes(self, out: int, inp: int) -> tuple[tuple[int, ...], ...]:
        if self.shape == "scalar":
            return SCALAR
        if self.shape == "full":
            return ((out, inp),)
        if self.shape == "packed":
            return ((out, inp // 2),)
        return ((out, inp // int(self.shape.removeprefix("per-"))),)


@dataclasses.dataclass(frozen=True)
class Contract:
    """What one quantized Linear of one scheme must carry in one layout."""

    tensors: tuple[Tensor, ...]
    global_form: bool = False
    """Per-tensor scales stored as 2688 / amax (compressed-tensors NVFP4) rather than amax / 2688."""
    fused_equal: tuple[str, ...] = ("weight_scale", "input_scale")
    """Roles vLLM reads once for a fused q/k/v or gate/up kernel: the parts must agree."""


_NVFP4_MO = (Tensor(".weight", "U8", "packed"), Tensor(".weight_scale", "F8_E4M3", "per-16"),
             Tensor(".weight_scale_2", "F32", "scalar", "weight_scale"))
_NVFP4_CT = (Tensor(".weight_packed", "U8", "packed"), Tensor(".weight_scale", "F8_E4M3", "per-16"),
             Tensor(".weight_global_scale", "F32", "scalar", "weight_scale"))
_FP8 = (Tensor(".weight", "F8_E4M3", "full"), Tensor(".weight_scale", "F32", "scalar", "weight_scale"),
        Tensor(".input_scale", "F32", "scalar", "input_scale"))
_FP8_FUSED = ("input_scale",)  # vLLM requantizes FP8 parts to the max weight scale itself
CONTRACTS: dict[str, dict[str, Contract]] = {
    "modelopt": {
        "nvfp4": Contract(_NVFP4_MO + (Tensor(".input_scale", "F32", "scalar", "input_scale"),)),
        "nvfp4_awq": Contract(_NVFP4_MO + (Tensor(".input_scale", "F32", "scalar", "input_scale"),)),
        "w4a16_nvfp4": Contract(_NVFP4_MO),
        "fp8": Contract(_FP8, fused_equal=_FP8_FUSED),
        "mxfp4": Contract((Tensor(".weight", "U8", "packed"), Tensor(".weight_scale", "U8", "per-32")), fused_equal=()),
    },
    "compressed-tensors": {
        "nvfp4": Contract(_NVFP4_CT + (Tensor(".input_global_scale", "F32", "scalar", "input_scale"),), True),
        "w4a16_nvfp4": Contract(_NVFP4_CT, True),
        "fp8": Contract(_FP8, fused_equal=_FP8_FUSED),
        "mxfp4": Contract((Tensor(".weight_packed", "U8", "packed"), Tensor(".weight_scale", "U8", "per-32")),
                          fused_equal=()),
    },
}
"""Layout -> scheme -> contract, from vLLM's loaders (ModelOpt{Fp8,NvFp4,MixedPrecision}Config;
compressed-tensors W4A4Fp4, W4A16Fp4, W8A8Fp8, MXFP4)."""
MODELOPT_ALGOS = {"NVFP4": "nvfp4", "NVFP4_AWQ": "nvfp4_awq", "W4A16_NVFP4": "w4a16_nvfp4", "FP8": "fp8",
                  "MXFP4": "mxfp4"}
"""modelopt quant_algo -> scheme (modelopt 0.47 writes MXFP4 layers as lower-case "mxfp4")."""
_CT_FP4 = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group"}
_CT_MX = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 32, "strategy": "group"}
_CT_FP8 = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor"}
CT_SCHEMES: dict[str, tuple[str, dict | None, dict | None]] = {
    "nvfp4": ("nvfp4-pack-quantized", {**_CT_FP4, "dynamic": False}, {**_CT_FP4, "dynamic": "local"}),
    "w4a16_nvfp4": ("nvfp4-pack-quantized", {**_CT_FP4, "dynamic": False}, None),
    "fp8": ("float-quantized", {**_CT_FP8, "dynamic": False}, {**_CT_FP8, "dynamic": False}),
    "mxfp4": ("mxfp4-pack-quantized", {**_CT_MX, "dynamic": False}, {**_CT_MX, "dynamic": True}),
}
"""compressed-tensors scheme -> (format, weights args, input_activations args) that readers need."""
KV_SCALE_NAMES = {"modelopt": (".k_proj.k_scale", ".v_proj.v_scale"),
                  "compressed-tensors": (".k_scale", ".v_scale")}
"""Where vLLM looks for FP8 KV-cache scales, relative to the attention module."""
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
"""vLLM's packed modules: parts loaded into one kernel with one global and one input scale."""
OPTIONAL_SUFFIXES = (".bias", ".k_scale", ".v_scale", ".pre_quant_scale")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclasses.dataclass
class QuantLayout:
    """What the config says: the layout, ignore list, per-module scheme rule and KV cache."""

    method: str
    ignore: list[str]
    default_scheme: str | None
    """Scheme of every Linear not ignored (one-scheme configs), else None."""
    by_module: dict[str, str]
    """Scheme per module name (mixed-precision configs)."""
    patterns: list[tuple[str, str]]
    """(compressed-tensors `re:` target, scheme) of mixed configs."""
    kv_cache: bool

    def scheme_of(self, module: str) -> str | None:
        if module in self.by_module:
            return self.by_module[module]
        for pattern, scheme in self.patterns:
            if re.match(pattern, module):
                return scheme
        return self.default_scheme


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


def _check_quant_config(directory: Path, qc: dict, problems: list[str]) -> QuantLayout | None:
    """The quantization_config block; returns what it declares, or None if the layout is unknown."""
    method = qc.get("quant_method")
    if method not in CONTRACTS:
        problems.append(f"config.json quantization_config.quant_method: {method!r} is not one of {sorted(CONTRACTS)}")
        return None
    layout = (_ct_layout if method == "compressed-tensors" else _modelopt_layout)(directory, qc, problems)
    for p in layout.ignore:
        if p.endswith(".weight"):
            problems.append(f"quantization_config.ignore: {p!r} names a tensor; vLLM matches module names "
                            f"({p.removesuffix('.weight')!r})")
    return layout


def _ct_scheme(gname: str, group: dict, problems: list[str]) -> str | None:
    """The scheme whose weights args a compressed-tensors group carries (and its other fields checked)."""
    weights = group.get("weights") or {}
    for scheme, (_, want_w, want_in) in CT_SCHEMES.items():
        if all(weights.get(k) == v for k, v in want_w.items()) and ((group.get("input_activations") is None) == (want_in is None)):
            for key, value in (want_in or {}).items():
                got = (group.get("input_activations") or {}).get(key)
                if got != value:
                    problems.append(f"quantization_config.config_groups.{gname}.input_activations.{key}: {got!r}, "
                                    f"expected {value!r}")
            return scheme
    problems.append(f"quantization_config.config_groups.{gname}: weights {weights} / input_activations "
                    f"{group.get('input_activations')} match none of the schemes {sorted(CT_SCHEMES)}")
    return None


def _ct_layout(directory: Path, qc: dict, problems: list[str]) -> QuantLayout:
    layout = QuantLayout("compressed-tensors", qc.get("ignore") or [], None, {}, [], qc.get("kv_cache_scheme") is not None)
    if qc.get("quantization_status") != "compressed":
        problems.append(f"quantization_config.quantization_status: {qc.get('quantization_status')!r}, "
                        "expected 'compressed' (transformers refuses packed weights otherwise)")
    groups = qc.get("config_groups") or {}
    if not groups:
        problems.append("quantization_config.config_groups: none; vLLM would load the model unquantized")
    formats = set()
    for gname, group in groups.items():
        scheme = _ct_scheme(gname, group, problems)
        if scheme is None:
            continue
        fmt = CT_SCHEMES[scheme][0]
        formats.add(fmt)
        if len(groups) > 1 and group.get("format") != fmt:
            problems.append(f"quantization_config.config_groups.{gname}.format: {group.get('format')!r}, expected {fmt!r}")
        for target in group.get("targets") or []:
            if target == "Linear":
                layout.default_scheme = scheme
            elif target.startswith("re:"):
                layout.patterns.append((target[3:], scheme))
            else:
                layout.by_module[target] = scheme
    want = "mixed-precision" if len(groups) > 1 else next(iter(formats), None)
    if want is not None and qc.get("format") != want:
        problems.append(f"quantization_config.format: {qc.get('format')!r}, expected {want!r}")
    kv = qc.get("kv_cache_scheme")
    if kv is not None and not (kv.get("num_bits") == 8 and kv.get("type") == "float" and kv.get("dynamic") is False):
        problems.append(f"quantization_config.kv_cache_scheme: {kv}, expected static FP8 (num_bits 8, float, dynamic false)")
    problems.extend(_schema_problems(qc))
    return layout


def _modelopt_layout(directory: Path, qc: dict, problems: list[str]) -> QuantLayout:
    ignore = qc.get("ignore")
    algo = qc.get("quant_algo")
    layout = QuantLayout("modelopt", [], None, {}, [], bool(qc.get("kv_cache_quant_algo") or qc.get("kv_cache_scheme")))
    if algo == "MIXED_PRECISION":
        for module, layer in (qc.get("quantized_layers") or {}).items():
            scheme = MODELOPT_ALGOS.get(str(layer.get("quant_algo")).upper())
            if scheme is None:
                problems.append(f"quantization_config.quantized_layers.{module}.quant_algo: {layer.get('quant_algo')!r} "
                                f"is not one of {sorted(MODELOPT_ALGOS)}")
            else:
                layout.by_module[module] = scheme
        if not layout.by_module:
            problems.append("quantization_config.quantized_layers: empty for quant_algo MIXED_PRECISION")
    elif str(algo).upper() in MODELOPT_ALGOS:
        layout.default_scheme = MODELOPT_ALGOS[str(algo).upper()]
        want_group = CONTRACTS["modelopt"][layout.default_scheme].tensors[1].shape
        if want_group.startswith("per-") and qc.get("group_size", int(want_group[4:])) != int(want_group[4:]):
            problems.append(f"quantization_config.group_size: {qc.get('group_size')!r}, expected {want_group[4:]}")
    else:
        problems.append(f"quantization_config.quant_algo: {algo!r}, expected one of "
                        f"{sorted(MODELOPT_ALGOS) + ['MIXED_PRECISION']}")
    if algo != "MIXED_PRECISION" and (ignore is None or qc.get("exclude_modules") != ignore):
        problems.append("quantization_config.ignore / exclude_modules: must both be present and equal "
                        "(vLLM 0.10-0.11 reads exclude_modules, 0.12-0.32 ignore)")
    layout.ignore = ignore or qc.get("exclude_modules") or []
    hf = directory / "hf_quant_config.json"
    if hf.is_file():
        hq = json.loads(hf.read_text()).get("quantization", {})
        if hq.get("quant_algo") != algo or (algo != "MIXED_PRECISION" and hq.get("exclude_modules") != layout.ignore):
            problems.append("hf_quant_config.json: quant_algo / exclude_modules disagree with config.json")
    return layout


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


def _checkpoint_names(model: torch.nn.Module, stored: set[str]) -> dict[str, str]:
    """In-memory parameter name -> the name a checkpoint stores it under.

    transformers renames some models' weights on load (image-text models: `language_model.model.*`
    on disk, `model.language_model.*` in memory) and back on save; checkpoints of either layout
    exist, so the one sharing more names with `stored` is taken.
    """
    state = {n: torch.empty(0, device="meta") for n in model.state_dict(keep_vars=True)}
    by_tensor = {id(t): n for n, t in state.items()}
    try:
        from transformers.core_model_loading import revert_weight_conversion

        reverted = revert_weight_conversion(model, dict(state))
    except Exception:  # no such transformers API, or conversions that need real tensors: in-memory names
        return {n: n for n in state}
    on_disk = {by_tensor[id(t)]: n for n, t in reverted.items() if id(t) in by_tensor}
    if len(on_disk) != len(state) or len(set(on_disk.values()) & stored) <= len(set(state) & stored):
        return {n: n for n in state}
    return on_disk


def _linear_modules(directory: Path, tensors: dict[str, dict] | None, problems: list[str]) -> tuple[dict[str, tuple[int, int]], dict[str, tuple], set[str]] | None:
    """(Linear name -> (out, in), parameter name -> shape, tied parameter names) from config.json, on
    meta, under the names the checkpoint stores them."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    try:
        config = AutoConfig.from_pretrained(directory)
        config.quantization_config = None
        auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
        with torch.device("meta"):
            model = auto.from_config(config)
    except Exception as e:  # transformers raises many types for configs it cannot build
        problems.append(f"config.json: transformers cannot build the model from it ({type(e).__name__}: {e})")
        return None
    name = _checkpoint_names(model, set(tensors or ()))
    linears = {name.get(f"{n}.weight", f"{n}.weight").removesuffix(".weight"): (m.out_features, m.in_features)
               for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    params = {name.get(n, n): tuple(p.shape) for n, p in model.named_parameters()}
    tied = set()
    seen: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name.get(n, n))
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


def _check_linears(layout: QuantLayout, tensors: dict[str, dict], model, problems: list[str]) -> dict[str, str]:
    """Keys, dtypes and shapes per Linear; returns the quantized ones with their scheme."""
    linears, params, tied = model
    contracts = CONTRACTS[layout.method]
    every_suffix = {t.suffix for c in contracts.values() for t in c.tensors} - {".weight"}
    quantized: dict[str, str] = {}
    claimed = set()
    for module, (out, inp) in linears.items():
        scheme = None if _ignored(module, layout.ignore, layout.method) else layout.scheme_of(module)
        if scheme is None:
            present = sorted(s for s in every_suffix if f"{module}{s}" in tensors)
            if present:
                why = "listed in ignore" if _ignored(module, layout.ignore, layout.method) else "no config group covers it"
                problems.append(f"{module}: {why} but has quantized tensors ({', '.join(present)})")
            continue
        if f"{module}.weight" in tied:
            problems.append(f"{module}: tied to another tensor but not in ignore; vLLM would look for quantized tensors")
            continue
        if scheme not in contracts:
            problems.append(f"{module}: scheme {scheme} has no {layout.method} layout")
            continue
        quantized[module] = scheme
        for t in contracts[scheme].tensors:
            name = f"{module}{t.suffix}"
            claimed.add(name)
            meta = tensors.get(name)
            shapes = t.shapes(out, inp)
            if meta is None:
                problems.append(f"{name}: missing (every {scheme} Linear needs it)")
            elif meta["dtype"] != t.dtype or tuple(meta["shape"]) not in shapes:
                problems.append(f"{name}: {meta['dtype']}{meta['shape']}, expected {t.dtype}{list(shapes[0])} ({scheme})")
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


def _check_kv_cache(layout: QuantLayout, linears: dict, tensors: dict[str, dict], problems: list[str]) -> list[str]:
    """A declared KV cache needs a K and a V scale on every attention module (vLLM uses 1.0 silently
    otherwise); returns their names."""
    if not layout.kv_cache:
        return []
    names = []
    for module in linears:
        if module.endswith(".k_proj"):
            attention = module.removesuffix(".k_proj")
            for suffix in KV_SCALE_NAMES[layout.method]:
                name = attention + suffix
                names.append(name)
                meta = tensors.get(name)
                if meta is None:
                    problems.append(f"{name}: missing (the config declares an FP8 KV cache; vLLM would use 1.0)")
                elif meta["dtype"] != "F32" or tuple(meta["shape"]) not in SCALAR:
                    problems.append(f"{name}: {meta['dtype']}{meta['shape']}, expected F32[]")
    return names


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


def _byte_counts(t: torch.Tensor) -> torch.Tensor:
    """How often each byte value occurs in `t`: one pass over the raw bytes, so checking the block
    scales of a 70B stage costs milliseconds per Linear rather than seconds of elementwise masks."""
    return torch.bincount(t.reshape(-1).view(torch.uint8), minlength=256)


def _check_scales(directory: Path, method: str, quantized: dict[str, str], kv_names: list[str],
                  tensors: dict[str, dict], problems: list[str]) -> None:
    """Finite positive scales, calibrated input scales, sane block scales, equal scales across fused parts."""
    contracts = CONTRACTS[method]
    roles = {f"{m}{t.suffix}": t.role for m, s in quantized.items() for t in contracts[s].tensors if t.role}
    scalars = _read(directory, tensors, [*roles, *kv_names])
    for name, value in scalars.items():
        v = value.float()
        if not bool(torch.isfinite(v).all()) or not bool((v > 0).all()):
            problems.append(f"{name}: {v.tolist()} is not a finite positive scale")
        elif roles.get(name) == "input_scale" and bool((v == 1.0).all()):
            problems.append(f"{name}: exactly 1.0, the uncalibrated placeholder (a constant activation amax); "
                            "calibrate the input quantizers")
    for module, scheme in quantized.items():
        block = next((t for t in contracts[scheme].tensors if t.shape.startswith("per-")), None)
        name = f"{module}{block.suffix}" if block else None
        if name in tensors and tensors[name]["dtype"] == block.dtype == "F8_E4M3":
            # E4M3FN is NaN when exponent and mantissa are all ones (0x7F, 0xFF), and <= 0 when the
            # byte is 0 or the sign bit is set.
            counts = _byte_counts(_read(directory, tensors, [name])[name])
            nan, bad = int(counts[0x7F] + counts[0xFF]), int(counts[0] + counts[0x80:0xFF].sum())
            if nan or bad:
                problems.append(f"{name}: {nan} NaN and {bad} zero or negative block scales")
        elif name in tensors and tensors[name]["dtype"] == block.dtype == "U8":
            nan = int(_byte_counts(_read(directory, tensors, [name])[name])[0xFF])  # E8M0 0xFF is NaN
            if nan:
                problems.append(f"{name}: {nan} NaN (0xFF) E8M0 block scales")
    groups: dict[tuple[str, str], list[str]] = {}
    for module in quantized:
        parent, _, leaf = module.rpartition(".")
        for fused, parts in FUSED.items():
            if leaf in parts:
                groups.setdefault((parent, fused), []).append(module)
    for (parent, fused), members in sorted(groups.items()):
        schemes = {quantized[m] for m in members}
        if len(schemes) > 1:
            problems.append(f"{parent}.{fused}: parts have different schemes {sorted(schemes)}; vLLM loads one kernel")
            continue
        contract = contracts[schemes.pop()]
        for t in contract.tensors:
            if t.role not in contract.fused_equal:
                continue
            values = {m: scalars.get(f"{m}{t.suffix}") for m in members}
            known = {m: v.float().reshape(-1)[0].item() for m, v in values.items() if v is not None and v.numel()}
            if len(set(known.values())) > 1:
                listing = ", ".join(f"{m.rpartition('.')[2]}={v:.6g}" for m, v in known.items())
                problems.append(f"{parent}.{fused}{t.suffix}: parts differ ({listing}); vLLM takes one value for the "
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
    layout = _check_quant_config(directory, qc, problems)
    model = _linear_modules(directory, tensors, problems)
    if layout is None or model is None or tensors is None:
        return problems
    _check_ignore_agrees(model[0], layout.ignore, layout.method, problems)
    quantized = _check_linears(layout, tensors, model, problems)
    kv_names = _check_kv_cache(layout, model[0], tensors, problems)
    _check_scales(directory, layout.method, quantized, kv_names, tensors, problems)
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
