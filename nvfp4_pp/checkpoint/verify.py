"""A written checkpoint against what vLLM's loader needs, without a GPU, and against what the run wrote.

`check_copy(DIR)` re-hashes every file the run record (`nvfp4_pp.json`) lists with its sha256;
`verify(DIR, SOURCE)` returns the loader contract's lines, one per place; the run calls it on the
assembled checkpoint before renaming it into place, and `python -m nvfp4_pp.verify` (../verify.py)
prints both, one line per root cause.

The contract it checks against lives in vllm_contract.py. vLLM itself is silent about most of
these: a missing input scale stays `torch.empty`, unequal fused scales are mis-scaled by `.max()`,
a NaN scale gives garbage on Blackwell and looks fine on Hopper's weight-only fallback.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from nvfp4_pp.files import sha256_of
from nvfp4_pp.model.fp8_source import CONFIG_KEYS as SOURCE_QUANT_KEYS
from nvfp4_pp.model.source import SourceError, read_safetensors_header
from nvfp4_pp.vllm_contract import (
    CONTRACTS,
    FUSED,
    KV_SCALE_NAMES,
    OPTIONAL_SUFFIXES,
    SCALAR,
    VLLM_RELEASE,
    QuantLayout,
    ignored,
    read_quant_config,
    vllm_problems,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
RECORD = "nvfp4_pp.json"
"""The run record beside a written checkpoint (records.RECORD, not imported: the checker stays independent
of the writers): its config's `serving.target` says who is meant to read it, its `files` what the run
wrote, with their sha256."""


def _run_record(directory: Path) -> dict:
    try:
        record = json.loads((Path(directory) / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def serving_target(directory: Path) -> str:
    """Who the checkpoint is for: the run record's `serving.target`, else vLLM (what a checkpoint without
    one is promised to)."""
    try:
        return _run_record(directory)["config"]["serving"]["target"]
    except (KeyError, TypeError):
        return "vllm"


def _json(path: Path, problems: list[str]) -> dict | None:
    if not path.is_file():
        problems.append(f"{path.name}: missing")
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        problems.append(f"{path.name}: not valid JSON ({e})")
        return None


def _checkpoint_names(model: PreTrainedModel, stored: set[str]) -> dict[str, str]:
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


def _check_index(directory: Path, problems: list[str], lost: set[str]) -> dict[str, dict] | None:
    """Every tensor's header entry, if the index and the files agree exactly. The tensors of a shard that
    is missing or unreadable go into `lost`: the shard's line is their root cause, said once."""
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
        in_file = [n for n, f in (weight_map or {}).items() if f == file]
        if not (directory / file).is_file():
            problems.append(f"{file}: named by the index but missing ({len(in_file)} tensors in it not checked)")
            lost.update(in_file)
            continue
        try:
            header = read_safetensors_header(directory / file)
        except SourceError as e:
            problems.append(f"{file}: {e} ({len(in_file)} tensors in it not checked)")
            lost.update(in_file)
            continue
        for name, meta in header.items():
            if weight_map is not None and weight_map.get(name) != file:
                problems.append(f"{name}: in {file} but the index says {weight_map.get(name)!r}")
            tensors[name] = {**meta, "file": file}
    if weight_map is not None:
        for name, file in weight_map.items():
            if name not in tensors and name not in lost:
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
        scheme = None if ignored(module, layout.ignore, layout.method) else layout.scheme_of(module)
        if scheme is None:
            present = sorted(s for s in every_suffix if f"{module}{s}" in tensors)
            if present:
                why = "listed in ignore" if ignored(module, layout.ignore, layout.method) else "no config group covers it"
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
            elif not t.accepts(meta["dtype"]) or tuple(meta["shape"]) not in shapes:
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
        if block is None:
            continue
        name = f"{module}{block.suffix}"
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
        elif name in tensors and tensors[name]["dtype"] in ("BF16", "F16", "F32") and block.accepts(tensors[name]["dtype"]):
            v = _read(directory, tensors, [name])[name].float()  # INT4 group scales: plain floats
            bad = int((~torch.isfinite(v) | (v <= 0)).sum())
            if bad:
                problems.append(f"{name}: {bad} non-finite, zero or negative group scales")
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


def _check_weight_shapes(directory: Path, method: str, quantized: dict[str, str], linears: dict,
                         tensors: dict[str, dict], problems: list[str]) -> None:
    """compressed-tensors' `weight_shape` ([out, in] before packing) must be the Linear's: its
    decompressor unpacks to that shape (vLLM takes the shape from the model and ignores it)."""
    names = [f"{m}.weight_shape" for m, s in quantized.items()
             if any(t.shape == "shape" for t in CONTRACTS[method][s].tensors)]
    for name, value in _read(directory, tensors, names).items():
        want = list(linears[name.removesuffix(".weight_shape")])
        if value.tolist() != want:
            problems.append(f"{name}: {value.tolist()}, the Linear is {want} (compressed-tensors would unpack "
                            "to the wrong shape)")


def _check_ignore_agrees(linears: dict, ignore: list[str], method: str, problems: list[str]) -> None:
    for module in linears:
        parent, _, leaf = module.rpartition(".")
        for fused, parts in FUSED.items():
            if leaf == parts[0]:
                states = {p: ignored(f"{parent}.{p}", ignore, method) for p in parts if f"{parent}.{p}" in linears}
                if len(set(states.values())) > 1:
                    problems.append(f"{parent}.{fused}: ignore covers only some parts {states}; fused parts must agree")


def _check_ignore_names_linears(model, layout: QuantLayout, problems: list[str]) -> None:
    """compressed-tensors' `ignore` may name only Linears: older vLLM releases (0.7 to at least 0.9)
    consulted it before the layer type and gave any listed layer a Linear method, which has no
    embedding lookup (a model that builds its embedding with the quantization config fails)."""
    if layout.method != "compressed-tensors":
        return
    linears, params, _ = model
    modules = {n.rpartition(".")[0] for n in params}
    for entry in layout.ignore:
        if entry in modules and entry not in linears:
            problems.append(f"quantization_config.ignore: {entry!r} is not a Linear; older vLLM gives every listed "
                            "layer a Linear method (an embedding has none): list only Linears")


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


def verify(directory: str | Path, source: str | Path | None = None, target: str | None = None) -> list[str]:
    """Every place `directory` breaks the loader contract, one line each, naming the tensor or field
    (empty: fine). Tensors of a missing or unreadable shard are covered by that shard's line.
    `target` (default: the run record's `serving.target`, else vllm): for `vllm`, a quantization config
    the pinned vLLM release does not load is a problem; other readers' loaders are not checked."""
    directory = Path(directory)
    problems: list[str] = []
    if not directory.is_dir():
        return [f"{directory}: not a directory"]
    config = _json(directory / "config.json", problems)
    lost: set[str] = set()
    tensors = _check_index(directory, problems, lost)
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
    found = len(problems)
    layout = read_quant_config(directory, qc, problems)
    if len(problems) > found:  # every tensor would be checked against a config that is itself wrong
        return problems
    if (target or serving_target(directory)) == "vllm":
        problems += [f"quantization_config: not vLLM-loadable, vLLM {VLLM_RELEASE} refuses it ({why}); write the "
                     "layout it loads, or name the reader in the run's serving.target" for why in vllm_problems(qc)]
    model = _linear_modules(directory, tensors, problems)
    if layout is None or model is None or tensors is None:
        return problems
    _check_ignore_agrees(model[0], layout.ignore, layout.method, problems)
    _check_ignore_names_linears(model, layout, problems)
    quantized = _check_linears(layout, tensors, model, problems)
    kv_names = _check_kv_cache(layout, model[0], tensors, problems)
    _check_scales(directory, layout.method, quantized, kv_names, tensors, problems)
    _check_weight_shapes(directory, layout.method, quantized, model[0], tensors, problems)
    return [p for p in problems if p.partition(": ")[0] not in lost]


def check_copy(directory: str | Path) -> tuple[list[str], str | None]:
    """Every file the run record lists, re-hashed against the sha256 the run wrote it with: (one line per
    file that is missing or differs, a note when there is nothing to check against)."""
    directory = Path(directory)
    files = _run_record(directory).get("files")
    if not isinstance(files, dict):
        return [], f"{RECORD} lists no file checksums (not written by nvfp4_pp >= 0.2): the copy itself was not checked"
    problems = []
    for name, sha in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            problems.append(f"{name}: listed in {RECORD} but missing (an incomplete copy)")
        elif sha is not None and sha256_of(path) != sha:
            problems.append(f"{name}: sha256 differs from the one the run recorded in {RECORD} (a corrupted copy: "
                            "copy it again from the original)")
    return problems, None


def summarize(problems: list[str]) -> list[str]:
    """One line per kind of problem: the first place it shows, and how many more show it. A kind is the
    text after the tensor or file name with every number blanked, so one wrong group size, one missing
    scale or one wrong layer count across 200 Linears is one line."""
    kinds: dict[str, list[str]] = {}
    for line in problems:
        kinds.setdefault(re.sub(r"\d+", "#", line.partition(": ")[2]) or line, []).append(line)
    return [lines[0] + (f" (and {len(lines) - 1} more like it)" if len(lines) > 1 else "") for lines in kinds.values()]
