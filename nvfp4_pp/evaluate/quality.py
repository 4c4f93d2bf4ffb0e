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

import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from nvfp4_pp.progress import Progress
from nvfp4_pp.checkpoint.decoders.decode import DecodedLinear, EvaluateError, decode_checkpoint

EVAL_DATA = "builtin:pydoc"


def quantized_model(source: Path, directory: Path, device: torch.device) -> tuple[nn.Module, dict[str, DecodedLinear]]:
    """The source architecture with every tensor replaced by the one decoded from `directory`."""
    from transformers import AutoModelForCausalLM

    linears, others = decode_checkpoint(directory)
    # ignored: transformers wraps PreTrainedModel.to with functools.wraps, whose stub leaves self unbound
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).to(device).eval()  # type: ignore[arg-type]
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
    seen: dict[int, str] = {}
    tied: set[str] = set()
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
    from nvfp4_pp.config import CalibrationConfig
    from nvfp4_pp.data.samples import builtin_text, load_samples

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
    """{variant: {"perplexity", "kl"}} for bf16, w4a16, and, where the checkpoint quantizes activations,
    w4a4 (and w4a4-scale1)."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    # ignored: as in quantized_model (functools.wraps on PreTrainedModel.to)
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).to(device).eval()  # type: ignore[arg-type]
    model, linears = quantized_model(Path(source), Path(quantized), device)
    acts = ActivationQuantization(model, linears)
    variants = {"w4a16": (False, False)}
    if any(d.quantize_input is not None for d in linears.values()):
        variants["w4a4"] = (True, False)
    if input_scale_one and "w4a4" in variants:
        variants["w4a4-scale1"] = (True, True)
    totals = {name: {"nll": 0.0, "kl": 0.0} for name in ["bf16", *variants]}
    count = 0
    progress = Progress(f"evaluate ({len(variants) + 1} forward passes per sample)", sum(len(s) for s in samples),
                        "tokens", steps=len(samples), step_unit="samples", every_s=5.0)
    for ids in samples:
        target = torch.tensor(ids[1:], device=device)[:, None]
        ref = log_probs(reference, ids, device)
        totals["bf16"]["nll"] -= ref.gather(1, target).sum().item()
        for name, (acts.enabled, acts.force_one) in variants.items():
            lp = log_probs(model, ids, device)
            totals[name]["nll"] -= lp.gather(1, target).sum().item()
            totals[name]["kl"] += (ref.exp() * (ref - lp)).sum().item()
        count += len(ids) - 1
        progress.advance(len(ids))
    return {name: {"perplexity": math.exp(t["nll"] / count), "kl": t["kl"] / count} for name, t in totals.items()}


LABELS = {"bf16": "BF16 (source)", "w4a16": "quantized weights, BF16 activations (W4A16 / W8A16)",
          "w4a4": "quantized weights and activations (W4A4 / W8A8), calibrated input scales",
          "w4a4-scale1": "quantized weights and activations, every input scale 1.0"}


def compare_table(rows: list[tuple[Path, str, int, dict[str, dict[str, float]]]]) -> Iterator[str]:
    """One row per output of the same source (path, layout, bytes on disk, results), the BF16 source first."""
    yield "| output | layout | size GB | W4A16 perplexity | W4A16 KL | W4A4 perplexity | W4A4 KL |"
    yield "|---|---|---:|---:|---:|---:|---:|"
    bf16 = rows[0][3]["bf16"]["perplexity"] if rows else float("nan")
    yield f"| BF16 source | - | - | {bf16:.3f} | 0 | - | - |"
    for path, layout, size, r in rows:
        w4a4 = f"{r['w4a4']['perplexity']:.3f} | {r['w4a4']['kl']:.5f}" if "w4a4" in r else "- | -"
        yield (f"| {path} | {layout} | {size / 1e9:.2f} | {r['w4a16']['perplexity']:.3f} | {r['w4a16']['kl']:.5f} | "
               f"{w4a4} |")


def table(results: dict[str, dict[str, float]]) -> Iterator[str]:
    yield "| variant | perplexity | mean KL vs BF16 |"
    yield "|---|---:|---:|"
    for name, r in results.items():
        yield f"| {LABELS.get(name, name)} | {r['perplexity']:.3f} | {r['kl']:.5f} |"
