"""A model larger than the GPU budget: nvfp4_pp's streaming stage against its peers' offloading.

    python3 benchmarks/streaming.py --layers 16 --samples 64 --seq 1024 --work /tmp/nvfp4_pp-stream --deadline-s 560

Writes the Llama-3.3-70B-shaped random-weight checkpoint of throughput.py, sets a GPU budget of a
third of its weights, and times on the same samples, each in its own process, one after another
(each tool's output is removed once it has been compared, so more layers fit on the disk):
  - one layer's shard read onto the device as the streaming stage reads it (can it hide behind compute?);
  - the plain BF16 forward of the whole decoder stack on the GPU (it fits there unbudgeted): the
    rate calibration should approach;
  - nvfp4_pp, one rank, `pipeline.memory_limit_gb` = the budget: the planner makes the stage
    streaming (layers read a window at a time, layer-major); its plan, measured peak, per-layer
    times and wait for reads are shown;
  - llm-compressor's oneshot NVFP4 (model on CPU, its sequential pipeline onloading one layer at
    a time), as throughput.py runs it;
  - modelopt's single-process path with accelerate's device_map="auto" and `max_memory` = the
    budget on the GPU (the rest offloaded to CPU), mtq.quantize + export_hf_checkpoint; it is the
    slowest, so it runs last, and with --deadline-s it is stopped in time, keeping its rate so far;
then compares nvfp4_pp's tensors with modelopt's and prints one table (also to --report).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402  (this directory's shared checkpoint writer and peers)
from throughput import (  # noqa: E402
    DEV, REPO, SHAPES, log, peak_bytes, plain_forward, read_record, write_checkpoint, write_tokens)


def run_nvfp4_pp(model_dir: Path, tokens: Path, out: Path, samples: int, seq: int, budget_gb: float,
                 stream: str, timeout: float) -> dict:
    config = out.parent / "nvfp4_pp-stream.yaml"
    config.write_text(json.dumps({
        "model": str(model_dir), "output": str(out), "format": "modelopt",
        "calibration": {"dataset": str(tokens), "samples": samples, "max_length": seq, "batch_size": 1},
        "pipeline": {"memory_limit_gb": budget_gb, "stream": stream}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    t0, launched = time.perf_counter(), time.time()
    try:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                               "-m", "nvfp4_pp.run", str(config), "--overwrite"], env=env, capture_output=True,
                              text=True, cwd=REPO, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"nvfp4_pp did not finish in {timeout:.0f} s:\n{_text(e.output)[-3000:]}") from e
    wall = time.perf_counter() - t0
    print(proc.stdout, flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvfp4_pp failed:\n{proc.stderr[-3000:]}")
    record = read_record(out)
    rank = record.ranks[0]
    tokens_total = record.calibration.manifest.tokens
    phases = rank.phases
    return {"wall": wall, "load": phases["load"], "calibrate": phases["calibrate"],
            "export": phases["export"], "tokens_per_s": tokens_total / phases["calibrate"],
            "loop": phases.get("calibration loop"), "streaming": streaming_details(proc.stdout, launched),
            "peaks": [peak_bytes(rank.measured) / 1e9],
            "predicted": (rank.predicted.device if rank.measured.device is not None else rank.predicted.host) / 1e9,
            "plan": [line.split("] ", 1)[-1] for line in proc.stdout.splitlines() if "streaming" in line
                     or "resident" in line or "layer-major" in line]}


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def streaming_details(stdout: str, launched: float) -> dict:
    """What nvfp4_pp's log says of its streaming stage: per-layer times (read wait + solve + write)
    and their split, the wait for reads, the export's span (it overlaps the loop) and how
    long after launch its first log line came."""
    layers = [float(m) for m in re.findall(r"layer \d+ solved in ([\d.]+) s", stdout)]
    split = {part: [float(v) for v in re.findall(rf"layer \d+ solved in [\d.]+ s \(.*?\b{part} ([\d.]+)", stdout)]
             for part in ("read", "advance", "calibrate", "write")}
    exported = re.findall(r"layer \d+ exported in ([\d.]+) s \(pack ([\d.]+) by the export thread; copy to host "
                          r"and hand to the writer ([\d.]+) by the copy-out thread\)", stdout)
    split |= {f"export thread {part}": [float(e[i]) for e in exported]
              for i, part in enumerate(("total", "pack", "copy+write"))}
    wait = re.search(r"calibration waited ([\d.]+) s for layer reads", stdout)
    reads = re.search(r"into pinned memory ([\d.]+) s, waiting for room on the device ([\d.]+) s, onto it ([\d.]+) s",
                      stdout)
    split |= {f"read thread {part}": [float(reads.group(i + 1))] if reads else []
              for i, part in enumerate(("to pinned", "room wait", "to device"))}
    packed = re.search(r"Linears packed and ([\d.]+) GB written in ([\d.]+) s", stdout)
    first = re.search(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", stdout, re.M)
    return {"layer_seconds": layers, "split": split, "wait": float(wait.group(1)) if wait else None,
            "export_packed_s": float(packed.group(2)) if packed else None,
            "first_line_after_s": time.mktime(time.strptime(first.group(1), "%Y-%m-%d %H:%M:%S")) - launched
            if first else None}


def layer_read(model_dir: Path) -> dict:
    """One decoder layer's shard read as the streaming stage reads it (on a GPU: each tensor staged in
    pinned memory and copied on a stream of its own, streaming.LayerStream), twice; straight onto the
    device with safetensors (the stage's read before the copy stream) once; and its bytes once more to
    host memory: can a layer's transfer hide behind its compute?"""
    from safetensors import safe_open

    shard = model_dir / "layer-001.safetensors"
    copies = torch.cuda.Stream() if DEV == "cuda" else None

    def read(device: str, staged: bool) -> float:
        t0 = time.perf_counter()
        with safe_open(shard, framework="pt", device=device) as f:
            if staged:
                with torch.cuda.stream(copies):
                    held = [f.get_tensor(k).pin_memory().to(DEV, non_blocking=True) for k in f.keys()]
                copies.synchronize()
            else:
                held = [f.get_tensor(k) for k in f.keys()]
        if DEV == "cuda":
            torch.cuda.synchronize()
        del held
        return time.perf_counter() - t0

    times = [read("cpu", True) if copies else read(DEV, False) for _ in range(2)]
    direct = read(DEV, False)
    t0 = time.perf_counter()
    with open(shard, "rb") as f:
        while f.read(64 << 20):
            pass
    host = time.perf_counter() - t0
    size = shard.stat().st_size
    return {"bytes": size, "to_device_s": times, "direct_s": direct, "host_read_s": host}


def modelopt_offload_child(model_dir: Path, rows: list[list[int]], out: Path, budget_gb: str) -> dict:
    """modelopt's single-process path with accelerate offloading what exceeds the GPU budget to CPU."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="auto",
                                                 max_memory={0: f"{float(budget_gb):.1f}GB", "cpu": "200GB"})
    load = time.perf_counter() - t0

    t0 = time.perf_counter()

    def loop(m):
        for n, r in enumerate(rows, 1):
            m(torch.tensor([r], device="cuda:0"))
            torch.cuda.synchronize()
            print(f"SAMPLE {n} {len(r)} {time.perf_counter() - t0:.3f}", flush=True)

    mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, loop)
    torch.cuda.synchronize()
    calib = time.perf_counter() - t0
    t0 = time.perf_counter()
    export_hf_checkpoint(model, export_dir=str(out))
    export = time.perf_counter() - t0
    return {"wall": load + calib + export, "load": load, "calibrate": calib, "export": export,
            "tokens_per_s": len(rows) * len(rows[0]) / calib, "peaks": [torch.cuda.max_memory_allocated(0) / 1e9]}


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def run_child(name: str, model_dir: Path, tokens: Path, out: Path, arg: str, timeout: float) -> dict:
    """A peer in its own process; one still running at `timeout` is stopped, and its rate so far
    (from its per-sample lines, where it prints them) is kept as a partial result."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, f"--{name}-child", str(model_dir), str(tokens), str(out),
                               arg], capture_output=True, text=True, cwd=REPO, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        done = re.findall(r"^SAMPLE (\d+) (\d+) ([\d.]+)$", _text(e.output), re.M)
        if not done:
            raise RuntimeError(f"{name} did not finish in {timeout:.0f} s:\n{_text(e.output)[-2000:]}") from e
        n, seq, at = int(done[-1][0]), int(done[-1][1]), float(done[-1][2])
        return {"partial": f"stopped at {timeout:.0f} s, {n} samples calibrated in {at:.1f} s",
                "tokens_per_s": n * seq / at, "wall": None, "load": None, "export": None, "peaks": [None]}
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
    ap.add_argument("--peers", default="llmcompressor,modelopt_offload",
                    help="run in this order (modelopt's offload, the slowest, last: the deadline stops it); "
                         "'none': only the plain forward and nvfp4_pp")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="seconds the whole benchmark may take; a tool still running then is stopped (its rate so "
                         "far kept where it prints one) and the table is printed with what finished")
    ap.add_argument("--budget-gb", type=float, default=None, help="GPU budget (default: a third of the weights)")
    ap.add_argument("--stream", choices=["auto", "always"], default="auto", help="pipeline.stream for nvfp4_pp")
    args = ap.parse_args()
    peers = [p for p in args.peers.split(",") if p and p != "none"]
    unknown = sorted(set(peers) - set(CHILDREN))
    if unknown:
        ap.error(f"unknown peer(s) {unknown}; choose from {sorted(CHILDREN)}")
    started = time.perf_counter()

    def left(reserve: float) -> float | None:
        """Seconds a tool may take, keeping `reserve` for what follows it (comparison, table)."""
        return None if args.deadline_s is None else max(args.deadline_s - (time.perf_counter() - started) - reserve, 1)

    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = args.work / f"{args.shape}-{args.layers}l"
    t0 = time.perf_counter()
    nbytes = write_checkpoint(model_dir, args.shape, args.layers)
    budget_gb = args.budget_gb or nbytes / 3 / 1e9
    log(f"checkpoint {model_dir}: {nbytes / 1e9:.1f} GB in {time.perf_counter() - t0:.0f} s; GPU budget "
        f"{budget_gb:.1f} GB (a third)")
    tokens = args.work / "tokens.jsonl"
    rows = write_tokens(tokens, args.samples, args.seq, SHAPES[args.shape]["vocab_size"])
    read = layer_read(model_dir)
    log(f"one layer's shard ({read['bytes'] / 1e9:.2f} GB) onto {DEV} as streaming reads it: "
        f"{', '.join(f'{t:.2f}' for t in read['to_device_s'])} s; to host memory {read['host_read_s']:.2f} s")
    if DEV == "cuda":  # built once per machine (about two minutes on a bare one): not any tool's run time
        from modelopt.torch.quantization.extensions import get_cuda_ext, get_cuda_ext_fp8

        from concurrent.futures import ThreadPoolExecutor

        t0 = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:  # two compiler runs at once
            [f.result() for f in [pool.submit(get_cuda_ext), pool.submit(get_cuda_ext_fp8)]]
        log(f"modelopt's CUDA extensions ready in {time.perf_counter() - t0:.1f} s (built on a bare machine, before "
            f"any tool is timed)")
    if DEV == "cpu":  # the CPU smoke: the plain forward on one thread, as nvfp4_pp's rank (OMP_NUM_THREADS=1)
        torch.set_num_threads(1)
    plain = plain_forward(model_dir, rows)
    log(f"plain BF16 forward: {plain['tokens_per_s']:,.0f} tokens/s ({plain['seconds']:.2f} s)")
    if DEV == "cuda":
        torch.cuda.empty_cache()

    results: dict[str, dict] = {}
    ours = args.work / "out-nvfp4_pp"
    try:
        results["nvfp4_pp streaming"] = run_nvfp4_pp(model_dir, tokens, ours, args.samples, args.seq, budget_gb,
                                                      args.stream, left(60 * len(peers) + 30))
        log(f"nvfp4_pp: {results['nvfp4_pp streaming']}")
    except RuntimeError as e:
        log(str(e))
    identity = "not compared"
    for peer in peers:
        out = args.work / f"out-{peer}"
        try:
            later = peers[peers.index(peer) + 1:]
            reserve = 60 * len(later) + (45 if peer == "modelopt_offload" or "modelopt_offload" in later else 15)
            results[peer] = run_child(peer, model_dir, tokens, out, f"{budget_gb:.3f}", left(reserve))
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

    def num(value: float | None, fmt: str = ".1f") -> str:
        return "-" if value is None else format(value, fmt)

    lines = [f"# Streaming, {time.strftime('%Y-%m-%d')}, {torch.cuda.get_device_name(0) if DEV == 'cuda' else 'CPU'}",
             f"{args.shape} shapes, {args.layers} layers ({nbytes / 1e9:.1f} GB), GPU budget {budget_gb:.1f} GB, "
             f"{args.samples} x {args.seq} random tokens, batch 1", "",
             "| run | load s | calib tokens/s | calib / plain forward | export s | total s | peak GPU GB | "
             "speedup vs modelopt offload | speedup vs llm-compressor |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        speed = [f"{results[p]['wall'] / r['wall']:.2f}x" if p in results and results[p]["wall"] and r["wall"] else "-"
                 for p in ("modelopt_offload", "llmcompressor")]
        lines.append(f"| {name} | {num(r['load'])} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s'] / plain['tokens_per_s']:.2f}x | {num(r['export'])} | {num(r['wall'])} | "
                     f"{num(r['peaks'][0])} | {speed[0]} | {speed[1]} |")
    lines += ["", f"plain BF16 forward, whole stack on the GPU: {plain['tokens_per_s']:,.0f} tokens/s "
              f"({plain['seconds']:.2f} s, {plain['seconds'] / args.layers:.3f} s a layer)",
              "totals are whole processes (start, imports, load, calibration, export; nvfp4_pp also plans and "
              "verifies); nvfp4_pp's calibration phase of a streaming stage includes reading and exporting each "
              "layer", identity]
    lines += [f"{name}: {r['partial']}" for name, r in results.items() if r.get("partial")]
    lines.append(f"one layer's shard, {read['bytes'] / 1e9:.2f} GB, onto {DEV} as the streaming stage reads it "
                 f"({'pinned staging, copy stream' if DEV == 'cuda' else 'safetensors onto the device'}): "
                 f"{', '.join(f'{t:.2f}' for t in read['to_device_s'])} s (first, second); safetensors straight "
                 f"onto {DEV} {read['direct_s']:.2f} s; read to host memory {read['host_read_s']:.2f} s")
    mine = results.get("nvfp4_pp streaming")
    if mine:
        st = mine["streaming"]
        lines += [f"nvfp4_pp measured peak {mine['peaks'][0]:.2f} GB, predicted {mine['predicted']:.2f} GB, "
                  f"budget {budget_gb:.2f} GB"]
        if mine.get("loop"):
            lines.append(f"nvfp4_pp calibration loop {mine['loop']:.1f} s of the {mine['calibrate']:.1f} s phase: "
                         f"{args.samples * args.seq / mine['loop']:,.0f} tokens/s, "
                         f"{args.samples * args.seq / mine['loop'] / plain['tokens_per_s']:.2f}x the plain forward")
        if st["layer_seconds"]:
            per = st["layer_seconds"]
            lines.append(f"nvfp4_pp per layer (read wait + solve + write): median {median(per):.2f} s, "
                         f"min {min(per):.2f}, max {max(per):.2f} ({len(per)} layers); plain forward "
                         f"{plain['seconds'] / args.layers:.3f} s a layer")
        if any(st["split"].values()):
            lines.append("nvfp4_pp per layer, median of each part (s; read, advance, calibrate, write: the "
                         "calibrating thread, write = handing the layer to the export thread; overlapping the next "
                         "layers: pack = the export thread queueing the packing and error measure on its stream, "
                         "copy+write = the copy-out thread moving them to host memory and handing them to the shard "
                         "writer; read thread: a layer into pinned memory, waiting for room on the device, onto it): " + ", ".join(
                             f"{part} {median(v):.3f}" for part, v in st["split"].items() if v))
        lines.append(f"nvfp4_pp streaming: waited {num(st['wait'])} s for layer reads; export span (exporter made "
                     f"before the loop to its last shard written, overlapping the loop) {num(st['export_packed_s'])} s")
        lines.append(f"nvfp4_pp first log line {num(st['first_line_after_s'], '.0f')} s after launch (1 s resolution)")
        lines += ["plan:", *[f"    {line}" for line in mine["plan"]]]
    text = "\n".join(lines)
    print(text, flush=True)
    if args.report:
        args.report.write_text(text + "\n")


if __name__ == "__main__":
    main()
