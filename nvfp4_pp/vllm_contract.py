"""What vLLM's loaders need from a quantized checkpoint, and what a checkpoint's config declares.

The contract is written down here from vLLM's loaders (0.8-0.33), independently of the writer in
formats/, so a writer bug cannot hide behind a shared table. `read_quant_config` turns a
`quantization_config` block into the layout it declares (`QuantLayout`), naming every field a
loader would misread; `verify` checks the tensors against it and `evaluate` decodes by it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
from pathlib import Path

SCALAR = ((), (1,))


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One tensor a quantized Linear [out, in] carries: name suffix, dtype, shape and role."""

    suffix: str
    dtype: str
    shape: str
    """"scalar", "full" [out, in], "packed" [out, in/2], "packed-rows" [out/2, in] (two output rows per
    byte), "int32x8" [out, in/8], "shape" [2], or "per-N" [out, in/N] block scales."""
    role: str = ""
    """"weight_scale" / "input_scale" for per-tensor scales (checked finite, fused parts equal)."""

    def accepts(self, dtype: str) -> bool:
        return dtype in self.dtype.split("|")

    def shapes(self, out: int, inp: int) -> tuple[tuple[int, ...], ...]:
        if self.shape == "scalar":
            return SCALAR
        if self.shape == "shape":
            return ((2,),)
        if self.shape == "packed-rows":
            return ((out // 2, inp),)
        if self.shape == "int32x8":
            return ((out, inp // 8),)
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
_INT4_MO = (Tensor(".weight", "U8", "packed-rows"), Tensor(".weight_scale", "F32", "per-128"))
_INT4_CT = (Tensor(".weight_packed", "I32", "int32x8"), Tensor(".weight_scale", "BF16|F16|F32", "per-128"),
            Tensor(".weight_shape", "I64", "shape"))
CONTRACTS: dict[str, dict[str, Contract]] = {
    "modelopt": {
        "nvfp4": Contract(_NVFP4_MO + (Tensor(".input_scale", "F32", "scalar", "input_scale"),)),
        "nvfp4_awq": Contract(_NVFP4_MO + (Tensor(".input_scale", "F32", "scalar", "input_scale"),)),
        "w4a16_nvfp4": Contract(_NVFP4_MO),
        "fp8": Contract(_FP8, fused_equal=_FP8_FUSED),
        "mxfp4": Contract((Tensor(".weight", "U8", "packed"), Tensor(".weight_scale", "U8", "per-32")), fused_equal=()),
        "int4_awq": Contract(_INT4_MO, fused_equal=()),
    },
    "compressed-tensors": {
        "nvfp4": Contract(_NVFP4_CT + (Tensor(".input_global_scale", "F32", "scalar", "input_scale"),), True),
        "w4a16_nvfp4": Contract(_NVFP4_CT, True),
        "fp8": Contract(_FP8, fused_equal=_FP8_FUSED),
        "mxfp4": Contract((Tensor(".weight_packed", "U8", "packed"), Tensor(".weight_scale", "U8", "per-32")),
                          fused_equal=()),
        "int4_awq": Contract(_INT4_CT, fused_equal=()),
    },
}
"""Layout -> scheme -> contract, from vLLM's loaders (ModelOpt{Fp8,NvFp4,MixedPrecision}Config;
compressed-tensors W4A4Fp4, W4A16Fp4, W8A8Fp8, MXFP4, WNA16: int32 `weight_packed`, group scales
loaded into the model dtype whatever they are stored in, `weight_shape`). vLLM's ModelOpt loader has
no INT4 (`W4A16_AWQ`) method up to its 2026 main (QUANT_ALGOS: FP8 variants, NVFP4, W4A16_NVFP4,
MXFP8, MIXED_PRECISION); that contract is modelopt's export as TensorRT-LLM and SGLang read it:
uint8 [out/2, in] (two output rows per byte, row 2i in the low nibble) and FP32 scales [out, in/128]."""
MODELOPT_ALGOS = {"NVFP4": "nvfp4", "NVFP4_AWQ": "nvfp4_awq", "W4A16_NVFP4": "w4a16_nvfp4", "FP8": "fp8",
                  "MXFP4": "mxfp4", "W4A16_AWQ": "int4_awq"}
"""modelopt quant_algo -> scheme (modelopt 0.47 writes MXFP4 layers as lower-case "mxfp4")."""
_CT_FP4 = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group"}
_CT_MX = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 32, "strategy": "group"}
_CT_FP8 = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor"}
_CT_INT4 = {"num_bits": 4, "type": "int", "symmetric": True, "group_size": 128, "strategy": "group"}
CT_SCHEMES: dict[str, tuple[str, dict | None, dict | None]] = {
    "nvfp4": ("nvfp4-pack-quantized", {**_CT_FP4, "dynamic": False}, {**_CT_FP4, "dynamic": "local"}),
    "w4a16_nvfp4": ("nvfp4-pack-quantized", {**_CT_FP4, "dynamic": False}, None),
    "fp8": ("float-quantized", {**_CT_FP8, "dynamic": False}, {**_CT_FP8, "dynamic": False}),
    "mxfp4": ("mxfp4-pack-quantized", {**_CT_MX, "dynamic": False}, {**_CT_MX, "dynamic": True}),
    "int4_awq": ("pack-quantized", {**_CT_INT4, "dynamic": False}, None),
}
"""compressed-tensors scheme -> (format, weights args, input_activations args) that readers need."""
KV_SCALE_NAMES = {"modelopt": (".k_proj.k_scale", ".v_proj.v_scale"),
                  "compressed-tensors": (".k_scale", ".v_scale")}
"""Where vLLM looks for FP8 KV-cache scales, relative to the attention module."""
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
"""vLLM's packed modules: parts loaded into one kernel with one global and one input scale."""
OPTIONAL_SUFFIXES = (".bias", ".k_scale", ".v_scale", ".pre_quant_scale")
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


def ignored(module: str, patterns: list[str], method: str) -> bool:
    """vLLM's matching: compressed-tensors exact names or `re:` + re.match; modelopt `*` wildcards."""
    for p in patterns:
        if method == "compressed-tensors":
            if (p.startswith("re:") and re.match(p[3:], module)) or p == module:
                return True
        elif fnmatch.fnmatchcase(module, p) or module.startswith(p + "."):
            return True
    return False


def read_quant_config(directory: Path, qc: dict, problems: list[str]) -> QuantLayout | None:
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
