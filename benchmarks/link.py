"""The link between stages, on CPU: bytes on the wire per token per hop, and when the link binds.

    sudo python benchmarks/link.py [--samples 32 --base-samples 8 --seq 256 --rates unlimited,2500mbit,2mbit]

Three hosts are network namespaces joined pairwise by veth links (a triangle: each link carries
one pair of hosts only, so its counters are that hop's traffic). Each host runs
`launch/multinode.sh` (torchrun, c10d rendezvous on host 0, gloo) on SmolLM2-135M with a fixed
calibration set (the built-in corpus cut into `--seq`-token samples), 3 stages of 10 layers.

- Every link sends frames of at most one MTU (`gso_max_segs 1`): the kernel's counters then see the
  1514-byte frames a 1500-MTU NIC sends, not 64 KB GSO super-packets.
- Bytes per token per hop come from the interface counters (tx_bytes, tx_packets of host i's link
  to host i+1) as the difference of two unlimited runs with `--samples` and `--base-samples`
  samples: the rendezvous, plan and record traffic and the connection set-up are the same in both
  and cancel; what is left scales with tokens (BF16 hidden states, nvfp4_pp's 64-byte shape header
  per micro-batch, gloo's framing, TCP/IP and Ethernet headers). The physical wire adds preamble,
  FCS and inter-frame gap (24 bytes per frame), which no counter sees; the report adds them.
- Each rate in `--rates` reruns `--samples` with `tc tbf` on both ends of every link; the calibration
  time comes from the run's own phase times (nvfp4_pp.json `ranks[].phases`). A rate low enough to
  bind (2mbit for SmolLM2 on a small CPU) checks the link-bound prediction rate / bytes per token.
  A plain TCP stream through each setting shows what the link itself carries on this machine.
- From the measured bytes per token and the GPU figures of benchmarks/results/throughput-h200x2-*,
  a table of link-bound token rates for Llama-3.3-70B and Mistral-Large-123B stages.

Needs root, iproute2 and `tc` (Linux network namespaces); otherwise it says why and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from netns import Hosts, _ip, why_namespaces_unavailable  # noqa: E402

LAYERS = [10, 10, 10]  # SmolLM2-135M's 30 layers, 3 stages
FRAMING = 24  # Ethernet preamble + SFD (8), FCS (4), inter-frame gap (12): on the wire, in no counter
H200_FORWARD = 39_003  # tokens/s, plain BF16 forward of 8 Llama-70B layers on one H200 (throughput-h200x2)
H200_LAYERS = 8
SEQ_FOR_FLOPS = 1024  # the GPU figure's sample length (attention FLOPs depend on it)
SHAPES = {  # hidden, q width, kv width, intermediate, layers
    "Llama-3.3-70B": (8192, 8192, 1024, 28672, 80),
    "Mistral-Large-123B": (12288, 12288, 1024, 28672, 88),
}
SPLITS = {"Llama-3.3-70B": [[40, 40], [20, 20, 20, 20]],
          "Mistral-Large-123B": [[41, 41, 6], [22, 22, 22, 22]]}
LINK_GBITS = [2.5, 10, 25, 200]


def log(msg: str) -> None:
    print(f"[link {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class MeshHosts(Hosts):
    """`count` namespaces, every pair joined by its own veth link; host i is 10.77.0.(i+1) on lo.

    Host i reaches host j only over its link `to<j>` (a /32 route), so that link's counters hold
    exactly the traffic between i and j. Hostnames resolve through a bound /etc/hosts, which gloo
    and torchrun use to pick the address.
    """

    def _build(self) -> None:
        for i, ns in enumerate(self.names):
            _ip("netns", "add", ns)
            _ip("link", "set", "lo", "up", ns=ns)
            _ip("addr", "add", f"{self.addresses[i]}/32", "dev", "lo", ns=ns)
        for i, ns_i in enumerate(self.names):
            for j in range(i + 1, len(self.names)):
                ns_j = self.names[j]
                a, b = f"{self.prefix}x{i}{j}", f"{self.prefix}y{i}{j}"  # made here, moved and renamed at once
                _ip("link", "add", a, "netns", ns_i, "type", "veth", "peer", "name", b, "netns", ns_j)
                for ns, old, me, peer in ((ns_i, a, i, j), (ns_j, b, j, i)):
                    _ip("link", "set", old, "name", f"to{peer}", ns=ns)
                    _ip("link", "set", f"to{peer}", "gso_max_segs", "1", "up", ns=ns)
                    _ip("route", "add", f"{self.addresses[peer]}/32", "dev", f"to{peer}",
                        "src", self.addresses[me], ns=ns)

    def links(self) -> list[tuple[int, int]]:
        """(host, peer) for every link end: the interface `to<peer>` in host's namespace."""
        n = len(self.names)
        return [(i, j) for i in range(n) for j in range(n) if i != j]

    def counters(self) -> dict[tuple[int, int], tuple[int, int]]:
        """(tx_bytes, tx_packets) of every link end."""
        out = {}
        for i, j in self.links():
            stats = json.loads(subprocess.run(["ip", "-n", self.names[i], "-s", "-j", "link", "show", f"to{j}"],
                                              check=True, capture_output=True, text=True).stdout)[0]["stats64"]["tx"]
            out[(i, j)] = (stats["bytes"], stats["packets"])
        return out

    def shape(self, rate: str | None) -> None:
        """`tc tbf` at `rate` on both ends of every link (each direction), or no shaping at all."""
        for i, j in self.links():
            base = ["tc", "-n", self.names[i], "qdisc"]
            subprocess.run([*base, "del", "dev", f"to{j}", "root"], capture_output=True)
            if rate:
                burst = max(16_000, int(bits_per_second(rate) / 8 / 1000))  # 1 ms of traffic, at least ~10 frames
                subprocess.run([*base, "add", "dev", f"to{j}", "root", "tbf", "rate", rate, "burst", str(burst),
                                "latency", "100ms"], check=True, capture_output=True, text=True)


def bits_per_second(rate: str) -> float:
    """tc's rate syntax, the units used here: 2500mbit, 2.5gbit, 800kbit."""
    for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * scale
    raise SystemExit(f"--rates: {rate!r} is not a rate like 2500mbit, 2.5gbit or 800kbit")


def link_check(hosts: MeshHosts, megabytes: int = 200) -> float:
    """Gbit/s of one plain TCP stream from host 0 to host 1 (is the shaper doing what we asked?)."""
    port = 29399
    receiver = ("import socket; s = socket.create_server(('%s', %d)); c, _ = s.accept(); n = 0\n"
                "while (b := c.recv(1 << 20)): n += len(b)\nprint(n)") % (hosts.addresses[1], port)
    sender = ("import socket, time; c = socket.create_connection(('%s', %d)); buf = bytes(1 << 20); t = time.perf_counter()\n"
              "for _ in range(%d): c.sendall(buf)\nc.shutdown(socket.SHUT_WR); c.recv(1); print(time.perf_counter() - t)"
              ) % (hosts.addresses[1], port, megabytes)
    rx = subprocess.Popen(hosts.command(1, [sys.executable, "-c", receiver]), stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)
    seconds = float(subprocess.run(hosts.command(0, [sys.executable, "-c", sender]), check=True,
                                   capture_output=True, text=True).stdout)
    received = int(rx.communicate(timeout=120)[0])
    return received * 8 / seconds / 1e9


def run_once(hosts: MeshHosts, work: Path, model: Path, samples: int, seq: int, port: int) -> dict:
    """One 3-host quantization; returns counter deltas, the run record and rank 0's log."""
    run_dir = work / f"run-{port}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    config = run_dir / "run.yaml"
    config.write_text(json.dumps({
        "model": str(model), "output": str(run_dir / "out"),
        "calibration": {"dataset": "builtin:pydoc", "samples": samples, "max_length": seq, "batch_size": 1},
        "pipeline": {"layers": LAYERS, "backend": "gloo", "timeout_s": 900},
    }))  # JSON is YAML
    names = [f"host{i}" for i in range(3)]
    etc_hosts = hosts.hosts_file(run_dir, names)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "NVFP4_PP_LOG": "INFO",
           "PYTHONPATH": str(REPO), "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    env.pop("GLOO_SOCKET_IFNAME", None)  # gloo binds to the address the hostname resolves to
    before = hosts.counters()
    t0 = time.perf_counter()
    procs = []
    for i in range(3):
        argv = [str(REPO / "launch" / "multinode.sh"), str(config), "3", f"{names[0]}:{port}"]
        procs.append(subprocess.Popen(hosts.command(i, argv, binds=[(etc_hosts, Path("/etc/hosts"))],
                                                    hostname=names[i]),
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    try:
        logs = [p.communicate(timeout=1800)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:  # torchrun and its workers: the process group we started
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    wall = time.perf_counter() - t0
    after = hosts.counters()
    if any(p.returncode for p in procs):
        raise SystemExit("a host failed:\n\n" + "\n\n".join(log[-3000:] for log in logs))
    from nvfp4_pp.publish.run_record import read_run_record

    record = read_run_record(run_dir / "out")
    shutil.rmtree(run_dir)
    delta = {k: (after[k][0] - before[k][0], after[k][1] - before[k][1]) for k in after}
    return {"samples": samples, "wall_s": wall, "delta": delta, "record": record, "log": logs[0]}


def hop_stats(run: dict) -> list[dict]:
    """Per hop (rank r -> r+1): wire bytes and frames, payload bytes nvfp4_pp counted, tokens."""
    ranks = sorted(run["record"].ranks, key=lambda m: m.rank)
    hosts = [m.host for m in ranks]
    tokens = run["record"].calibration.manifest.tokens
    out = []
    for r in range(len(ranks) - 1):
        i, j = int(hosts[r].removeprefix("host")), int(hosts[r + 1].removeprefix("host"))
        sent, frames = run["delta"][(i, j)]
        back, back_frames = run["delta"][(j, i)]
        out.append({"hop": f"{r}->{r + 1}", "store": 0 in (i, j), "tokens": tokens, "wire": sent, "frames": frames,
                    "reverse": back, "reverse_frames": back_frames,
                    "payload": ranks[r].traffic.bytes_sent, "received": ranks[r + 1].traffic.bytes_received})
    return out


def calibration_seconds(run: dict) -> tuple[float, float]:
    """(calibrate phase, calibration loop) seconds, slowest rank: the pipeline ends with its last stage."""
    phases = [m.phases for m in run["record"].ranks]
    return max(p["calibrate"] for p in phases), max(p.get("calibration loop", 0.0) for p in phases)


def layer_flops(shape: str) -> float:
    """FLOPs per token of one decoder layer: 2 x Linear weights + QK^T and AV at half the sample length."""
    hidden, q, kv, inter, _ = SHAPES[shape]
    weights = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * inter
    return 2 * weights + 2 * 2 * (SEQ_FOR_FLOPS / 2) * q


def link_table(overhead: float) -> list[str]:
    """Link-bound tokens/s per hop beside the slowest stage's compute rate, for each split and link."""
    per_layer_70b = H200_FORWARD * H200_LAYERS  # layer-tokens/s on one H200
    lines = ["| model | split | bytes/token/hop on the wire | slowest stage tokens/s (H200 est.) | "
             + " | ".join(f"link-bound at {g:g} Gbit/s" for g in LINK_GBITS) + " | link binds below |",
             "|---|---|---:|---:|" + "---:|" * len(LINK_GBITS) + "---:|"]
    for shape, splits in SPLITS.items():
        per_layer = per_layer_70b * layer_flops("Llama-3.3-70B") / layer_flops(shape)
        wire = SHAPES[shape][0] * 2 * overhead
        for split in splits:
            compute = per_layer / max(split)
            cells = []
            for g in LINK_GBITS:
                rate = g * 1e9 / 8 / wire
                cells.append(f"**{rate:,.0f}** (link)" if rate < compute else f"{rate:,.0f}")
            binding = wire * compute * 8 / 1e9  # Gbit/s the stage's output needs
            lines.append(f"| {shape} | {'/'.join(map(str, split))} | {wire:,.0f} | {compute:,.0f} | "
                         + " | ".join(cells) + f" | {binding:.2f} Gbit/s |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--base-samples", type=int, default=8, help="the run subtracted to cancel fixed traffic")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sample (= per micro-batch)")
    parser.add_argument("--rates", default="unlimited,2500mbit,2mbit",
                        help="tc tbf rates in run order, comma-separated; repeat one to repeat its run")
    parser.add_argument("--work", type=Path, default=Path("/tmp/nvfp4_pp-link"))
    parser.add_argument("--report", type=Path, help="write the markdown report here too")
    args = parser.parse_args()
    reason = why_namespaces_unavailable() or (None if shutil.which("tc") else "the `tc` command is missing")
    if reason:
        print(f"link benchmark skipped: {reason}")
        return
    started = time.perf_counter()
    from nvfp4_pp.demo_model import write_demo_model

    model = write_demo_model(args.work / "SmolLM2-135M")
    hidden = json.loads((model / "config.json").read_text())["hidden_size"]
    rates = [None if r == "unlimited" else r for r in args.rates.split(",")]
    if rates[0] is not None:
        raise SystemExit("--rates must start with `unlimited`: the bytes per token come from two unlimited runs")
    for rate in filter(None, rates):
        bits_per_second(rate)  # a bad rate stops us before any run
    hosts = MeshHosts(3)
    port = 29401
    try:
        runs: list[tuple[str, dict]] = []
        checks: dict[str, float] = {}
        for rate in rates:
            hosts.shape(rate)
            label = rate or "unlimited"
            megabytes = 200 if rate is None else max(1, min(200, int(bits_per_second(rate) * 2 / 8e6)))
            checks[label] = link_check(hosts, megabytes)
            log(f"{label}: one TCP stream host0->host1 carries {checks[label] * 1000:,.1f} Mbit/s")
            first_unlimited = rate is None and not runs
            for samples in ([args.base_samples, args.samples] if first_unlimited else [args.samples]):
                run = {**run_once(hosts, args.work, model, samples, args.seq, port), "stream": checks[label]}
                port += 1
                runs.append((label, run))
                calib, loop = calibration_seconds(run)
                log(f"{label}, {samples} samples: calibrate {calib:.1f} s (loop {loop:.1f} s), run {run['wall_s']:.1f} s, "
                    + ", ".join(f"hop {h['hop']} {h['wire']:,} B in {h['frames']:,} frames" for h in hop_stats(run)))
    finally:
        hosts.close()

    lines = [f"# Link benchmark (CPU, network namespaces), {time.strftime('%Y-%m-%d')}", "",
             f"`python benchmarks/link.py --samples {args.samples} --base-samples {args.base_samples} "
             f"--seq {args.seq} --rates {args.rates}`", "",
             f"SmolLM2-135M (hidden {hidden}), 3 hosts x 1 rank, layers {LAYERS}, gloo over veth (MTU 1500, "
             f"no GSO), calibration builtin:pydoc, samples of {args.seq} tokens, micro-batch 1 sample.", "",
             "## Runs", "",
             "| link | samples | tokens | calibrate s | loop s | loop tokens/s | run wall s | TCP stream Mbit/s | "
             "hop | wire bytes (tx) | frames | reverse bytes | payload bytes (nvfp4_pp) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for label, run in runs:
        calib, loop = calibration_seconds(run)
        for h in hop_stats(run):
            lines.append(f"| {label} | {run['samples']} | {h['tokens']:,} | {calib:.1f} | {loop:.1f} | "
                         f"{h['tokens'] / loop:,.0f} | {run['wall_s']:.1f} | {run['stream'] * 1000:,.1f} | {h['hop']} | "
                         f"{h['wire']:,} | {h['frames']:,} | {h['reverse']:,} | {h['payload']:,} |")
    base, full = runs[0][1], runs[1][1]
    lines += ["", f"## Bytes per token per hop ({args.samples} minus {args.base_samples} samples, unlimited)", "",
              "| hop | tokens | payload B/token | counted B/token (Ethernet+IP+TCP+gloo+payload) | frames/token | "
              "wire B/token (+24 B/frame) | wire / payload | reverse (ACK) B/token | link carries the rendezvous store |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    wires, clean = [], []
    for hb, hf in zip(hop_stats(base), hop_stats(full)):
        tokens = hf["tokens"] - hb["tokens"]
        payload = (hf["payload"] - hb["payload"]) / tokens
        counted = (hf["wire"] - hb["wire"]) / tokens
        frames = (hf["frames"] - hb["frames"]) / tokens
        wire = counted + FRAMING * frames
        (wires if hf["store"] else clean).append(wire)
        lines.append(f"| {hf['hop']} | {tokens:,} | {payload:,.1f} | {counted:,.1f} | {frames:.3f} | {wire:,.1f} | "
                     f"{wire / payload:.4f} | {(hf['reverse'] - hb['reverse']) / tokens:,.1f} | "
                     f"{'yes' if hf['store'] else 'no'} |")
    wire = max(clean or wires)  # a link without the store's heartbeats holds the pipeline's bytes only
    overhead = wire / (hidden * 2)  # every header per token: shape header, gloo, TCP/IP, Ethernet framing
    lines += ["", f"Hidden x 2 bytes = {hidden * 2:,}; wire bytes per token per hop = {wire:,.1f} = hidden x 2 x "
              f"{overhead:.4f} ({'the hop whose link carries no rendezvous-store traffic' if clean else 'the larger hop'}).",
              "", "## Calibration time per link", "",
              "| link | calibrate phase s | calibration loop s | loop tokens/s | link-bound tokens/s predicted "
              "(rate / wire bytes per token) |", "|---|---:|---:|---:|---:|"]
    for label, run in runs:
        if run["samples"] != args.samples:
            continue
        calib, loop = calibration_seconds(run)
        tokens = run["record"].calibration.manifest.tokens
        bound = "-" if label == "unlimited" else f"{bits_per_second(label) / 8 / wire:,.0f}"
        lines.append(f"| {label} | {calib:.1f} | {loop:.1f} | {tokens / loop:,.0f} | {bound} |")
    lines += ["",
              "## Link-bound token rate for the big shapes", "",
              f"Bytes per token per hop = hidden x 2 x {overhead:.4f}. Compute: the plain BF16 forward of 8 "
              f"Llama-3.3-70B layers on one H200 ran at {H200_FORWARD:,} tokens/s, i.e. {H200_FORWARD * H200_LAYERS:,} "
              "layer-tokens/s; a stage of L layers ~ that / L. Mistral-Large layers scale by FLOPs per token "
              f"(2 x Linear weights + attention at {SEQ_FOR_FLOPS}-token samples): "
              f"{layer_flops('Mistral-Large-123B') / layer_flops('Llama-3.3-70B'):.3f}x a Llama-70B layer. "
              "**Bold**: the link is the bottleneck. Last column: the link speed below which it binds.", "",
              *link_table(overhead), "",
              f"Benchmark wall time: {time.perf_counter() - started:.0f} s."]
    report = "\n".join(lines)
    print("\n" + report)
    if args.report:
        args.report.write_text(report + "\n")
        args.report.with_suffix(".log").write_text("\n\n".join(
            f"===== {label}, {run['samples']} samples: rank 0 log =====\n{run['log']}" for label, run in runs))


if __name__ == "__main__":
    main()
