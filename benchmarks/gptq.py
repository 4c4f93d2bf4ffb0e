"""GPTQ on Llama-3.3-70B layer shapes: nvfp4_pp (flat and layer by layer) against modelopt's single process.

    python3 benchmarks/gptq.py --layers 4 --samples 64 --seq 1024 --work /tmp/nvfp4_pp-gptq

Writes throughput.py's random-weight checkpoint and, on the same samples, each in its own process:
  - nvfp4_pp, one rank, recipe w4a16_int4 with `algorithm: gptq`, flat (Hessians from the pipelined
    BF16 passes, every layer updated at once) and layer by layer (`layerwise.enable`, sequential);
  - modelopt's single process: from_pretrained on the GPU, mtq.quantize(INT4_BLOCKWISE_WEIGHT_ONLY_CFG
    with {"method": "gptq"}) + export_hf_checkpoint, flat and with `layerwise: {enable: true}` (its
    forward loop passes use_cache=False: with the model's KV cache its layerwise replay feeds every layer
    after the first stale keys, see nvfp4_pp/calibration/layerwise.py);
  - llm-compressor's GPTQ W4A16 (INT4 g128) oneshot, its sequential pipeline, on the same samples
    (`--peers` picks the tools beside nvfp4_pp);
then prints time per phase, the per-layer solve times nvfp4_pp logs (its GPTQ solve alone in brackets),
its measured peak against the planner's prediction, and tensor identity of each nvfp4_pp output with
modelopt's of the same mode. modelopt's CUDA extensions are built once before anything is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import DEV, REPO, SHAPES, log, peak_bytes, read_record, write_checkpoint, write_tokens  # noqa: E402

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"} if DEV == "cpu" else None
"""modelopt's reference with one CPU thread, as nvfp4_pp's rank (CPU bytes depend on the thread count)."""
MODES = {"flat": {"enable": False}, "layerwise": {"enable": True, "boundary": "sequential"}}


def child(cmd: list[str], env: dict | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
    """A tool in its own process; one stuck past `timeout` is killed and reported with the end of its output."""
    try:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        return subprocess.CompletedProcess(cmd, 124, out, err + f"\n(killed after {timeout:.0f} s)")


def peer_result(name: str, cmd: list[str], env: dict | None, timeout: float | None) -> dict | None:
    """A peer tool's child run: its RESULT line with the wall time, or None (the failure logged)."""
    t0 = time.perf_counter()
    proc = child(cmd, env, timeout)
    if proc.returncode != 0:
        log(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return None
    result = {**json.loads(proc.stdout.rsplit("RESULT ", 1)[1]), "wall": time.perf_counter() - t0}
    log(f"{name}: {result}")
    return result


def run_nvfp4_pp(model_dir: Path, tokens: Path, out: Path, samples: int, seq: int, mode: str,
                 timeout: float | None = None) -> dict:
    config = out.parent / f"nvfp4_pp-{mode}.yaml"
    config.write_text(json.dumps({
        "model": str(model_dir), "output": str(out), "format": "modelopt", "recipe": "w4a16_int4",
        "serving": {"target": "none"},
        "algorithm": "gptq", "layerwise": MODES[mode],
        "calibration": {"dataset": str(tokens), "samples": samples, "max_length": seq, "batch_size": 1}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    proc = child([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                  "-m", "nvfp4_pp.run", str(config), "--overwrite"], env, timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"nvfp4_pp {mode} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rank = read_record(out).ranks[0]
    solves = [float(s) for s in re.findall(r"layer \d+ solved in ([0-9.]+) s", proc.stdout)]
    return {"wall": wall, "load": rank.phases["load"], "calibrate": rank.phases["calibrate"],
            "export": rank.phases["export"], "peak": peak_bytes(rank.measured) / 1e9,
            "predicted": rank.predicted.device / 1e9, "solves": solves,
            "gptq_solve": [rank.gptq_solve[k] for k in sorted(rank.gptq_solve, key=int)]}


def modelopt_child(model_dir: Path, rows: list[list[int]], out: Path, mode: str) -> dict:
    import copy

    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map={"": DEV})
    load = time.perf_counter() - t0
    cfg = copy.deepcopy(mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG)
    cfg["algorithm"] = {"method": "gptq", "layerwise": {"enable": MODES[mode]["enable"]}}

    def loop(m):
        for r in rows:
            m(torch.tensor([r], device=DEV), use_cache=False)

    t0 = time.perf_counter()
    mtq.quantize(model, cfg, loop)
    if DEV == "cuda":
        torch.cuda.synchronize()
    calib = time.perf_counter() - t0
    t0 = time.perf_counter()
    export_hf_checkpoint(model, export_dir=str(out))
    export = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 1e9 if DEV == "cuda" else 0.0
    return {"wall": load + calib + export, "load": load, "calibrate": calib, "export": export, "peak": peak}


def llmcompressor_child(model_dir: Path, rows: list[list[int]], out: Path) -> dict:
    """llm-compressor's GPTQ W4A16 (INT4 g128 symmetric) as its examples run it: model on the GPU, its
    sequential pipeline (layer by layer), compressed save."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map={"": DEV})
    load = time.perf_counter() - t0
    data = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    t0 = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]),
            max_seq_length=max(map(len, rows)), num_calibration_samples=len(rows), shuffle_calibration_samples=False)
    if DEV == "cuda":
        torch.cuda.synchronize()
    calib = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.save_pretrained(out, save_compressed=True)
    export = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 1e9 if DEV == "cuda" else 0.0
    return {"wall": load + calib + export, "load": load, "calibrate": calib, "export": export, "peak": peak}


def warm_extensions() -> float:
    """modelopt's INT4 CUDA extension built once (a minute on a fresh machine), in a process of their own,
    before any tool is timed: every later process finds them built."""
    if DEV != "cuda":
        return 0.0
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from modelopt.torch.quantization.extensions import get_cuda_ext; "
                    "get_cuda_ext(raise_if_failed=True)"],
                   check=True, capture_output=True, text=True)
    return time.perf_counter() - t0


def main() -> None:
    if sys.argv[1:2] == ["--llmcompressor-child"]:
        model_dir, tokens, out = sys.argv[2:5]
        rows = [json.loads(line)["input_ids"] for line in Path(tokens).read_text().splitlines()]
        print("RESULT " + json.dumps(llmcompressor_child(Path(model_dir), rows, Path(out))), flush=True)
        return
    if sys.argv[1:2] == ["--modelopt-child"]:
        model_dir, tokens, out, mode = sys.argv[2:6]
        rows = [json.loads(line)["input_ids"] for line in Path(tokens).read_text().splitlines()]
        print("RESULT " + json.dumps(modelopt_child(Path(model_dir), rows, Path(out), mode)), flush=True)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama70b", help="tiny: a CPU smoke test")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--modes", default="flat,layerwise")
    ap.add_argument("--peers", default="modelopt,llmcompressor", help="tools beside nvfp4_pp (or none)")
    ap.add_argument("--tool-timeout-s", type=float, default=0, help="kill a tool's process after this long (0: never)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/nvfp4_pp-gptq"))
    ap.add_argument("--report", type=Path, default=None)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = args.work / f"{args.shape}-{args.layers}l"
    log(f"writing the {args.shape} checkpoint ({args.layers} layers) and the tokens")
    nbytes = write_checkpoint(model_dir, args.shape, args.layers)
    tokens = args.work / "tokens.jsonl"
    write_tokens(tokens, args.samples, args.seq, SHAPES[args.shape]["vocab_size"])
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import load_tensors, tensor_differences
    log("building/loading modelopt's CUDA extensions")
    warm = warm_extensions()
    log(f"modelopt's CUDA extensions built and loaded in {warm:.1f} s (before any timing)")
    peers = set(filter(None, args.peers.split(",")))

    lines = [f"# GPTQ W4A16 INT4 g128, {time.strftime('%Y-%m-%d')}, "
             f"{torch.cuda.get_device_name(0) if DEV == 'cuda' else 'CPU'}",
             f"{args.shape} shapes, {args.layers} layers ({nbytes / 1e9:.1f} GB), {args.samples} x {args.seq} "
             "random tokens, batch 1", "",
             f"modelopt's CUDA extensions built and loaded first ({warm:.1f} s), outside every timing", "",
             "| run | load s | calibrate s | export s | total s | peak GB (predicted) | per layer s [GPTQ solve s] |",
             "|---|---|---|---|---|---|---|"]
    notes: list[str] = []
    timeout = args.tool_timeout_s or None

    def row(line: str) -> None:
        """Each result as it comes: a call cut off still returns what finished."""
        lines.append(line)
        print(line, flush=True)
        if args.report:
            args.report.write_text("\n".join(lines + [""] + notes) + "\n")

    for index, mode in enumerate(args.modes.split(",")):
        ours, theirs = args.work / f"out-pp-{mode}", args.work / f"out-modelopt-{mode}"
        try:
            r = run_nvfp4_pp(model_dir, tokens, ours, args.samples, args.seq, mode, timeout)
            log(f"nvfp4_pp {mode}: {r}")
            solves = ", ".join(f"{s:.1f}" for s in r["solves"]) or "-"
            solves += " [GPTQ solve " + (", ".join(f"{s:.2f}" for s in r["gptq_solve"]) or "-") + "]"
            row(f"| nvfp4_pp {mode} | {r['load']:.1f} | {r['calibrate']:.1f} | {r['export']:.1f} | "
                f"{r['wall']:.1f} | {r['peak']:.1f} ({r['predicted']:.1f}) | {solves} |")
        except RuntimeError as e:
            log(str(e))
        if "modelopt" in peers:
            m = peer_result(f"modelopt {mode}", [sys.executable, __file__, "--modelopt-child", str(model_dir),
                                                 str(tokens), str(theirs), mode], ONE_THREAD, timeout)
            if m is not None:
                if (ours / "config.json").is_file():
                    a, b = load_tensors(ours), load_tensors(theirs)
                    diffs = tensor_differences(a, b)
                    notes.append(f"{mode}: nvfp4_pp vs modelopt {len(a) - len(diffs)}/{len(a)} tensors bit-identical"
                                 + ("" if not diffs else "; e.g. " + "; ".join(diffs[:3])))
                row(f"| modelopt {mode} | {m['load']:.1f} | {m['calibrate']:.1f} | {m['export']:.1f} | "
                    f"{m['wall']:.1f} | {m['peak']:.1f} | - |")
        if index == 0 and "llmcompressor" in peers:  # after the first mode: every tool measured early
            out = args.work / "out-llmcompressor"
            m = peer_result("llm-compressor", [sys.executable, __file__, "--llmcompressor-child", str(model_dir),
                                               str(tokens), str(out)], None, timeout)
            if m is not None:
                row(f"| llm-compressor GPTQ W4A16 (its sequential pipeline) | {m['load']:.1f} | "
                    f"{m['calibrate']:.1f} | {m['export']:.1f} | {m['wall']:.1f} | {m['peak']:.1f} | - |")
    text = "\n".join(lines + [""] + notes)
    print(text, flush=True)
    if args.report:
        args.report.write_text(text + "\n")


if __name__ == "__main__":
    main()
