"""Every algorithm across pipeline ranks on one CUDA GPU: identity with modelopt, and quality on held-out text.

    python benchmarks/algorithms.py [--model smollm2|tiny|DIR] [--ranks 3] [--jobs 4] [--runs a,b,...]
                                    [--work /tmp/nvfp4_pp-alg] [--report REPORT.md]

For each run (recipe x algorithm x layer-by-layer mode, list below) the script
  1. runs nvfp4_pp with `--ranks` ranks that all use this GPU (one torchrun per rank, hidden states
     over gloo, as benchmarks/awq_identity.py does); several runs at once (`--jobs`);
  2. where the run is marked so, builds modelopt's single-process result of the same config on the GPU
     (tests/reference.py: mtq.quantize + export_hf_checkpoint; its layerwise mode with use_cache=False)
     and compares every tensor;
  3. measures perplexity and mean KL vs BF16 of the written checkpoint on held-out text (the end of the
     built-in corpus; calibration reads its start) with the project's own decoders (nvfp4_pp.evaluate);
  4. for runs written in the compressed-tensors layout (nvfp4_pp's own smoothing, stacks and `auto`),
     the same KL as transformers + compressed-tensors loads the files (weights dequantized), beside the
     decoder's W4A16 figure, and on a GPU which weights that load dequantizes differently there;
plus llm-compressor's GPTQ W4A16 g128 (GPTQModifier, scheme W4A16) of the same samples, evaluated the
same way. Calibration: `--samples` x `--seq` tokens of the built-in corpus. One markdown table out.
INT4 runs keep BF16 every Linear whose input width is no multiple of 128 (SmolLM2: all but down_proj).
modelopt 0.47 runs NVFP4 GPTQ, its scale searches and AWQ-lite on CUDA only: this is where their
evidence comes from (the CPU suite covers INT4 GPTQ).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import NamedTuple

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from awq_identity import REPO, run_ranks, write_model  # noqa: E402
from helpers import load_tensors, tensor_differences  # noqa: E402

class Run(NamedTuple):
    recipe: str
    algorithm: str
    boundary: str | None
    """Layer-by-layer boundary, or None (flat)."""
    compare: bool
    """Compared tensor for tensor with modelopt's single process."""
    layout: str = "modelopt"
    """compressed-tensors: also loaded by transformers + compressed-tensors, its KL beside evaluate's."""
    guard: str | None = None
    """`auto.guard` (None: the default, no run-level guard)."""


_CT = "compressed-tensors"
RUNS = {
    "int4-max": Run("w4a16_int4", "max", None, False),
    "int4-gptq": Run("w4a16_int4", "gptq", None, False),
    "int4-gptq-layerwise": Run("w4a16_int4", "gptq", "sequential", False),
    "int4-gptq-layerwise-parallel": Run("w4a16_int4", "gptq", "parallel", False),
    "int4-awq_lite": Run("w4a16_int4", "awq_lite", None, True),
    "nvfp4-max": Run("nvfp4", "max", None, False),
    "nvfp4-awq": Run("nvfp4_awq", "max", None, True),
    "nvfp4-gptq": Run("nvfp4", "gptq", None, True),
    "nvfp4-gptq-layerwise": Run("nvfp4", "gptq", "sequential", True),
    "nvfp4-local_hessian": Run("nvfp4", "local_hessian", None, True),
    "nvfp4-mse": Run("nvfp4", "mse", None, True),
    "nvfp4-four_over_six": Run("nvfp4", "four_over_six", None, True),
    "w4a16_nvfp4-max": Run("w4a16_nvfp4", "max", None, False),
    "w4a16_nvfp4-gptq-layerwise": Run("w4a16_nvfp4", "gptq", "sequential", True),
    # the project's own per-layer algorithms (no modelopt equivalent): written in the layout vLLM serves
    "nvfp4-max-ct": Run("nvfp4", "max", None, False, _CT),
    "int4-smooth": Run("w4a16_int4", "smooth", "sequential", False, _CT),
    "int4-smooth+gptq": Run("w4a16_int4", "smooth+gptq", "sequential", False, _CT),
    "nvfp4-smooth": Run("nvfp4", "smooth", "sequential", False, _CT),
    "nvfp4-smooth+gptq": Run("nvfp4", "smooth+gptq", "sequential", False, _CT),
    "nvfp4-local_hessian+gptq": Run("nvfp4", "local_hessian+gptq", "sequential", False, _CT),
    "nvfp4-smooth+local_hessian": Run("nvfp4", "smooth+local_hessian", "sequential", False, _CT),
    "nvfp4-smooth+local_hessian+gptq": Run("nvfp4", "smooth+local_hessian+gptq", "sequential", False, _CT),
    "w4a16_nvfp4-smooth+gptq": Run("w4a16_nvfp4", "smooth+gptq", "sequential", False, _CT),
    "w4a16_nvfp4-smooth+local_hessian+gptq": Run("w4a16_nvfp4", "smooth+local_hessian+gptq", "sequential", False, _CT),
    "int4-auto": Run("w4a16_int4", "auto", "sequential", False, _CT),
    "nvfp4-auto": Run("nvfp4", "auto", "sequential", False, _CT),
    "w4a16_nvfp4-auto": Run("w4a16_nvfp4", "auto", "sequential", False, _CT),
    "int4-auto-guarded": Run("w4a16_int4", "auto", "sequential", False, _CT, "fullest"),
    "nvfp4-auto-guarded": Run("nvfp4", "auto", "sequential", False, _CT, "fullest"),
    "w4a16_nvfp4-auto-guarded": Run("w4a16_nvfp4", "auto", "sequential", False, _CT, "fullest"),
}


def int4_ignore(model: Path) -> list[str]:
    """Linears whose input width is no multiple of INT4's group of 128 (the recipe refuses them): kept BF16.
    SmolLM2-135M (hidden 576): every Linear but down_proj."""
    c = json.loads((model / "config.json").read_text())
    attn = c["num_attention_heads"] * (c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])
    widths = {("*q_proj", "*k_proj", "*v_proj", "*gate_proj", "*up_proj"): c["hidden_size"], ("*o_proj",): attn,
              ("*down_proj",): c["intermediate_size"]}
    return [p for names, width in widths.items() if width % 128 for p in names]


def write_calibration(model: Path, work: Path, samples: int, seq: int) -> Path:
    """`samples` pieces of `seq` tokens of the built-in corpus as input_ids JSONL (both tools read it)."""
    from nvfp4_pp.config import CalibrationConfig
    from nvfp4_pp.data.samples import load_samples

    chosen = load_samples(CalibrationConfig(samples=samples, max_length=seq), model)
    path = work / f"calibration-{samples}x{seq}.jsonl"
    path.write_text("".join(json.dumps({"input_ids": list(map(int, s))}) + "\n" for s in chosen.samples))
    return path


def one_run(name: str, model: Path, tokens: Path, work: Path, ranks: int, device: str) -> dict:
    recipe, algorithm, boundary, compare, layout, guard = RUNS[name]
    out, logs = work / f"out-{name}", work / f"logs-{name}"
    logs.mkdir(parents=True, exist_ok=True)
    samples = sum(1 for line in tokens.read_text().splitlines() if line.strip())
    config = work / f"{name}.yaml"
    ignore = int4_ignore(model) if recipe == "w4a16_int4" else []
    config.write_text(yaml.safe_dump({
        "model": str(model), "output": str(out), "format": layout, "recipe": recipe, "algorithm": algorithm,
        # modelopt's layout of INT4 / NVFP4-AWQ: compared, not served; compressed-tensors: vLLM's tables checked
        "ignore": ignore, "serving": {"target": "vllm" if layout == _CT else "none"},
        "layerwise": {"enable": boundary is not None, "boundary": boundary or "parallel"},
        "calibration": {"dataset": str(tokens), "samples": samples, "max_length": 4096, "batch_size": 1},
        "pipeline": {"device": device, "backend": "gloo"},
        **({"auto": {"guard": guard}} if guard else {}),
    }, sort_keys=False))
    t0 = time.perf_counter()
    code = run_ranks(config, ranks, logs, 540)
    row = {"name": name, "recipe": recipe, "algorithm": algorithm, "layerwise": boundary or "-",
           "exit": code, "seconds": time.perf_counter() - t0, "out": str(out), "layout": layout}
    if code != 0:
        row["error"] = (logs / "rank0.log").read_text()[-1500:]
        return row
    record = json.loads((out / "nvfp4_pp.json").read_text())
    row["verify"] = record.get("verification", "-")
    choices = [c["chosen"] for rank in record.get("ranks", []) for c in rank.get("choices", [])]
    if choices:  # auto: how many layers each candidate won
        row["choices"] = ", ".join(f"{n} {choices.count(n)}" for n in dict.fromkeys(choices))
    guard = next((rank["guard"] for rank in record.get("ranks", []) if rank.get("guard")), None)
    if guard:  # auto's run-level guard: both sides' held-out KL and the kept one
        errors = guard["errors"]
        row["guard"] = f"kept {guard['kept']} (" + ", ".join(f"{n} {e:.4g}" for n, e in errors.items()) + ")"
    if compare:
        reference = work / f"reference-{name}"
        options = ["--recipe", recipe, "--algorithm", algorithm, "--ignore", ",".join(ignore),
                   *(["--layerwise", "on"] if boundary else [])]
        ref = subprocess.run([sys.executable, str(REPO / "tests" / "reference.py"), *options, str(model), str(tokens),
                              str(reference), "sdpa", "cuda:0" if device == "cuda" else "cpu"],
                             capture_output=True, text=True)
        if ref.returncode:
            row["identity"] = f"reference failed: {ref.stderr.strip().splitlines()[-1][:200]}"
        else:
            differences = tensor_differences(load_tensors(out), load_tensors(reference))
            row["identity"] = "identical" if not differences else f"{len(differences)} differ, e.g. {differences[0]}"
    return row


def llmcompressor_gptq(model: Path, tokens: Path, work: Path) -> dict:
    """llm-compressor's GPTQ W4A16 (group 128, symmetric INT4) as its examples run it; compressed save."""
    out = work / "out-llmcompressor-gptq-w4a16"
    ignore = ["lm_head", *(f"re:.*{p.lstrip('*')}$" for p in int4_ignore(model))]
    child = f"""
import json, torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from transformers import AutoModelForCausalLM
rows = [json.loads(l)["input_ids"] for l in open({str(tokens)!r}) if l.strip()]
model = AutoModelForCausalLM.from_pretrained({str(model)!r}, dtype=torch.bfloat16, device_map="cuda")
data = Dataset.from_dict({{"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}})
oneshot(model=model, dataset=data, recipe=GPTQModifier(targets="Linear", scheme="W4A16", ignore={ignore!r}),
        max_seq_length=max(map(len, rows)), num_calibration_samples=len(rows), shuffle_calibration_samples=False)
model.save_pretrained({str(out)!r}, save_compressed=True)
"""
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    row = {"name": "llm-compressor GPTQ W4A16", "recipe": "w4a16_int4 (compressed-tensors)", "algorithm": "gptq",
           "layerwise": "its sequential pipeline", "exit": result.returncode, "seconds": time.perf_counter() - t0,
           "out": str(out)}
    if result.returncode:
        row["error"] = result.stderr[-1500:]
    else:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(model).save_pretrained(out)
    return row


def transformers_kl(source: Path, out: Path, samples: list[list[int]], device: str = "cpu") -> float:
    """Mean KL to BF16 of the checkpoint as transformers + compressed-tensors load it (weights dequantized,
    BF16 activations: `evaluate`'s w4a16 figure, which it must equal)."""
    from nvfp4_pp.evaluate.quality import log_probs

    reference, model = _bf16(source, device), _transformers_load(out, device)
    kl, count = 0.0, 0
    for ids in samples:
        ref, lp = log_probs(reference, ids, torch.device(device)), log_probs(model, ids, torch.device(device))
        kl += float((ref.exp() * (ref - lp)).sum())
        count += len(ids) - 1
    return kl / count


def _bf16(source: Path, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).to(device).eval()


def _transformers_load(out: Path, device: str):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, device_map=device,
                                                quantization_config=CompressedTensorsConfig(dequantize=True)).eval()


def load_device_differences(out: Path) -> str:
    """Which weights transformers + compressed-tensors dequantize differently when loading onto the GPU
    than onto the CPU (the CPU load is the one tests/test_quality.py ties to nvfp4_pp's decoder)."""
    cpu = _transformers_load(out, "cpu").state_dict()
    gpu = {k: v.cpu() for k, v in _transformers_load(out, "cuda").state_dict().items()}
    differ = [(k, float((cpu[k].float() - gpu[k].float()).abs().max())) for k in cpu if not torch.equal(cpu[k], gpu[k])]
    if not differ:
        return "same on GPU and CPU"
    worst = max(differ, key=lambda d: d[1])
    return f"{len(differ)} of {len(cpu)} tensors differ on the GPU, e.g. {differ[0][0]}; worst {worst[0]} by {worst[1]:.3g}"


def _version(module: str) -> str:
    import importlib

    return getattr(importlib.import_module(module), "__version__", "?")


def evaluate_row(row: dict, model: Path, held_out: list[list[int]], device: str, client: bool) -> float | None:
    """Perplexity and KL of a finished run's checkpoint into `row` (and, `client`, transformers' KL of a
    compressed-tensors one); the BF16 perplexity, or None when there was nothing to measure."""
    from nvfp4_pp.evaluate.quality import evaluate

    if row["exit"] != 0:
        return None
    try:
        results = evaluate(model, Path(row["out"]), held_out, device)
    except Exception as e:  # a layout the decoder refuses is a finding, not a crash of the table
        row["error"] = f"evaluate: {e}"
        return None
    kind = "w4a4" if "w4a4" in results else "w4a16"
    row["ppl"], row["kl"], row["measured"] = results[kind]["perplexity"], results[kind]["kl"], kind
    if client and row.get("layout") == _CT:  # a real client's reading of the same files, on the CPU (and GPU)
        row["transformers_kl"] = transformers_kl(model, Path(row["out"]), held_out)
        row["w4a16_kl"] = results["w4a16"]["kl"]
        if device == "cuda":
            row["transformers_gpu"] = (f"KL {transformers_kl(model, Path(row['out']), held_out, device):.4f}; "
                                       + load_device_differences(Path(row["out"])))
    print(f"{row['name']}: {kind} perplexity {row['ppl']:.2f}, KL {row['kl']:.3f}"
          f"{', ' + row['choices'] if 'choices' in row else ''}{'; guard ' + row['guard'] if 'guard' in row else ''}",
          flush=True)
    return results["bf16"]["perplexity"]


def report(rows: list[dict], args: argparse.Namespace, held_out: list[list[int]], bf16: float | None) -> str:
    """The results as markdown: the quality table, transformers' readings, `auto`'s choices and guard."""
    rows = sorted(rows, key=lambda r: list(RUNS).index(r["name"]) if r["name"] in RUNS else len(RUNS))
    lines = [f"SmolLM2-135M ({args.model}), calibration {args.samples} x {args.seq} tokens of the built-in corpus, "
             f"held-out {len(held_out)} x {args.eval_length} tokens; {args.ranks} ranks on one "
             f"{torch.cuda.get_device_name(0) if args.device == 'cuda' else 'CPU'} (gloo); BF16 perplexity "
             f"{bf16 or float('nan'):.2f}; transformers {_version('transformers')}, compressed-tensors "
             f"{_version('compressed_tensors')}, modelopt {_version('modelopt')}",
             "", "| run | recipe | algorithm | layer by layer | ppl | KL | measured | vs modelopt 1 process | s |",
             "|---|---|---|---|---:|---:|---|---|---:|"]
    ct_lines = ["", "Compressed-tensors outputs loaded by transformers + compressed-tensors (weights dequantized, "
                "BF16 activations) against nvfp4_pp's decoder, the same files:", "",
                "| run | W4A16 KL, nvfp4_pp's decoder | W4A16 KL, transformers (CPU) | verify | transformers on the GPU |",
                "|---|---:|---:|---|---|"]
    ct_lines += [f"| {r['name']} | {r['w4a16_kl']:.4f} | {r['transformers_kl']:.4f} | {r.get('verify', '-')} | "
                 f"{r.get('transformers_gpu', '-')} |" for r in rows if "transformers_kl" in r]
    if not any("transformers_kl" in r for r in rows):  # --no-client
        ct_lines = []
    for r in rows:
        quality = (f"{r['ppl']:.2f} | {r['kl']:.3f} | {r['measured']}" if "ppl" in r
                   else f"- | - | {('FAILED: ' + r.get('error', '')[-120:]).replace('|', '/').replace(chr(10), ' ')}")
        lines.append(f"| {r['name']} | {r['recipe']} | {r['algorithm']} | {r['layerwise']} | {quality} | "
                     f"{r.get('identity', 'not compared').replace('|', '/')} | {r['seconds']:.0f} |")
    chose = [f"- {r['name']}: {r['choices']} layers" + (f"; run-level guard {r['guard']}" if "guard" in r else "")
             for r in rows if "choices" in r]
    ct_lines += ["", "`auto`'s choices per layer:", "", *chose] if chose else []
    return "\n".join(lines + ct_lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--ranks", type=int, default=3)
    p.add_argument("--jobs", type=int, default=4, help="runs at once on the GPU")
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument("--peers", default="llmcompressor", help="llmcompressor or none")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=32)
    p.add_argument("--eval-length", type=int, default=512)
    p.add_argument("--work", type=Path, default=Path("/tmp/nvfp4_pp-alg"))
    p.add_argument("--report", type=Path)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke test of INT4 runs")
    p.add_argument("--no-client", action="store_true",
                   help="skip transformers + compressed-tensors' reading of the outputs (minutes of CPU per run)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU (modelopt 0.47 runs NVFP4 GPTQ, scale searches and AWQ-lite on CUDA only)",
              file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    model, _ = write_model(args.model, args.work)
    tokens = write_calibration(model, args.work, args.samples, args.seq)
    names = [n for n in args.runs.split(",") if n]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(one_run, n, model, tokens, args.work, args.ranks, args.device) for n in names]
        if args.peers == "llmcompressor":
            futures.append(pool.submit(llmcompressor_gptq, model, tokens, args.work))
        from nvfp4_pp.evaluate.quality import eval_samples

        held_out = eval_samples("builtin:pydoc", args.eval_samples, args.eval_length, model)
        rows = []
        bf16 = None
        for future in as_completed(futures):  # each run evaluated as it ends, while the others go on
            rows.append(future.result())
            r = rows[-1]
            print(f"{time.perf_counter() - t0:5.0f} s  {r['name']}: exit {r['exit']} in {r['seconds']:.0f} s, "
                  f"{r.get('identity', 'not compared')}", flush=True)
            bf16 = evaluate_row(r, model, held_out, args.device, not args.no_client) or bf16
            if args.report:  # kept as the runs end: a deadline leaves the finished ones
                args.report.write_text(report(rows, args, held_out, bf16))
    print(f"all runs: {time.perf_counter() - t0:.0f} s", flush=True)

    text = report(rows, args, held_out, bf16)
    print(text)
    if args.report:
        args.report.write_text(text)
    for r in rows:
        if "error" in r:
            print(f"--- {r['name']}:\n{r['error']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
