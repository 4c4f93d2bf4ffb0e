"""Quality of a written checkpoint: perplexity and KL divergence vs the BF16 source, decoded from its files.

`python -m nvfp4_pp.evaluate --source MODEL --quantized DIR [--data builtin:pydoc] [--samples 32]
[--max-length 512] [--input-scale-one] [--json FILE] [--update-card]`

Every weight of the quantized model comes from DIR's safetensors files, decoded per scheme with the
plain-torch decoders in nvfp4.py and fp8_mx.py (never from modelopt or in-memory state); the config
says which scheme each Linear has. Variants:
- `bf16`: the source model itself;
- `w4a16`: decoded weights, BF16 activations (what a weight-only kernel such as Marlin computes);
- `w4a4`: decoded weights and every quantized Linear's input quantized as its scheme does at run
  time: NVFP4 per-16 blocks with FP8 block scales and the stored static global scale (what
  Blackwell computes), FP8 per tensor with the stored static scale, MXFP4 per-32 blocks with E8M0
  scales; weight-only schemes (W4A16 NVFP4) leave the input in BF16 here too;
- `w4a4-scale1` (`--input-scale-one`): the same with every input scale forced to 1.0, the public Ray
  pipeline's workaround, for comparison.
Perplexity is exp(mean next-token NLL); KL is mean KL(P_bf16 || P_variant) over the same positions.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .fp8_mx import dequantize_fp8, dequantize_mxfp4, fake_quantize_fp8_activation, fake_quantize_mxfp4_activation
from .nvfp4 import dequantize_weight, fake_quantize_activation
from .vllm_contract import read_quant_config

EVAL_DATA = "builtin:pydoc"


class EvaluateError(ValueError):
    pass


def layout_of(directory: Path):
    """What the checkpoint's config declares (layout, scheme per module), read as `verify` reads it."""
    config = json.loads((directory / "config.json").read_text())
    qc = config.get("quantization_config") or {}
    problems: list[str] = []
    layout = read_quant_config(directory, qc, problems) if qc else None
    if layout is None:
        raise EvaluateError(f"{directory / 'config.json'}: quantization_config.quant_method "
                            f"{qc.get('quant_method')!r} is not a known layout; is this an nvfp4_pp output?")
    return layout


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the files the index names (or of the lone model.safetensors)."""
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
        "model.safetensors"]
    tensors = {}
    for file in files:
        with safe_open(directory / file, "pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


class DecodedLinear:
    """One quantized Linear as read from disk: its decoded weight and how its input is quantized.

    `pre_scale` (AWQ) multiplies the input before anything else; `quantize_input` (None for
    weight-only schemes) is the activation quantization a W4A4 / W8A8 kernel applies.
    """

    def __init__(self, weight: torch.Tensor, quantize_input: Callable[[torch.Tensor, bool], torch.Tensor] | None,
                 pre_scale: torch.Tensor | None = None):
        self.weight, self.quantize_input, self.pre_scale = weight, quantize_input, pre_scale


def _nvfp4_input(scale: torch.Tensor, global_form: bool):
    scale = scale.float().reshape(())
    return lambda x, one: fake_quantize_activation(x, torch.ones_like(scale) if one else scale.to(x.device), global_form)


def _fp8_input(scale: torch.Tensor):
    scale = scale.float().reshape(())
    return lambda x, one: fake_quantize_fp8_activation(x, torch.ones_like(scale) if one else scale.to(x.device))


def decode_linear(method: str, scheme: str, module: str, tensors: dict[str, torch.Tensor]) -> DecodedLinear:
    """Pop one Linear's tensors (names per layout and scheme) and decode them."""
    ct = method == "compressed-tensors"

    def take(suffix: str, required: bool = True) -> torch.Tensor | None:
        name = module + suffix
        if name not in tensors and required:
            raise EvaluateError(f"{module} ({scheme}) lacks {name}; run nvfp4_pp.verify on it")
        return tensors.pop(name, None)

    packed_name = ".weight_packed" if ct else ".weight"
    if scheme in ("nvfp4", "nvfp4_awq", "w4a16_nvfp4"):
        packed, block = take(packed_name), take(".weight_scale")
        weight = dequantize_weight(packed, block, take(".weight_global_scale" if ct else ".weight_scale_2"), ct)
        quantize = None
        if scheme != "w4a16_nvfp4":
            quantize = _nvfp4_input(take(".input_global_scale" if ct else ".input_scale"), ct)
        return DecodedLinear(weight, quantize, take(".pre_quant_scale", required=False))
    if scheme == "fp8":
        weight = dequantize_fp8(take(".weight"), take(".weight_scale"))
        return DecodedLinear(weight, _fp8_input(take(".input_scale")))
    if scheme == "mxfp4":
        weight = dequantize_mxfp4(take(packed_name), take(".weight_scale"))
        return DecodedLinear(weight, lambda x, one: fake_quantize_mxfp4_activation(x))
    raise EvaluateError(f"{module}: scheme {scheme!r} has no decoder")


def decode_checkpoint(directory: Path) -> tuple[dict[str, DecodedLinear], dict[str, torch.Tensor]]:
    """(quantized Linears by module name, every other tensor by name) of a written checkpoint."""
    directory = Path(directory)
    layout = layout_of(directory)
    tensors = read_tensors(directory)
    linears: dict[str, DecodedLinear] = {}
    # Every scheme of both layouts carries `.weight_scale`; the config says which scheme it is.
    for module in sorted(n.removesuffix(".weight_scale") for n in list(tensors) if n.endswith(".weight_scale")):
        scheme = layout.scheme_of(module)
        if scheme is None:
            raise EvaluateError(f"{directory}: {module} has quantized tensors but no config group; run nvfp4_pp.verify")
        linears[module] = decode_linear(layout.method, scheme, module, tensors)
    for name in [n for n in tensors if n.endswith((".k_scale", ".v_scale"))]:
        tensors.pop(name)  # KV-cache scales: what the serving engine's cache uses, not weights
    return linears, tensors


def quantized_model(source: Path, directory: Path, device: torch.device) -> tuple[nn.Module, dict[str, DecodedLinear]]:
    """The source architecture with every tensor replaced by the one decoded from `directory`."""
    from transformers import AutoModelForCausalLM

    linears, others = decode_checkpoint(directory)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).to(device).eval()
    params = dict(model.named_parameters())
    state = {f"{m}.weight": d.weight for m, d in linears.items()} | others
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise EvaluateError(f"{directory} holds {unknown[0]!r}, which the source model {source} has no parameter for")
    missing = sorted(set(params) - set(state) - tied_names(model))
    if missing:
        raise EvaluateError(f"{directory} lacks {missing[0]!r}; run nvfp4_pp.verify on it")
    with torch.no_grad():
        for name, value in state.items():
            if params[name].shape != value.shape:
                raise EvaluateError(f"{name}: {tuple(value.shape)} in {directory}, {tuple(params[name].shape)} in the source")
            params[name].copy_(value.to(params[name].dtype))
    return model, linears


def tied_names(model: nn.Module) -> set[str]:
    """Parameters that share storage with another (lm_head tied to the embeddings): written once."""
    seen, tied = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.data_ptr() in seen:
            tied.add(name)
        seen.setdefault(p.data_ptr(), name)
    return tied


class ActivationQuantization:
    """Forward pre-hooks: AWQ pre-scales always; activation quantization when enabled (per variant)."""

    def __init__(self, model: nn.Module, linears: dict[str, DecodedLinear]):
        self.enabled, self.force_one = False, False
        self._handles = [model.get_submodule(name).register_forward_pre_hook(self._hook(d))
                         for name, d in linears.items() if d.quantize_input is not None or d.pre_scale is not None]

    def _hook(self, decoded: DecodedLinear):
        def hook(module, args):
            x = args[0]
            if decoded.pre_scale is not None:
                x = x * decoded.pre_scale.to(x.device, x.dtype)
            if self.enabled and decoded.quantize_input is not None:
                x = decoded.quantize_input(x, self.force_one)
            return (x, *args[1:])
        return hook


def eval_samples(data: str, samples: int, max_length: int, tokenizer_dir: Path) -> list[list[int]]:
    """Held-out token samples. The built-in corpus is read from its END (calibration reads it from the
    start), so the two are disjoint while calibration uses fewer tokens than the corpus minus these."""
    from .calib import builtin_text, load_samples
    from .config import CalibrationConfig

    if data.startswith("builtin:"):
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(tokenizer_dir)(builtin_text(data.removeprefix("builtin:")))["input_ids"]
        if len(ids) < samples * max_length:
            raise EvaluateError(f"{data} has {len(ids)} tokens, fewer than {samples} x {max_length}; lower --samples")
        tail = ids[len(ids) - samples * max_length:]
        return [tail[i : i + max_length] for i in range(0, len(tail), max_length)]
    return load_samples(CalibrationConfig(dataset=data, samples=samples, max_length=max_length), tokenizer_dir).samples


@torch.no_grad()
def log_probs(model: nn.Module, ids: list[int], device: torch.device) -> torch.Tensor:
    """float32 [len-1, vocab] next-token log-probabilities of one sample."""
    logits = model(torch.tensor([ids], device=device)).logits[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def perplexity(model: nn.Module, samples: list[list[int]], device: torch.device | str = "cpu") -> float:
    """exp(mean next-token NLL) over all samples (the figure `evaluate` reports, for any model)."""
    nll, count = 0.0, 0
    for ids in samples:
        lp = log_probs(model, ids, torch.device(device))
        target = torch.tensor(ids[1:], device=lp.device)
        nll -= lp.gather(1, target[:, None]).sum().item()
        count += len(ids) - 1
    return math.exp(nll / count)


def evaluate(source: Path, quantized: Path, samples: list[list[int]], device: torch.device | str = "cpu",
             input_scale_one: bool = False) -> dict[str, dict[str, float]]:
    """{variant: {"perplexity", "kl"}} for bf16, w4a16, w4a4 (and w4a4-scale1)."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).to(device).eval()
    model, linears = quantized_model(Path(source), Path(quantized), device)
    acts = ActivationQuantization(model, linears)
    variants = {"w4a16": (False, False), "w4a4": (True, False)}
    if input_scale_one:
        variants["w4a4-scale1"] = (True, True)
    totals = {name: {"nll": 0.0, "kl": 0.0} for name in ["bf16", *variants]}
    count = 0
    for ids in samples:
        target = torch.tensor(ids[1:], device=device)[:, None]
        ref = log_probs(reference, ids, device)
        totals["bf16"]["nll"] -= ref.gather(1, target).sum().item()
        for name, (acts.enabled, acts.force_one) in variants.items():
            lp = log_probs(model, ids, device)
            totals[name]["nll"] -= lp.gather(1, target).sum().item()
            totals[name]["kl"] += (ref.exp() * (ref - lp)).sum().item()
        count += len(ids) - 1
    return {name: {"perplexity": math.exp(t["nll"] / count), "kl": t["kl"] / count} for name, t in totals.items()}


LABELS = {"bf16": "BF16 (source)", "w4a16": "quantized weights, BF16 activations (W4A16 / W8A16)",
          "w4a4": "quantized weights and activations (W4A4 / W8A8), calibrated input scales",
          "w4a4-scale1": "quantized weights and activations, every input scale 1.0"}


def table(results: dict[str, dict[str, float]]) -> Iterator[str]:
    yield "| variant | perplexity | mean KL vs BF16 |"
    yield "|---|---:|---:|"
    for name, r in results.items():
        yield f"| {LABELS.get(name, name)} | {r['perplexity']:.3f} | {r['kl']:.5f} |"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nvfp4_pp.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True, type=Path, help="the BF16 source checkpoint")
    p.add_argument("--quantized", required=True, type=Path, help="the nvfp4_pp output to evaluate")
    p.add_argument("--data", default=EVAL_DATA, help="builtin:pydoc (read from its end), a .txt or a .jsonl")
    p.add_argument("--samples", type=int, default=32, help="number of samples (default 32)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per sample (default 512)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--input-scale-one", action="store_true", help="add W4A4 with every input scale forced to 1.0")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--update-card", action="store_true", help="put the table into QUANTIZED/README.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        samples = eval_samples(args.data, args.samples, args.max_length, args.source)
        results = evaluate(args.source, args.quantized, samples, args.device, args.input_scale_one)
    except (EvaluateError, OSError) as e:
        print(f"nvfp4_pp.evaluate: error: {e}", file=sys.stderr)
        return 1
    tokens = sum(len(s) - 1 for s in samples)
    what = f"{args.data}: {len(samples)} samples, {tokens} predicted tokens"
    print(f"{args.quantized} vs {args.source} on {what}")
    print("\n".join(table(results)))
    report = {"data": args.data, "samples": len(samples), "max_length": args.max_length, "tokens": tokens,
              "results": results}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.update_card:
        from .card import update_quality

        update_quality(args.quantized, what, list(table(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
