"""What vLLM's loaders need from a quantized checkpoint, and what a checkpoint's config declares.

The contract is written down here from vLLM's loaders (0.8-0.33, and the tables of the release it is
pinned to, `VLLM_RELEASE`), independently of the writer in formats/, so a writer bug cannot hide
behind a shared table. `tools/vllm_tables.py` re-derives the pinned tables from that release's
wheel (parsing its source, never importing it) and fails when a release drifts from them. `read_quant_config` turns a
`quantization_config` block into the layout it declares (`QuantLayout`), naming every field a
loader would misread; `verify` checks the tensors against it and `evaluate` decodes by it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
import types
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
loaded into the model dtype whatever they are stored in, `weight_shape`). The modelopt contracts of
`nvfp4_awq`, `mxfp4` and `int4_awq` are modelopt's export, which vLLM VLLM_RELEASE's ModelOpt loader does
not load (`vllm_problems`; MODELOPT_QUANT_ALGOS below); INT4 is written as TensorRT-LLM and SGLang read it:
uint8 [out/2, in] (two output rows per byte, row 2i in the low nibble) and FP32 scales [out, in/128]."""
MODELOPT_ALGOS = {"NVFP4": "nvfp4", "NVFP4_AWQ": "nvfp4_awq", "W4A16_NVFP4": "w4a16_nvfp4", "FP8": "fp8",
                  "MXFP4": "mxfp4", "W4A16_AWQ": "int4_awq"}
"""modelopt quant_algo -> scheme (modelopt 0.47 writes MXFP4 layers as lower-case "mxfp4")."""
_CT_FP4 = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group"}
_CT_MX = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 32, "strategy": "group"}
_CT_FP8 = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor"}
_CT_INT4 = {"num_bits": 4, "type": "int", "symmetric": True, "group_size": 128, "strategy": "group"}
CT_SCHEMES: dict[str, tuple[str, dict, dict | None]] = {
    "nvfp4": ("nvfp4-pack-quantized", {**_CT_FP4, "dynamic": False}, {**_CT_FP4, "dynamic": "local"}),
    "w4a16_nvfp4": ("nvfp4-pack-quantized", {**_CT_FP4, "dynamic": False}, None),
    "fp8": ("float-quantized", {**_CT_FP8, "dynamic": False}, {**_CT_FP8, "dynamic": False}),
    "mxfp4": ("mxfp4-pack-quantized", {**_CT_MX, "dynamic": False}, {**_CT_MX, "dynamic": True}),
    "int4_awq": ("pack-quantized", {**_CT_INT4, "dynamic": False}, None),
}
"""compressed-tensors scheme -> (format, weights args, input_activations args) that readers need."""
# --- vLLM VLLM_RELEASE's loader tables, as tools/vllm_tables.py derives them from its wheel -------------
VLLM_RELEASE = "0.34.0"
"""The vLLM release whose loaders the tables below mirror (re-derive: `python tools/vllm_tables.py --download 0.34.0`)."""
MODELOPT_LINEAR_ALGOS = {'FP8': 'modelopt',
 'FP8_PB_WO': 'modelopt',
 'FP8_PER_CHANNEL_PER_TOKEN': 'modelopt',
 'MXFP8': 'modelopt_mxfp8',
 'NVFP4': 'modelopt_fp4',
 'W4A16_NVFP4': 'modelopt_fp4'}
MODELOPT_QUANT_ALGOS = ('FP8', 'FP8_PER_CHANNEL_PER_TOKEN', 'FP8_PB_WO', 'NVFP4', 'W4A16_NVFP4', 'MXFP8', 'MIXED_PRECISION')
MODELOPT_MIXED_METHOD = 'modelopt_mixed'
MODELOPT_MIXED_LINEAR_ALGOS = ('FP8',
 'FP8_PER_CHANNEL_PER_TOKEN',
 'FP8_PB_WO',
 'NVFP4',
 'W4A16_NVFP4',
 'MXFP8',
 'IQ2_XS',
 'IQ2_XXS',
 'Q8_0')
CT_SCHEME_DISPATCH = (('_is_nvfp4_format(weight_quant)', ('CompressedTensorsW4A4Fp4',)),
 ('_is_mxfp4_w4a8_fp8(weight_quant, input_quant)', ('CompressedTensorsW4A8Mxfp4',)),
 ('_is_mxfp4(weight_quant)', ('CompressedTensorsW4A4Mxfp4',)),
 ('_is_mxfp8(weight_quant)', ('CompressedTensorsW8A8Mxfp8',)),
 ('_is_fp8_w4a8_sm90(weight_quant, input_quant)', ('CompressedTensorsW4A8Fp8',)),
 ('_is_wNa8o8_int(weight_quant, input_quant, output_quant, format)', ('CompressedTensorsWNA8O8Int',)),
 ('_is_wNaM_int(weight_quant, input_quant, format) and input_quant.num_bits == 8',
  ('CompressedTensorsWNA8Int',)),
 ('_is_wNaM_int(weight_quant, input_quant, format) and input_quant.num_bits == 4',
  ('CompressedTensorsWNA4Int',)),
 ("_is_wNa16_group_channel(weight_quant, input_quant) and format == 'pack-quantized'",
  ('CompressedTensorsWNA16',)),
 ('act_quant_format and (_is_fp8_w8a8(weight_quant, input_quant))',
  ('CompressedTensorsW8A16Fp8', 'CompressedTensorsW8A8Fp8')),
 ('act_quant_format and (_is_fp8_w8a16(weight_quant, input_quant))', ('CompressedTensorsW8A16Fp8',)),
 ('act_quant_format and (_is_static_tensor_w8a8(weight_quant, input_quant))', ('CompressedTensorsW8A8Int8',)),
 ('act_quant_format and (_is_dynamic_token_w8a8(weight_quant, input_quant))', ('CompressedTensorsW8A8Int8',)),
 ('act_quant_format and (_is_dynamic_token_w4a8_int(weight_quant, input_quant))',
  ('CompressedTensorsW4A8Int',)))
CT_PREDICATES = {'_is_dynamic_token_w4a8_int': (('weight_quant', 'input_quant'),
                                ('not (not weight_quant or not input_quant)',
                                 "not (weight_quant.type != 'int' or input_quant.type != 'int')",
                                 'weight_quant.num_bits == 4',
                                 'input_quant.num_bits == 8',
                                 "(weight_quant.strategy == 'group' or weight_quant.strategy == 'channel') "
                                 "and input_quant.strategy == 'token'",
                                 'weight_quant.symmetric',
                                 'not weight_quant.dynamic and input_quant.dynamic')),
 '_is_dynamic_token_w8a8': (('weight_quant', 'input_quant'),
                            ('weight_quant.num_bits == input_quant.num_bits == 8',
                             "(weight_quant.strategy == 'tensor' or weight_quant.strategy == 'channel') and "
                             "input_quant.strategy == 'token'",
                             'weight_quant.symmetric',
                             'not weight_quant.dynamic and input_quant.dynamic')),
 '_is_fp8_w4a8': (('weight_quant', 'input_quant'),
                  ('not (not weight_quant or not input_quant)',
                   "not (weight_quant.type != 'int' or input_quant.type != 'float')",
                   'weight_quant.num_bits == 4',
                   'input_quant.num_bits == 8',
                   "weight_quant.strategy == 'group' and input_quant.strategy == 'token'",
                   'weight_quant.symmetric and input_quant.symmetric',
                   'not weight_quant.dynamic and input_quant.dynamic')),
 '_is_fp8_w4a8_sm90': (('weight_quant', 'input_quant'), ('True', '_is_fp8_w4a8(weight_quant, input_quant)')),
 '_is_fp8_w8a16': (('weight_quant', 'input_quant'),
                   ('not weight_quant is None',
                    "not weight_quant.type != 'float'",
                    'weight_quant.symmetric',
                    'not weight_quant.dynamic',
                    "weight_quant.strategy in ['tensor', 'channel', 'block']")),
 '_is_fp8_w8a8': (('weight_quant', 'input_quant'),
                  ('not (weight_quant is None or input_quant is None)',
                   "not not ((weight_quant.type == 'float' and input_quant.type == 'float') and "
                   'weight_quant.symmetric and (not weight_quant.dynamic) and (weight_quant.strategy in '
                   "['tensor', 'channel', 'block']))",
                   'input_quant.symmetric',
                   "input_quant.strategy == 'tensor'")),
 '_is_mxfp4': (('quant_args',),
               ('not quant_args is None',
                "quant_args.strategy == 'group'",
                "quant_args.type == 'float'",
                'quant_args.num_bits == 4',
                'quant_args.group_size == 32',
                'quant_args.symmetric')),
 '_is_mxfp4_w4a8_fp8': (('weight_quant', 'input_quant'),
                        ('not (not _is_mxfp4(weight_quant) or input_quant is None)',
                         "input_quant.type == 'float'",
                         'input_quant.num_bits == 8',
                         'not weight_quant.dynamic',
                         'bool(input_quant.dynamic)',
                         "input_quant.strategy in ('token', 'group')",
                         'input_quant.symmetric')),
 '_is_mxfp8': (('quant_args',),
               ('not quant_args is None',
                "quant_args.strategy == 'group'",
                "quant_args.type == 'float'",
                'quant_args.num_bits == 8',
                'quant_args.group_size == 32',
                'quant_args.symmetric',
                "quant_args.scale_dtype == 'uint8'")),
 '_is_nvfp4_format': (('quant_args',),
                      ('not quant_args is None',
                       "quant_args.strategy == 'tensor_group'",
                       "quant_args.type == 'float'",
                       'quant_args.num_bits == 4',
                       'quant_args.group_size == 16',
                       'quant_args.symmetric')),
 '_is_static_tensor_w8a8': (('weight_quant', 'input_quant'),
                            ('weight_quant.num_bits == input_quant.num_bits == 8',
                             "(weight_quant.strategy == 'tensor' or weight_quant.strategy == 'channel') and "
                             "input_quant.strategy == 'tensor'",
                             'weight_quant.symmetric',
                             'not weight_quant.dynamic and (not input_quant.dynamic)')),
 '_is_wNa16_group_channel': (('weight_quant', 'input_quant'),
                             ("weight_quant.strategy == 'channel' or weight_quant.strategy == 'group'",
                              'input_quant is None',
                              'not weight_quant.dynamic')),
 '_is_wNa8o8_int': (('weight_quant', 'input_quant', 'output_quant', 'format'),
                    ("(weight_quant.type == 'int' and (not weight_quant.dynamic)) and weight_quant.strategy "
                     "in ('channel', 'group') and (format in ('pack-quantized', 'int-quantized'))",
                     "(input_quant is not None and input_quant.type == 'int' and (input_quant.strategy == "
                     "'tensor') and (input_quant.num_bits == 8) and (not input_quant.dynamic)) and "
                     "(output_quant is not None and output_quant.type == 'int' and (output_quant.strategy == "
                     "'tensor') and (output_quant.num_bits == 8) and (not output_quant.dynamic))")),
 '_is_wNaM_int': (('weight_quant', 'input_quant', 'format'),
                  ('not input_quant is None',
                   "weight_quant.type == 'int' and (not weight_quant.dynamic)",
                   "weight_quant.strategy in ('channel', 'group')",
                   "format == 'pack-quantized'",
                   "input_quant.type == 'int'",
                   'input_quant.symmetric',
                   'input_quant.dynamic',
                   "input_quant.strategy in ('token', 'group')"))}
CT_ACTIVATION_FORMATS = ('naive-quantized', 'int-quantized', 'float-quantized', 'nvfp4-pack-quantized')
"""MODELOPT_LINEAR_ALGOS: ModelOpt `quant_algo` -> the `--quantization` method whose config loads it;
MODELOPT_QUANT_ALGOS: every top-level `quant_algo` the ModelOpt loader accepts (anything else stops with
"ModelOpt currently only supports"); under MIXED_PRECISION (method MODELOPT_MIXED_METHOD) a Linear whose
upper-cased per-layer `quant_algo` is not in MODELOPT_MIXED_LINEAR_ALGOS gets an unquantized method, so
its packed weights meet BF16 parameters. CT_SCHEME_DISPATCH: compressed-tensors' per-group scheme choice
in order (the first test that holds wins; no test holding stops the load); CT_PREDICATES: each test's
parameters and the conditions that must all hold (an early `return True` of vLLM's is left out, so
they are never looser than vLLM; a GPU-capability check counts as met; a `raise` inside a chosen
branch is not modelled: vLLM 0.34 stops on NVFP4 weights whose input activations are neither NVFP4 nor
absent, which CT_SCHEMES never writes); CT_ACTIVATION_FORMATS: the formats `act_quant_format` stands for."""

CT_ARG_DEFAULTS = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": None,
                   "dynamic": False, "scale_dtype": None}
"""compressed-tensors' QuantizationArgs defaults, for fields a config group leaves out."""


def _holds(expression: str, namespace: dict) -> bool:
    """One pinned condition on the config's arguments (an attribute of a missing argument: not met)."""
    try:
        return bool(eval(expression, {"__builtins__": {}}, namespace))  # noqa: S307 - our own pinned table
    except (AttributeError, TypeError):
        return False


def ct_vllm_schemes(fmt: str | None, weights: dict | None, inputs: dict | None) -> tuple[str, ...]:
    """The scheme class(es) vLLM VLLM_RELEASE gives a compressed-tensors group (several: chosen by GPU);
    empty when no test of its dispatch holds and the load stops."""
    def args(raw: dict | None):
        return None if raw is None else types.SimpleNamespace(**{**CT_ARG_DEFAULTS, **raw})

    namespace = {"weight_quant": args(weights), "input_quant": args(inputs), "output_quant": None, "format": fmt,
                 "act_quant_format": fmt in CT_ACTIVATION_FORMATS, "bool": bool}
    predicates: dict = {}

    def predicate(params: tuple[str, ...], conditions: tuple[str, ...]):
        return lambda *values: all(_holds(c, {**predicates, "bool": bool, **dict(zip(params, values))})
                                   for c in conditions)

    predicates.update({name: predicate(*spec) for name, spec in CT_PREDICATES.items()})
    namespace.update(predicates)
    return next((schemes for test, schemes in CT_SCHEME_DISPATCH if _holds(test, namespace)), ())


def vllm_method(qc: dict) -> str | None:
    """vLLM VLLM_RELEASE's `--quantization` method for a modelopt config (None: compressed-tensors, which it
    detects, or a config it does not load)."""
    if qc.get("quant_method") != "modelopt":
        return None
    algo = str(qc.get("quant_algo", "")).upper()
    return MODELOPT_MIXED_METHOD if algo == "MIXED_PRECISION" else MODELOPT_LINEAR_ALGOS.get(algo)


def vllm_problems(qc: dict) -> list[str]:
    """Why vLLM VLLM_RELEASE cannot load a checkpoint with this `quantization_config`, one short reason
    each (empty: its loader tables take every Linear)."""
    if qc.get("quant_method") == "modelopt":
        algo = str(qc.get("quant_algo", "")).upper()
        if algo not in MODELOPT_QUANT_ALGOS:
            return [f"its ModelOpt loader takes quant_algo {', '.join(MODELOPT_QUANT_ALGOS)}, not {algo}"]
        layers = (qc.get("quantized_layers") or {}) if algo == "MIXED_PRECISION" else {}
        algos = {str(v.get("quant_algo", "")).upper() for v in layers.values()}
        left = sorted(algos - set(MODELOPT_MIXED_LINEAR_ALGOS))
        if left:
            return [f"its MIXED_PRECISION loader leaves the Linears of quant_algo {', '.join(left)} unquantized "
                    "(their packed weights meet BF16 parameters)"]
        return []
    problems = []
    for name, group in (qc.get("config_groups") or {}).items():
        fmt = group.get("format") or qc.get("format")
        if not ct_vllm_schemes(fmt, group.get("weights"), group.get("input_activations")):
            problems.append(f"no compressed-tensors scheme of it takes config group {name} (format {fmt})")
    return problems


def declared_config(method: str, schemes: list[str]) -> dict | None:
    """The loader-relevant part of the `quantization_config` a layout declares for these schemes (one
    Linear per scheme), as this contract reads layouts; None when the layout has no field for one."""
    if method == "modelopt":
        algos = {s: next(a for a, scheme in MODELOPT_ALGOS.items() if scheme == s) for s in schemes}
        if len(schemes) == 1:
            return {"quant_method": "modelopt", "quant_algo": algos[schemes[0]]}
        return {"quant_method": "modelopt", "quant_algo": "MIXED_PRECISION",
                "quantized_layers": {f"layer.{s}": {"quant_algo": a} for s, a in algos.items()}}
    if any(s not in CT_SCHEMES for s in schemes):
        return None
    groups = {f"group_{i}": {"format": CT_SCHEMES[s][0], "weights": CT_SCHEMES[s][1],
                             "input_activations": CT_SCHEMES[s][2]} for i, s in enumerate(schemes)}
    return {"quant_method": "compressed-tensors", "config_groups": groups}


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
