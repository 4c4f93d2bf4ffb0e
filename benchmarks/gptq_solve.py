"""GPTQ's solve alone, one Linear per Llama-3.3-70B shape: modelopt 0.47's `gptq_blockwise_update` against
nvfp4_pp.algorithms.gptq's solve on the same weight, damped inverse and quantizer; time and byte identity.

    python3 benchmarks/gptq_solve.py                        # GPU: full shapes, INT4 and W4A16 NVFP4
    python3 benchmarks/gptq_solve.py --scale 8 --recipes w4a16_int4   # CPU: every dimension / 8

Per shape (random BF16 weights of std 0.02, the Hessian of `--tokens` random inputs with a few
outlier channels, modelopt's quantizer inserted and max-calibrated as its gptq() does): the damped
inverse (modelopt's `compute_hessian_inverse`, which both share), modelopt's update, nvfp4_pp's solve,
and whether their weights are bit-identical. The Linears that share an input are also solved stacked
(q/k/v: 10240 rows, gate/up: 57344), as nvfp4_pp's gptq() solves them; the per-layer estimate adds
the inverses and solves one layer's seven Linears need (modelopt's: each Linear alone).
modelopt's CUDA extensions are built and loaded before anything is timed.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nvfp4_pp.algorithms.table import RECIPES  # noqa: E402
from nvfp4_pp.algorithms.gptq import column_quantizer, solve  # noqa: E402

HIDDEN, INTERMEDIATE, KV = 8192, 28672, 1024
SHAPES = {  # name: (out, in, Linears of a layer it stands for)
    "q_proj / o_proj": (HIDDEN, HIDDEN, 2),
    "k_proj / v_proj": (KV, HIDDEN, 2),
    "gate_proj / up_proj": (INTERMEDIATE, HIDDEN, 2),
    "down_proj": (HIDDEN, INTERMEDIATE, 1),
}
STACKS = {"q/k/v": [HIDDEN, KV, KV], "gate/up": [INTERMEDIATE, INTERMEDIATE]}
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> float:
    if DEV == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def warm_extensions() -> float:
    """modelopt's CUDA extensions built (a minute on a fresh machine) and loaded before any timing."""
    if DEV != "cuda":
        return 0.0
    from modelopt.torch.quantization.extensions import get_cuda_ext, get_cuda_ext_fp8

    t0 = time.perf_counter()
    get_cuda_ext(raise_if_failed=True)
    get_cuda_ext_fp8(raise_if_failed=True)
    return time.perf_counter() - t0


def quantized_linear(recipe: str, out: int, inp: int, gen: torch.Generator) -> nn.Module:
    """A Linear with modelopt's weight quantizer of `recipe`, max-calibrated on its weight (GPTQ's first step)."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.model_calib import max_calibrate

    model = nn.Sequential(nn.Linear(inp, out, bias=False, dtype=torch.bfloat16, device=DEV))
    model[0].weight.data = (torch.randn(out, inp, generator=gen) * 0.02).to(DEV, torch.bfloat16)
    cfg = copy.deepcopy(getattr(mtq, RECIPES[recipe].preset))
    mtq.quantize(model, {**cfg, "algorithm": None}, None)
    max_calibrate(model, None)
    return model[0]


def hessian(inp: int, tokens: int, gen: torch.Generator) -> torch.Tensor:
    from modelopt.torch.quantization.utils.calib_utils import update_hessian

    x = torch.randn(tokens, inp, generator=gen)
    x[:, torch.randperm(inp, generator=gen)[:8]] *= 20  # a few outlier channels, as LLM activations have
    h, _ = update_hessian(x.to(DEV, torch.bfloat16), torch.zeros(inp, inp, device=DEV), 0)
    return h


def timed(fn) -> float:
    t0 = sync()
    fn()
    return sync() - t0


def one_shape(recipe: str, out: int, inp: int, tokens: int, reference: bool, gen: torch.Generator) -> dict:
    """One Linear: the shared inverse, nvfp4_pp's solve (with CUDA graphs; on a GPU also without), and
    modelopt's update of the same weight unless `reference` is off."""
    from modelopt.torch.quantization.utils.calib_utils import compute_hessian_inverse, gptq_blockwise_update

    linear = quantized_linear(recipe, out, inp, gen)
    h = hessian(inp, tokens, gen)
    w = linear.weight.data.float()
    h_inv = None

    def inverse() -> None:
        nonlocal h_inv
        h_inv = compute_hessian_inverse(h, w, 0.01)

    row = {"inverse": timed(inverse)}
    del h
    quantize = column_quantizer([linear.weight_quantizer], [out], inp, 128)
    if quantize is None:
        raise SystemExit(f"{recipe}: nvfp4_pp's solve does not know this quantizer")
    ours = w.clone()
    row["ours"] = timed(lambda: solve(ours, h_inv, 128, quantize))
    row["eager"] = None
    if DEV == "cuda":
        eager = w.clone()
        row["eager"] = timed(lambda: solve(eager, h_inv, 128, quantize, graphs=False))
        row["graph_equals_eager"] = torch.equal(eager, ours)
    row["modelopt"] = row["identical"] = None
    if reference:
        theirs = w.clone()
        row["modelopt"] = timed(lambda: gptq_blockwise_update(theirs, h_inv, 128, linear.weight_quantizer))
        row["identical"] = torch.equal(ours, theirs) and not torch.equal(ours, w)
    return row


def one_stack(recipe: str, outs: list[int], inp: int, tokens: int, gen: torch.Generator) -> dict:
    """Linears of one input (q/k/v, gate/up): one inverse, their rows solved stacked, against each solved
    alone with the same inverse (nvfp4_pp's solve alone equals modelopt's: the per-shape rows)."""
    from modelopt.torch.quantization.utils.calib_utils import compute_hessian_inverse

    linears = [quantized_linear(recipe, out, inp, gen) for out in outs]
    h = hessian(inp, tokens, gen)
    w = torch.cat([m.weight.data.float() for m in linears])
    h_inv = None

    def inverse() -> None:
        nonlocal h_inv
        h_inv = compute_hessian_inverse(h, w, 0.01)

    row = {"inverse": timed(inverse)}
    stacked = column_quantizer([m.weight_quantizer for m in linears], outs, inp, 128)
    if stacked is None:
        return {**row, "ours": None, "identical": None}
    ours = w.clone()
    row["ours"] = timed(lambda: solve(ours, h_inv, 128, stacked, outs))
    alone, a = [], 0
    for m, out in zip(linears, outs):
        part = w[a:a + out].clone()
        solve(part, h_inv, 128, column_quantizer([m.weight_quantizer], [out], inp, 128))
        alone.append(part)
        a += out
    row["identical"] = torch.equal(ours, torch.cat(alone))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=1, help="divide every dimension by this (CPU: 8)")
    ap.add_argument("--recipes", default="w4a16_int4,w4a16_nvfp4")
    ap.add_argument("--tokens", type=int, default=8192, help="inputs the Hessian is built from")
    ap.add_argument("--no-reference", default="", help="comma-separated shapes whose modelopt update is not run")
    ap.add_argument("--report", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    warm = warm_extensions()
    device = torch.cuda.get_device_name(0) if DEV == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    lines = [f"# GPTQ solve, one Linear per Llama-3.3-70B shape{'' if args.scale == 1 else f' / {args.scale}'}, "
             f"{time.strftime('%Y-%m-%d')}, {device}",
             f"block 128, damping 0.01, Hessian of {args.tokens} random tokens; modelopt's CUDA extensions "
             f"loaded in {warm:.1f} s before timing", "",
             "| recipe | Linear (out x in) | inverse s | modelopt update s | nvfp4_pp solve s | speed-up | identical |",
             "|---|---|---|---|---|---|---|"]
    skip = set(filter(None, args.no_reference.split(",")))
    lines[-2:] = ["| recipe | Linear (out x in) | inverse s | modelopt update s | nvfp4_pp solve s | speed-up | "
                  "identical | solve s without CUDA graphs |", "|---|---|---|---|---|---|---|---|"]
    for recipe in args.recipes.split(","):
        gen = torch.Generator().manual_seed(0)
        solve(torch.zeros(64, 256, device=DEV), torch.eye(256, device=DEV).t(), 128,  # kernels built, not timed
              column_quantizer([quantized_linear(recipe, 64, 256, gen).weight_quantizer], [64], 256, 128))
        rows = {}
        for name, (out, inp, count) in SHAPES.items():
            out, inp = out // args.scale, inp // args.scale
            r = rows[name] = one_shape(recipe, out, inp, args.tokens, name not in skip, gen)
            print(f"{recipe} {name}: {r}", flush=True)
            ident = "-" if r["identical"] is None else ("yes" if r["identical"] else "**no**")
            speed = "-" if r["modelopt"] is None else f"{r['modelopt'] / r['ours']:.1f}x"
            mod = "-" if r["modelopt"] is None else f"{r['modelopt']:.2f}"
            eager = "-" if r["eager"] is None else f"{r['eager']:.2f}" + (
                "" if r.get("graph_equals_eager", True) else " (**other bytes**)")
            lines.append(f"| {recipe} | {name} ({out} x {inp}) | {r['inverse']:.2f} | {mod} | {r['ours']:.2f} | "
                         f"{speed} | {ident} | {eager} |")
        stacks = {}
        for name, outs in STACKS.items():
            outs = [o // args.scale for o in outs]
            r = stacks[name] = one_stack(recipe, outs, HIDDEN // args.scale, args.tokens, gen)
            print(f"{recipe} {name} stacked: {r}", flush=True)
            ours = "not stackable" if r["ours"] is None else f"{r['ours']:.2f}"
            ident = "-" if r["identical"] is None else ("yes (as each alone)" if r["identical"] else "**no**")
            lines.append(f"| {recipe} | {name} stacked ({' + '.join(map(str, outs))} x {HIDDEN // args.scale}) | "
                         f"{r['inverse']:.2f} | - | {ours} | - | {ident} | - |")
        # one layer: modelopt updates each of the 7 Linears with its own inverse; nvfp4_pp solves q/k/v and
        # gate/up stacked with one inverse each (or, where they do not stack, each alone with the group's inverse)
        theirs = None if any(rows[n]["modelopt"] is None for n in SHAPES) else sum(
            count * (rows[n]["inverse"] + rows[n]["modelopt"]) for n, (_, _, count) in SHAPES.items())
        mine = rows["q_proj / o_proj"]["inverse"] + rows["q_proj / o_proj"]["ours"] \
            + rows["down_proj"]["inverse"] + rows["down_proj"]["ours"]
        for name, members in (("q/k/v", ("q_proj / o_proj", "k_proj / v_proj", "k_proj / v_proj")),
                              ("gate/up", ("gate_proj / up_proj",) * 2)):
            r = stacks[name]
            mine += r["inverse"] + (r["ours"] if r["ours"] is not None else sum(rows[m]["ours"] for m in members))
        lines.append(f"| {recipe} | **one layer** (7 Linears) | | "
                     f"{'-' if theirs is None else f'{theirs:.1f}'} (inverses included) | {mine:.1f} | "
                     f"{'-' if theirs is None else f'{theirs / mine:.1f}x'} | | |")
    text = "\n".join(lines)
    print(text, flush=True)
    if args.report:
        args.report.write_text(text + "\n")


if __name__ == "__main__":
    main()
