"""FP8 sources (issue 12): read stage by stage, dequantised on load, quantized by 3 ranks.

The test writes two FP8 versions of SmolLM2 itself (per-tensor static scales as modelopt writes them,
and 128x128 block scales as DeepSeek/Qwen release theirs; SmolLM2's 576 and 192 wide Linears end in
partial blocks) and, for each, the BF16 twin holding the exact dequantised values, computed here
independently of nvfp4_pp. Every rank's loaded tensors must equal the twin's bit for bit, and the
3-rank checkpoint must equal modelopt's single-process reference built from the twin.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import REPO, load_tensors, read_json, run_nvfp4_pp, tensor_differences, write_config

FP8_MAX = 448.0
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SPLIT = [10, 10, 10]
FP8_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)


def correctly_rounded(x: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The `dtype` value nearest to each float64 value, ties to even (torch's own cast rounds twice)."""
    guess = x.to(dtype)
    candidates = torch.stack([torch.nextafter(guess, torch.tensor(-math.inf, dtype=dtype)), guess,
                              torch.nextafter(guess, torch.tensor(math.inf, dtype=dtype))])
    error = (candidates.double() - x).abs()
    nearest = error == error.min(0).values
    odd = (candidates.view(torch.int16) & 1).bool()
    return candidates.gather(0, torch.where(nearest, odd.long(), 2).argmin(0, keepdim=True))[0]


def dequantised(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """BF16 of fp8 x scale, correctly rounded: each of the 256 FP8 values times the scale, looked up."""
    table = correctly_rounded(FP8_VALUES.double() * scale.double())
    return table[codes.view(torch.uint8).long()]


def per_tensor_fp8(w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """weight + weight_scale (fp32 scalar), and the BF16 the dequantised weight must be."""
    scale = (w.float().abs().max() / FP8_MAX).reshape(())
    w8 = (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return {"weight": w8, "weight_scale": scale}, dequantised(w8, scale)


def block_fp8(w: torch.Tensor, block: int = 128) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """weight + weight_scale_inv [ceil(out/128), ceil(in/128)] (fp32), and the BF16 the dequantised weight must be."""
    rows, cols = w.shape
    scales = torch.empty(math.ceil(rows / block), math.ceil(cols / block))
    w8 = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    expected = torch.empty(rows, cols, dtype=torch.bfloat16)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            part = (slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
            scales[i, j] = w[part].float().abs().max().clamp(min=1e-12) / FP8_MAX
            w8[part] = (w[part].float() / scales[i, j]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            expected[part] = dequantised(w8[part], scales[i, j])
    return {"weight": w8, "weight_scale_inv": scales}, expected


def float32_path(stored: dict[str, torch.Tensor]) -> torch.Tensor:
    """What `(w.float() * scale).to(bfloat16)` gives (two roundings), to count where it would differ."""
    w, scale = stored["weight"], stored.get("weight_scale", stored.get("weight_scale_inv"))
    if scale.dim() == 2:
        scale = scale.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
    return (w.float() * scale).to(torch.bfloat16)


STYLES = {
    # modelopt's FP8 export: per-tensor weight and static input scales, KV-cache scales, hf_quant_config.json
    "per-tensor": (per_tensor_fp8, {"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}),
    # DeepSeek-V3 / Qwen3 FP8 releases (transformers' fine-grained FP8): weight_scale_inv per 128x128 block
    "block": (block_fp8, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                          "weight_block_size": [128, 128]}),
}


def write_fp8_pair(smol_dir: Path, style: str, root: Path) -> tuple[Path, Path, int]:
    """The FP8 source and its BF16 twin (exact dequantised weights); also how many weights torch's
    float32 path (w.float() * scale, then BF16) would round differently."""
    fp8_dir, twin_dir = root / f"fp8-{style}", root / f"twin-{style}"
    quantize, quantization_config = STYLES[style]
    fp8, twin, double_rounded = {}, {}, 0
    for name, w in load_tensors(smol_dir).items():
        prefix, _, leaf = name.rpartition(".")
        if leaf != "weight" or prefix.rpartition(".")[2] not in LINEARS:
            fp8[name] = twin[name] = w
            continue
        stored, twin[name] = quantize(w)
        fp8.update({f"{prefix}.{k}": v for k, v in stored.items()})
        double_rounded += int((float32_path(stored) != twin[name]).sum())
        if style == "per-tensor":  # source quantization tensors that must never reach a stage or the output
            fp8[f"{prefix}.input_scale"] = torch.tensor(0.0123)
            if prefix.endswith(("k_proj", "v_proj")):
                fp8[f"{prefix}.{prefix[-6]}_scale"] = torch.tensor(1.5)
    config = read_json(smol_dir / "config.json")
    pairs = ((fp8_dir, fp8, {"quantization_config": quantization_config}), (twin_dir, twin, {}))
    for directory, tensors, extra in pairs:
        directory.mkdir()
        for f in smol_dir.iterdir():
            if f.name != "config.json" and not f.name.endswith((".safetensors", ".index.json")):
                shutil.copy2(f, directory / f.name)
        (directory / "config.json").write_text(json.dumps({**config, **extra}, indent=2))
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    if style == "per-tensor":
        (fp8_dir / "hf_quant_config.json").write_text(json.dumps({
            "producer": {"name": "modelopt", "version": "0.47.0"},
            "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]}}))
    return fp8_dir, twin_dir, double_rounded


@pytest.fixture(scope="module")
def fp8_pairs(smol_dir, tmp_path_factory) -> dict[str, tuple[Path, Path, int]]:
    root = tmp_path_factory.mktemp("fp8")
    return {style: write_fp8_pair(smol_dir, style, root) for style in STYLES}


@pytest.fixture(scope="module")
def twin_references(fp8_pairs, token_file, tmp_path_factory) -> dict[str, Path]:
    """modelopt's single-process reference of each BF16 twin (one process, models one after the other)."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("fp8-reference")
    refs = {style: root / style for style in fp8_pairs}
    args = [a for style, (_, twin, _) in fp8_pairs.items()
            for a in (str(twin), str(token_file), str(refs[style]), "sdpa")]
    subprocess.run([sys.executable, str(REPO / "tests" / "reference.py"), *args], check=True, capture_output=True)
    return refs


@pytest.mark.parametrize("style", STYLES)
def test_every_rank_loads_the_exact_dequantised_fp8_values(style, fp8_pairs):
    """What build_stage loads for each rank of the 3-rank split equals the twin's BF16 bit for bit."""
    from nvfp4_pp.model.arch import architecture_of
    from nvfp4_pp.planning.memory import ModelSizes
    from nvfp4_pp.model.source import SourceCheckpoint
    from nvfp4_pp.model.stage import build_stage

    fp8_dir, twin_dir, double_rounded = fp8_pairs[style]
    source, twin = SourceCheckpoint(fp8_dir), SourceCheckpoint(twin_dir)
    assert source.fp8 is not None and len(source.fp8_scales) == 30 * len(LINEARS)
    assert sorted(source.weight_map) == sorted(twin.weight_map)  # scales, input and KV scales are not model tensors
    arch = architecture_of(source.config)
    # The planner sees the dequantised model: the same sizes as the BF16 twin.
    assert ModelSizes.from_source(source, arch) == ModelSizes.from_source(twin, arch)
    expected = load_tensors(twin_dir)
    start = 0
    for count in SPLIT:
        stage = build_stage(source, arch, start, start + count, torch.device("cpu"))
        loaded = stage.state_dict()
        assert len(loaded) == count * 9 + (1 if start == 0 else 0)
        assert tensor_differences(loaded, {k: expected[k] for k in loaded}) == []
        start += count
    # a streaming stage on a GPU reads a layer into host memory first (pinned there), then loads from that
    names = [n for n in source.weight_map if n.startswith("model.layers.3.")]
    staged = source.read_stored(names, torch.Tensor.clone)
    assert set(names) < set(staged)  # the FP8 weights' scales come along
    assert tensor_differences(source.load(names, stored=staged), {n: expected[n] for n in names}) == []
    print(f"{style}: weights torch's float32 path would have rounded differently: {double_rounded}")


@pytest.mark.parametrize("style", STYLES)
def test_three_ranks_on_fp8_source_equal_modelopt_on_dequantised_twin(style, fp8_pairs, twin_references,
                                                                      token_file, tmp_path):
    fp8_dir, twin_dir, _ = fp8_pairs[style]
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "run.yaml", model=str(fp8_dir), output=str(out), format="modelopt",
        calibration={"dataset": str(token_file), "samples": 4, "max_length": 128, "batch_size": 1},
        pipeline={"layers": SPLIT},
    )
    result = run_nvfp4_pp(config, 3)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    assert tensor_differences(load_tensors(out), load_tensors(twin_references[style])) == []
    # Nothing of the source's FP8 quantization survives: config, side files and tensors are the output's own.
    written = read_json(out / "config.json")
    assert {k: v for k, v in written.items() if k != "quantization_config"} == read_json(twin_dir / "config.json")
    assert written["quantization_config"]["quant_algo"] == "NVFP4"
    assert read_json(out / "hf_quant_config.json")["quantization"]["quant_algo"] == "NVFP4"
    assert not any(k.endswith(("k_proj.k_scale", "v_proj.v_scale", "weight_scale_inv")) for k in load_tensors(out))


# Every FP8 layout and config style, on one 200 x 300 Linear (partial 128-blocks both ways).
ROWS, COLS = 200, 300
CT_WEIGHTS = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False}


def compressed_tensors(strategy: str, **weights) -> dict:
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
            "config_groups": {"group_0": {
                "targets": ["Linear"], "weights": {**CT_WEIGHTS, "strategy": strategy, **weights},
                "input_activations": {**CT_WEIGHTS, "strategy": "tensor"}}}}


LAYOUTS = {  # name: (quantization_config or None, scale name, scale shape)
    "compressed-tensors-tensor": (compressed_tensors("tensor"), "weight_scale", [1]),
    "compressed-tensors-channel": (compressed_tensors("channel"), "weight_scale", [ROWS, 1]),
    "compressed-tensors-block": (compressed_tensors("block", block_structure=[128, 128]), "weight_scale", [2, 3]),
    "fp8-per-tensor": ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": None},
                       "weight_scale_inv", []),
    "modelopt-hf_quant_config.json": (None, "weight_scale", []),
    "headers-only-block": (None, "weight_scale_inv", [2, 3]),
}


def write_tiny_source(directory: Path, quantization_config: dict | None, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1, "dtype": "bfloat16"}
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_fp8_layout_loads_exact_values_without_its_scales(layout, tmp_path):
    from nvfp4_pp.model.source import SourceCheckpoint

    config, scale_name, scale_shape = LAYOUTS[layout]
    w8 = (torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(0)) * 100).clamp(-FP8_MAX, FP8_MAX)
    w8 = w8.to(torch.float8_e4m3fn)
    scale = torch.rand(scale_shape, generator=torch.Generator().manual_seed(1)) / 100 + 1e-3
    expected = torch.empty(ROWS, COLS, dtype=torch.bfloat16)
    if len(scale_shape) == 2 and scale_shape[1] == 1:  # per output channel
        for r in range(ROWS):
            expected[r] = dequantised(w8[r], scale[r, 0])
    elif len(scale_shape) == 2:  # per 128 x 128 block, the last ones partial
        for i in range(scale_shape[0]):
            for j in range(scale_shape[1]):
                part = (slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128))
                expected[part] = dequantised(w8[part], scale[i, j])
    else:
        expected = dequantised(w8, scale.reshape(()))
    source = write_tiny_source(tmp_path / "src", config, {
        "layer.weight": w8, f"layer.{scale_name}": scale, "layer.input_scale": torch.tensor(0.5),
        "layer.k_scale": torch.tensor(2.0), "norm.weight": torch.ones(COLS, dtype=torch.bfloat16)})
    if layout.startswith("modelopt"):
        (source / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "FP8"}}))

    checkpoint = SourceCheckpoint(source)
    assert checkpoint.fp8 is not None
    assert sorted(checkpoint.weight_map) == ["layer.weight", "norm.weight"]
    assert checkpoint.nbytes("layer.weight") == ROWS * COLS * 2
    loaded = checkpoint.load(["layer.weight", "norm.weight"])
    norm = torch.ones(COLS, dtype=torch.bfloat16)
    assert tensor_differences(loaded, {"layer.weight": expected, "norm.weight": norm}) == []


UNSUPPORTED = {  # name: (quantization_config, tensors, what the refusal names)
    "modelopt-nvfp4": ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, {}, "modelopt quant_algo 'NVFP4'"),
    "compressed-tensors-nvfp4": (compressed_tensors("tensor_group", num_bits=4, group_size=16), {},
                                 "4-bit float weights, strategy 'tensor_group'"),
    "gptq-int4": ({"quant_method": "gptq", "bits": 4}, {}, "quant_method 'gptq'"),
    "fp8-without-scale": (None, {"layer.weight": torch.zeros(ROWS, COLS, dtype=torch.float8_e4m3fn)},
                          "'layer.weight' is F8_E4M3 [200, 300] with no weight_scale or weight_scale_inv"),
    "fp8-wrong-block-scale": ({"quant_method": "fp8", "weight_block_size": [128, 128]},
                              {"layer.weight": torch.zeros(ROWS, COLS, dtype=torch.float8_e4m3fn),
                               "layer.weight_scale_inv": torch.ones(3, 3)},
                              "'layer.weight_scale_inv' has shape [3, 3], which fits none of"),
}


@pytest.mark.parametrize("case", UNSUPPORTED)
def test_unsupported_quantized_source_is_refused_naming_what_is_supported(case, tmp_path):
    from nvfp4_pp.model.source import SourceCheckpoint, SourceError

    config, tensors, named = UNSUPPORTED[case]
    source = write_tiny_source(tmp_path / "src", config, tensors or {"layer.weight": torch.ones(4, 4)})
    with pytest.raises(SourceError) as error:
        SourceCheckpoint(source)
    assert named in str(error.value)
    if "fits none" not in named and "no weight_scale" not in named:
        assert "nvfp4_pp reads BF16/FP16/FP32 sources, and FP8 sources dequantised on load" in str(error.value)


def test_nvfp4_source_run_fails_with_one_line(tmp_path, capsys):
    """The whole command: one error line before any rank loads a weight, nothing written."""
    from nvfp4_pp.run import main

    source = write_tiny_source(tmp_path / "src", {"quant_method": "modelopt", "quant_algo": "NVFP4"},
                               {"layer.weight": torch.ones(4, 4)})
    config = write_config(tmp_path / "run.yaml", model=str(source), output=str(tmp_path / "out"))
    assert main([str(config)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("nvfp4_pp: error")]
    assert len(lines) == 1 and "is quantized (modelopt quant_algo 'NVFP4')" in lines[0], lines
    assert not (tmp_path / "out").exists()
