"""Throughput of nvfp4_pp against its peers on the same synthetic checkpoint and samples.

    python benchmarks/throughput.py --gpus 2 --layers 8 --samples 256 --seq 1024 --work /tmp/bench

Writes a random-weight checkpoint with the real layer shapes of Llama-3.3-70B (or Mistral-Large-123B,
`--shape mistral123b`), then times on the same data, in one call:
  - the plain BF16 forward of the decoder stack (one GPU): the speed calibration should approach;
  - nvfp4_pp with 1 .. N ranks (one per GPU), N = --gpus;
  - modelopt's single-process path: from_pretrained(device_map="auto") over the same GPUs,
    mtq.quantize(NVFP4_DEFAULT_CFG) and export_hf_checkpoint, in its own process;
  - llm-compressor's oneshot with its NVFP4 scheme (model on CPU, its sequential pipeline onloading
    one layer at a time to GPU 0, as its examples do) and save_pretrained, in its own process;
and checks nvfp4_pp's checkpoints against modelopt's tensor for tensor (same samples, batch 1).
and prints one markdown table (also written to --report), plus the floor of each phase: bytes read
over measured read bandwidth, calibration FLOPs over the measured bf16 matmul rate.
Nothing here is specific to 2 GPUs: --gpus 4 or 8 runs unchanged on larger machines.
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

SHAPES = {
    "llama70b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=8192,
                     num_attention_heads=64, num_key_value_heads=8, intermediate_size=28672,
                     vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
                     tie_word_embeddings=False),
    "mistral123b": dict(architectures=["MistralForCausalLM"], model_type="mistral", hidden_size=12288,
                        num_attention_heads=96, num_key_value_heads=8, head_dim=128, intermediate_size=28672,
                        vocab_size=32768, rope_theta=1000000.0, max_position_embeddings=131072,
                        tie_word_embeddings=False, sliding_window=None),
}
SHAPES["tiny"] = dict(SHAPES["llama70b"], hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=512, vocab_size=1024)  # a smoke test of this script on CPU
REPO = Path(__file__).resolve().parent.parent
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_record(out: Path):
    """The run's nvfp4_pp.json through nvfp4_pp's own reader (a typed RunRecord)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from nvfp4_pp.publish.run_record import read_run_record

    return read_run_record(out)


def peak_bytes(memory) -> int:
    """A rank's bounding pool: its device where it has one, else the host."""
    return memory.device if memory.device is not None else memory.host


def write_checkpoint(path: Path, shape: str, layers: int) -> int:
    """Random BF16 weights (std 0.02) with the real shapes; one shard per layer. Returns bytes written."""
    from safetensors.torch import save_file

    cfg = {**SHAPES[shape], "num_hidden_layers": layers, "rms_norm_eps": 1e-5, "hidden_act": "silu",
           "dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
    if (path / "config.json").is_file() and json.loads((path / "config.json").read_text()) == cfg:
        return sum(f.stat().st_size for f in path.glob("*.safetensors"))
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    gen = torch.Generator(DEV).manual_seed(0)

    def rand(*s):
        return (torch.randn(*s, generator=gen, device=DEV, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()

    weight_map, total = {}, 0

    def save(name: str, tensors: dict) -> None:
        nonlocal total
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += (path / name).stat().st_size

    save("embed.safetensors", {"model.embed_tokens.weight": rand(v, h)})
    for n in range(layers):
        p = f"model.layers.{n}."
        save(f"layer-{n:03d}.safetensors", {
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "self_attn.q_proj.weight": rand(q, h), p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, q),
            p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
            p + "mlp.down_proj.weight": rand(h, i)})
    save("head.safetensors", {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16), "lm_head.weight": rand(v, h)})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import write_tiny_tokenizer  # a servable checkpoint needs a tokenizer

    write_tiny_tokenizer(path, cfg["vocab_size"])
    (path / "config.json").write_text(json.dumps(cfg))
    return total


def write_tokens(path: Path, samples: int, seq: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    rows = torch.randint(0, vocab, (samples, seq), generator=gen).tolist()
    path.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    return rows


def gpu_peaks() -> list[float]:
    return [torch.cuda.max_memory_allocated(d) / 1e9 for d in range(torch.cuda.device_count())]


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def plain_forward(model_dir: Path, rows: list[list[int]]) -> dict:
    """The BF16 decoder stack on one GPU, no quantizers: the rate calibration should approach."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map={"": DEV})
    decoder = model.model
    with torch.no_grad():
        decoder(torch.tensor([rows[0]], device=DEV))  # warm-up
        sync()
        t0 = time.perf_counter()
        for r in rows:
            decoder(torch.tensor([r], device=DEV), use_cache=False)
        sync()
        dt = time.perf_counter() - t0
    del model, decoder
    return {"tokens_per_s": len(rows) * len(rows[0]) / dt, "seconds": dt}


def run_nvfp4_pp(model_dir: Path, tokens: Path, out: Path, ranks: int, samples: int, seq: int) -> dict:
    config = out.parent / f"nvfp4_pp-{ranks}.yaml"
    config.write_text(json.dumps({
        "model": str(model_dir), "output": str(out), "format": "modelopt",
        "calibration": {"dataset": str(tokens), "samples": samples, "max_length": seq, "batch_size": 1},
        "pipeline": {"layers": "auto"}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if DEV == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(ranks)))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={ranks}", "-m", "nvfp4_pp.run", str(config), "--overwrite"],
                          env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"nvfp4_pp with {ranks} ranks failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    print(proc.stdout[-4000:], flush=True)
    record = read_record(out)
    ranks_info = record.ranks
    tokens_total = record.calibration.manifest.tokens
    calib = max(r.phases["calibrate"] for r in ranks_info)
    loops = [r.phases["calibration loop"] for r in ranks_info if "calibration loop" in r.phases]
    return {
        "wall": wall, "load": max(r.phases["load"] for r in ranks_info), "calibrate": calib,
        "export": max(r.phases["export"] for r in ranks_info), "tokens_per_s": tokens_total / calib,
        "loop_tokens_per_s": tokens_total / max(loops) if loops else None,
        "peaks": [peak_bytes(r.measured) / 1e9 for r in ranks_info],
        "bytes_per_token": max(r.traffic.bytes_sent for r in ranks_info) / tokens_total,
        "layers": [list(r.layers) for r in ranks_info],
    }


def run_peer(peer: str, model_dir: Path, tokens: Path, out: Path, gpus: int) -> dict:
    """A peer's path in its own process, so that its total, like nvfp4_pp's, includes starting
    Python and importing the libraries (and its peak GPU memory counts from zero); the phases are
    timed inside it."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, f"--{peer}-child", str(model_dir), str(tokens), str(out),
                           str(gpus)], capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{peer} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.rsplit("RESULT ", 1)[1])
    return {**result, "in_process": result["wall"], "wall": wall}


def modelopt_child(model_dir: Path, rows: list[list[int]], out: Path, gpus: int) -> dict:
    """modelopt's own single-process path, model spread over the GPUs by accelerate."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    placement = {"device_map": "auto", "max_memory": {d: "130GiB" for d in range(gpus)}} if DEV == "cuda" else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, **placement)
    load = time.perf_counter() - t0
    first = next(model.parameters()).device

    def loop(m):
        for r in rows:
            m(torch.tensor([r], device=first))

    t0 = time.perf_counter()
    mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, loop)
    sync()
    calib = time.perf_counter() - t0
    t0 = time.perf_counter()
    export_hf_checkpoint(model, export_dir=str(out))
    export = time.perf_counter() - t0
    peaks = gpu_peaks()
    del model
    torch.cuda.empty_cache()
    return {"wall": load + calib + export, "load": load, "calibrate": calib, "export": export,
            "tokens_per_s": len(rows) * len(rows[0]) / calib, "loop_tokens_per_s": None,
            "peaks": peaks[:gpus], "bytes_per_token": None}


def llmcompressor_child(model_dir: Path, rows: list[list[int]], out: Path, gpus: int) -> dict:
    """llm-compressor's oneshot NVFP4 as its examples run it: the model loaded on CPU, the sequential
    pipeline onloading one decoder layer at a time to the first GPU; then its compressed save."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    data = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=QuantizationModifier(targets="Linear", scheme="NVFP4", ignore=["lm_head"]),
            max_seq_length=len(rows[0]), num_calibration_samples=len(rows), shuffle_calibration_samples=False)
    sync()
    calib = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.save_pretrained(out, save_compressed=True)
    export = time.perf_counter() - t0
    peaks = gpu_peaks()
    return {"wall": load + calib + export, "load": load, "calibrate": calib, "export": export,
            "tokens_per_s": len(rows) * len(rows[0]) / calib, "loop_tokens_per_s": None,
            "peaks": peaks[:1], "bytes_per_token": None}


PEERS = {"modelopt": modelopt_child, "llmcompressor": llmcompressor_child}


def floors(model_dir: Path, tokens: int, layers: int) -> dict:
    """Measured read bandwidth (page cache, as the runs see it) and bf16 matmul rate on GPU 0."""
    shard = max(model_dir.glob("layer-*.safetensors"), key=lambda p: p.stat().st_size)
    t0 = time.perf_counter()
    with open(shard, "rb") as f:
        while f.read(64 << 20):
            pass
    read_bw = shard.stat().st_size / (time.perf_counter() - t0)
    n = 8192 if DEV == "cuda" else 1024
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    sync()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    sync()
    flops = 10 * 2 * n**3 / (time.perf_counter() - t0)
    cfg = json.loads((model_dir / "config.json").read_text())
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    layer_params = h * (2 * q + 2 * kv) + 3 * h * i
    return {"read_bytes_per_s": read_bw, "bf16_flops": flops, "layer_params": layer_params,
            "calib_flops": 2 * layer_params * tokens * layers}


def table(results: dict[str, dict], peers: list[str]) -> str:
    """One row per run; one speedup column per peer (its total over the row's total)."""
    head = ("| run | load s | calib tokens/s | export s | total s | peak GPU GB per rank | bytes sent/token | "
            + " | ".join(f"speedup vs {p}" for p in peers) + " |")
    lines = [head, "|" + "---|" * (7 + len(peers))]
    for name, r in results.items():
        speeds = [f"{results[p]['wall'] / r['wall']:.2f}x" if p in results else "-" for p in peers]
        bpt = "-" if r.get("bytes_per_token") in (None, 0) else f"{r['bytes_per_token']:.0f}"
        lines.append(f"| {name} | {r['load']:.1f} | {r['tokens_per_s']:,.0f} | {r['export']:.1f} | "
                     f"{r['wall']:.1f} | {' / '.join(f'{p:.1f}' for p in r['peaks'])} | {bpt} | "
                     + " | ".join(speeds) + " |")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] and sys.argv[1].endswith("-child"):
        child = PEERS[sys.argv[1][2:-len("-child")]]
        model_dir, tokens, out, gpus = sys.argv[2:6]
        rows = [json.loads(line)["input_ids"] for line in Path(tokens).read_text().splitlines()]
        print("RESULT " + json.dumps(child(Path(model_dir), rows, Path(out), int(gpus))), flush=True)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=max(torch.cuda.device_count(), 1))
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama70b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--work", type=Path, default=Path("/tmp/nvfp4_pp-bench"))
    ap.add_argument("--report", type=Path, default=None)
    ap.add_argument("--peers", default="modelopt,llmcompressor",
                    help="comma-separated peers to time beside nvfp4_pp (modelopt, llmcompressor; empty: none)")
    args = ap.parse_args()
    peers = [p for p in args.peers.split(",") if p]
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        ap.error(f"unknown peer(s) {unknown}; choose from {sorted(PEERS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = args.work / f"{args.shape}-{args.layers}l"
    t0 = time.perf_counter()
    nbytes = write_checkpoint(model_dir, args.shape, args.layers)
    log(f"checkpoint {model_dir}: {nbytes / 1e9:.1f} GB in {time.perf_counter() - t0:.0f} s")
    vocab = SHAPES[args.shape]["vocab_size"]
    rows = write_tokens(args.work / "tokens.jsonl", args.samples, args.seq, vocab)
    tokens = args.samples * args.seq

    results: dict[str, dict] = {}
    fl = floors(model_dir, tokens, args.layers)
    log(f"floors: read {fl['read_bytes_per_s'] / 1e9:.1f} GB/s, bf16 {fl['bf16_flops'] / 1e12:.0f} TFLOP/s")
    plain = plain_forward(model_dir, rows)
    log(f"plain BF16 forward: {plain['tokens_per_s']:,.0f} tokens/s")
    for n in sorted({1, 2, args.gpus} & set(range(1, args.gpus + 1))):
        try:
            results[f"nvfp4_pp {n} GPU"] = run_nvfp4_pp(model_dir, args.work / "tokens.jsonl",
                                                        args.work / f"out-pp{n}", n, args.samples, args.seq)
            log(f"nvfp4_pp {n} ranks: {results[f'nvfp4_pp {n} GPU']}")
        except RuntimeError as e:  # keep measuring the others; the failure is in the log
            log(str(e))
    names = {"modelopt": f"modelopt device_map {args.gpus} GPU", "llmcompressor": "llm-compressor oneshot 1 GPU"}
    for peer in peers:
        try:
            results[names[peer]] = run_peer(peer, model_dir, args.work / "tokens.jsonl", args.work / f"out-{peer}",
                                            args.gpus)
            log(f"{peer}: {results[names[peer]]}")
        except RuntimeError as e:  # keep measuring the others; the failure is in the log
            log(str(e))
    identity = []
    if names["modelopt"] in results:
        sys.path.insert(0, str(REPO / "tests"))
        from helpers import load_tensors, tensor_differences

        theirs = load_tensors(args.work / "out-modelopt")
        for n in sorted({1, 2, args.gpus} & set(range(1, args.gpus + 1))):
            if (args.work / f"out-pp{n}" / "config.json").is_file():
                ours = load_tensors(args.work / f"out-pp{n}")
                diffs = tensor_differences(ours, theirs)
                identity.append(f"nvfp4_pp {n} GPU vs modelopt: {len(ours) - len(diffs)}/{len(ours)} tensors "
                                f"bit-identical{'' if not diffs else '; e.g. ' + '; '.join(diffs[:3])}")

    layer_gb = fl["layer_params"] * 2 / 1e9
    device_name = torch.cuda.get_device_name(0) if DEV == "cuda" else "CPU"
    lines = [f"# nvfp4_pp throughput, {time.strftime('%Y-%m-%d')}, {device_name} x{args.gpus}",
             f"{args.shape} shapes, {args.layers} layers ({nbytes / 1e9:.1f} GB), {args.samples} x {args.seq} "
             f"random tokens, batch 1", "", table(results, [names[p] for p in peers]), "",
             f"plain BF16 forward of the decoder stack on 1 GPU: {plain['tokens_per_s']:,.0f} tokens/s",
             "totals are whole processes (start, imports, load, calibration, export; nvfp4_pp also verifies); "
             "calib tokens/s is the calibration phase (quantizer insertion + loop + closing statistics)", "",
             *identity, ""]
    one = results.get("nvfp4_pp 1 GPU")
    if one:
        lines.append(f"calibration / plain forward (1 GPU): phase {one['tokens_per_s'] / plain['tokens_per_s']:.2f}x"
                     + (f", loop {one['loop_tokens_per_s'] / plain['tokens_per_s']:.2f}x"
                        if one.get("loop_tokens_per_s") else ""))
    for name, r in results.items():
        if name.startswith("nvfp4_pp"):
            for (a, b), peak in zip(r["layers"], r["peaks"]):
                w = (b - a) * layer_gb + (SHAPES[args.shape]["vocab_size"] * SHAPES[args.shape]["hidden_size"] * 2 / 1e9
                                          if a == 0 else 0)
                lines.append(f"{name} layers {a}-{b - 1}: peak {peak:.2f} GB / stage weights {w:.2f} GB = {peak / w:.3f}x")
    two = results.get("nvfp4_pp 2 GPU")
    if one and two:
        lines.append(f"calibration scaling 2 GPU / 1 GPU: {two['tokens_per_s'] / one['tokens_per_s']:.2f}x")
    calib_floor = fl["calib_flops"] / fl["bf16_flops"]
    load_floor = nbytes / fl["read_bytes_per_s"]
    lines.append(f"floors (1 GPU): load {load_floor:.1f} s (read {fl['read_bytes_per_s'] / 1e9:.1f} GB/s), "
                 f"calibration {calib_floor:.1f} s ({fl['bf16_flops'] / 1e12:.0f} TFLOP/s bf16 matmul)")
    if one:
        lines.append(f"measured/floor (1 GPU): load {one['load'] / load_floor:.1f}x, "
                     f"calibration {one['calibrate'] / calib_floor:.1f}x")
    text = "\n".join(lines)
    print(text, flush=True)
    if args.report:
        args.report.write_text(text + "\n")


if __name__ == "__main__":
    main()
