"""A model larger than the GPU budget: nvfp4_pp's streaming stage against its peers' offloading.

    python3 benchmarks/streaming.py --layers 16 --samples 64 --seq 1024 --work /tmp/nvfp4_pp-stream

Writes the Llama-3.3-70B-shaped random-weight checkpoint of throughput.py, sets a GPU budget of a
third of its weights, and times on the same samples, each in its own process, one after another
(each tool's output is removed once it has been compared, so more layers fit on the disk):
  - the plain BF16 forward of the whole decoder stack on the GPU (it fits there unbudgeted): the
    rate calibration should approach;
  - nvfp4_pp, one rank, `pipeline.memory_limit_gb` = the budget: the planner makes the stage
    streaming (layers read a window at a time, layer-major); its plan and measured peak are shown;
  - modelopt's single-process path with accelerate's device_map="auto" and `max_memory` = the
    budget on the GPU (the rest offloaded to CPU), mtq.quantize + export_hf_checkpoint;
  - llm-compressor's oneshot NVFP4 (model on CPU, its sequential pipeline onloading one layer at
    a time), as throughput.py runs it;
then compares nvfp4_pp's tensors with modelopt's and prints one table (also to --report).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402  (this directory's shared checkpoint writer and peers)
from throughput import DEV, REPO, SHAPES, log, plain_forward, write_checkpoint, write_tokens  # noqa: E402


def run_nvfp4_pp(model_dir: Path, tokens: Path, out: Path, samples: int, seq: int, budget_gb: float,
                 stream: str) -> dict:
    config = out.parent / "nvfp4_pp-stream.yaml"
    config.write_text(json.dumps({
        "model": str(model_dir), "output": str(out), "format": "modelopt",
        "calibration": {"dataset": str(tokens), "samples": samples, "max_length": seq, "batch_size": 1},
        "pipeline": {"memory_limit_gb": budget_gb, "stream": stream}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                           "-m", "nvfp4_pp.run", str(config), "--overwrite"], env=env, capture_output=True, text=True,
                          cwd=REPO)
    wall = time.perf_counter() - t0
    print(proc.stdout[-6000:], flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvfp4_pp failed:\n{proc.stderr[-3000:]}")
    report = json.loads((out / "nvfp4_pp.json").read_text())
    rank = report["ranks"][0]
    tokens_total = report["calibration"]["tokens"]
    return {"wall": wall, "load": rank["phases"]["load"], "calibrate": rank["phases"]["calibrate"],
            "export": rank["phases"]["export"], "tokens_per_s": tokens_total / rank["phases"]["calibrate"],
            "peaks": [rank["measured"].get("device", rank["measured"]["host"]) / 1e9],
            "predicted": (rank["predicted"]["device"] if "device" in rank["measured"] else rank["predicted"]["host"]) / 1e9,
            "plan": [line.split("] ", 1)[-1] for line in proc.stdout.splitlines() if "streaming" in line
                     or "resident" in line or "layer-major" in line]}


def modelopt_offload_child(model_dir: Path, rows: list[list[int]], out: Path, budget_gb: str) -> dict:
    """modelopt's single-process path with accelerate offloading what exceeds the GPU budget to CPU."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="auto",
                                                 max_memory={0: f"{float(budget_gb):.1f}GB", "cpu": "200GB"})
    load = time.perf_counter() - t0

    def loop(m):
        for r in rows:
            m(torch.tensor([r], device="cuda:0"))

    t0 = time.perf_counter()
    mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, loop)
    torch.cuda.synchronize()
    calib = time.perf_counter() - t0
    t0 = time.perf_counter()
    export_hf_checkpoint(model, export_dir=str(out))
    export = time.perf_counter() - t0
    return {"wall": load + calib + export, "load": load, "calibrate": calib, "export": export,
            "tokens_per_s": len(rows) * len(rows[0]) / calib, "peaks": [torch.cuda.max_memory_allocated(0) / 1e9]}


def run_child(name: str, model_dir: Path, tokens: Path, out: Path, arg: str) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, f"--{name}-child", str(model_dir), str(tokens), str(out), arg],
                          capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.rsplit("RESULT ", 1)[1]), "wall": wall}


CHILDREN = {"modelopt_offload": modelopt_offload_child,
            "llmcompressor": lambda model_dir, rows, out, arg: throughput.llmcompressor_child(model_dir, rows, out, 1)}


def main() -> None:
    if sys.argv[1:2] and sys.argv[1].endswith("-child"):
        child = CHILDREN[sys.argv[1][2:-len("-child")]]
        model_dir, tokens, out, arg = sys.argv[2:6]
        rows = [json.loads(line)["input_ids"] for line in Path(tokens).read_text().splitlines()]
        print("RESULT " + json.dumps(child(Path(model_dir), rows, Path(out), arg)), flush=True)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama70b", help="tiny: a CPU smoke test")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--work", type=Path, default=Path("/tmp/nvfp4_pp-stream"))
    ap.add_argument("--report", type=Path, default=None)
    ap.add_argument("--peers", default="modelopt_offload,llmcompressor")
    ap.add_argument("--budget-gb", type=float, default=None, help="GPU budget (default: a third of the weights)")
    ap.add_argument("--stream", choices=["auto", "always"], default="auto", help="pipeline.stream for nvfp4_pp")
    args = ap.parse_args()
    peers = [p for p in args.peers.split(",") if p]
    unknown = sorted(set(peers) - set(CHILDREN))
    if unknown:
        ap.error(f"unknown peer(s) {unknown}; choose from {sorted(CHILDREN)}")
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = args.work / f"{args.shape}-{args.layers}l"
    t0 = time.perf_counter()
    nbytes = write_checkpoint(model_dir, args.shape, args.layers)
    budget_gb = args.budget_gb or nbytes / 3 / 1e9
    log(f"checkpoint {model_dir}: {nbytes / 1e9:.1f} GB in {time.perf_counter() - t0:.0f} s; GPU budget "
        f"{budget_gb:.1f} GB (a third)")
    tokens = args.work / "tokens.jsonl"
    rows = write_tokens(tokens, args.samples, args.seq, SHAPES[args.shape]["vocab_size"])
    plain = plain_forward(model_dir, rows)
    log(f"plain BF16 forward: {plain['tokens_per_s']:,.0f} tokens/s")
    if DEV == "cuda":
        torch.cuda.empty_cache()

    results: dict[str, dict] = {}
    ours = args.work / "out-nvfp4_pp"
    try:
        results["nvfp4_pp streaming"] = run_nvfp4_pp(model_dir, tokens, ours, args.samples, args.seq, budget_gb,
                                                      args.stream)
        log(f"nvfp4_pp: {results['nvfp4_pp streaming']}")
    except RuntimeError as e:
        log(str(e))
    identity = "not compared"
    for peer in peers:
        out = args.work / f"out-{peer}"
        try:
            results[peer] = run_child(peer, model_dir, tokens, out, f"{budget_gb:.3f}")
            log(f"{peer}: {results[peer]}")
        except RuntimeError as e:
            log(str(e))
        if peer == "modelopt_offload" and (out / "config.json").is_file() and (ours / "config.json").is_file():
            sys.path.insert(0, str(REPO / "tests"))
            from helpers import load_tensors, tensor_differences

            a, b = load_tensors(ours), load_tensors(out)
            diffs = tensor_differences(a, b)
            identity = (f"nvfp4_pp streaming vs modelopt offload: {len(a) - len(diffs)}/{len(a)} tensors "
                        f"bit-identical" + ("" if not diffs else "; e.g. " + "; ".join(diffs[:3])))
        shutil.rmtree(out, ignore_errors=True)  # room on the disk for the next tool
    shutil.rmtree(ours, ignore_errors=True)

    lines = [f"# Streaming, {time.strftime('%Y-%m-%d')}, {torch.cuda.get_device_name(0) if DEV == 'cuda' else 'CPU'}",
             f"{args.shape} shapes, {args.layers} layers ({nbytes / 1e9:.1f} GB), GPU budget {budget_gb:.1f} GB, "
             f"{args.samples} x {args.seq} random tokens, batch 1", "",
             "| run | load s | calib tokens/s | calib / plain forward | export s | total s | peak GPU GB | "
             "speedup vs modelopt offload | speedup vs llm-compressor |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        speed = [f"{results[p]['wall'] / r['wall']:.2f}x" if p in results else "-"
                 for p in ("modelopt_offload", "llmcompressor")]
        lines.append(f"| {name} | {r['load']:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s'] / plain['tokens_per_s']:.2f}x | {r['export']:.1f} | {r['wall']:.1f} | "
                     f"{r['peaks'][0]:.1f} | {speed[0]} | {speed[1]} |")
    lines += ["", f"plain BF16 forward, whole stack on the GPU: {plain['tokens_per_s']:,.0f} tokens/s", identity]
    mine = results.get("nvfp4_pp streaming")
    if mine:
        lines += [f"nvfp4_pp measured peak {mine['peaks'][0]:.2f} GB, predicted {mine['predicted']:.2f} GB, "
                  f"budget {budget_gb:.2f} GB", "plan:", *[f"    {line}" for line in mine["plan"]]]
    text = "\n".join(lines)
    print(text, flush=True)
    if args.report:
        args.report.write_text(text + "\n")


if __name__ == "__main__":
    main()
