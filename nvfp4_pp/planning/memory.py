"""Predicted peak memory of one stage, from safetensors headers and the calibration shape alone.

Nothing here reads a weight or touches a device: the planner calls it thousands of times.
Each term is an upper bound of something the run really holds (numbers checked against
measured peaks by tests/test_budget_run.py on CPU):

- weights: the stage's decoder layers (+ embeddings on the first rank), as loaded: BF16, an FP8
  source's weights at their dequantised size (source.nbytes). Dequantising holds one FP8 Linear
  and a few 32 MiB float64 chunks beside the loaded weights, less than the calibration transient.
- activations for one micro-batch of T = batch_size x max_length tokens: the stage's input and
  output, up to 3 hidden states in flight to the next rank (dist.Sender depth 2 + the newest),
  and the larger of one layer's attention (q, k, v, rotary copies, fp32 scores of the math SDPA
  path, causal mask) or MLP (gate, up, act, product) intermediates, plus an fp32 copy of the
  widest Linear input while its quantizer takes the amax.
- calibration transient: a weight quantizer's amax pass holds an fp32 copy of its Linear (2x the
  BF16 bytes, largest Linear).
- export transient: packing to NVFP4 (modelopt's NVFP4QTensor.quantize) holds about 13 bytes per
  weight element at once (fp32 scaled copy, int32 bucket index, 3 comparison bytes, sign, codes):
  7x the BF16 bytes of what is packed at once, a row chunk of at most sizes.EXPORT_CHUNK_ELEMENTS.
  INT4 (modelopt's pack_int4_in_uint8, same chunks) holds less: the gathered FP32 scales and the
  FP32 quotient, then its rounding (8 bytes at once), int8 codes and their nibble copies.
- export buffer: the ShardWriter holds packed tensors on the host until a shard is full
  (`sizes.DEFAULT_SHARD_BYTES`) and up to `sizes.WRITE_WORKERS` full shards while its threads
  write them, so at most min((workers + 1) x shard cap, everything the rank writes).
  On a CUDA stage each Linear's BF16 weight is freed as it is packed, and the buffer grows by
  at most 0.3 of what is freed: on a unified-memory device it therefore never raises the peak,
  on a discrete GPU it lives in host RAM, and up to three layers' packed tensors more sit in pinned
  memory on their way to it (rounded up by torch's caching host allocator, as the staging below). On a CPU stage the
  weights are memory-mapped from the shards, freeing one does not unmap the file, so the buffer
  adds on top.
- export overlap (every layer-major stage but one under `auto`'s guard): layer k is packed on its
  own stream while layer k+1 calibrates, so the export transient and one layer's packed tensors
  (before their copy to the host) come on top of the calibration; a streaming stage reads layer k+2
  only once layer k is packed, so its window of weights stays two layers. A resident stage's layer
  is packed from a copy sharing its weights (only its quantizers' few scalars are copied), and its
  BF16 weights are freed as they are packed, as in an export after calibration. On a CPU rank the
  export buffer fills meanwhile too (the memory-mapped weights it replaces stay mapped).
- quantizer state: a few scalars per quantized Linear (QUANTIZER_BYTES each).
- algorithm state (`algorithm_bytes`): GPTQ's FP32 Hessians, in_features^2 x 4 bytes per Linear
  (every Linear of the stage when flat; one layer's when layer by layer), and, layer by layer, the
  whole calibration set's hidden states twice.
- runtime: RUNTIME_BYTES for what the libraries allocate lazily (modules, gloo/NCCL buffers,
  allocator rounding), plus CUDA_FRAGMENTATION of device memory for the caching allocator. A
  CUDA rank also maps kernel images and library handles (cuBLAS, NCCL) into host RAM on first
  use, after the baseline was taken: CUDA_HOST_BYTES (measured +0.62 GB on an H100, torch 2.11),
  and its device holds cuBLAS workspaces and allocator blocks beside the tensors:
  CUDA_DEVICE_BYTES (a 135M model on an H100 peaked 20-30 MB above the other terms).
- baseline: the process's own measured RSS at start (budget.RankFacts.baseline).

Memory freed is not counted: the exporter gives malloc's free pages back after each layer
(runtime/host_malloc), else glibc keeps freed megabyte temporaries and the RSS outgrows these terms.
"""

from __future__ import annotations

import dataclasses
import math

from nvfp4_pp.algorithms.table import RECIPES, SMOOTHING_ROWS
from nvfp4_pp.model.arch import Architecture
from nvfp4_pp.sizes import DEFAULT_SHARD_BYTES, EXPORT_CHUNK_ELEMENTS, EXPORT_QUEUE_LAYERS, WRITE_WORKERS
from nvfp4_pp.model.source import SourceCheckpoint

PACKED_PER_BF16_BYTE = 0.25 + 1 / 32
"""NVFP4 bytes written per BF16 weight byte: 4-bit codes plus one FP8 scale per 16 values. It bounds
the INT4 output too (group 128: 0.25 + 1/64 with modelopt's FP32 scales, 0.25 + 1/128 in BF16)."""
FP8_PER_BF16_BYTE = 0.5 + 1 / 32
"""FP8 bytes written per BF16 weight byte, rounded up to bound the mixes that hold FP8 Linears too."""
EXPORT_TRANSIENT_PER_BF16_BYTE = 7
CALIBRATION_TRANSIENT_PER_BF16_BYTE = 2
SENDS_IN_FLIGHT = 3
QUANTIZER_BYTES = 4096
RUNTIME_BYTES = 256 * 2**20
CUDA_FRAGMENTATION = 0.02
CUDA_HOST_BYTES = 768 * 2**20
CUDA_DEVICE_BYTES = 64 * 2**20
STREAM_WINDOW = 2
"""Layers a streaming stage holds at once: the one being calibrated and the next one being read."""
PINNED_STAGING_PER_BYTE = 2
"""Host bytes per byte of a layer that a streaming stage on a discrete GPU stages in pinned memory
(streaming.LayerStream): torch's caching host allocator rounds each block up to a power of two
(at most 2x) and keeps the blocks for the next layer."""


@dataclasses.dataclass(frozen=True, slots=True)
class ModelSizes:
    """Byte sizes and shapes of a checkpoint, as far as memory planning needs them."""

    layer_bytes: tuple[int, ...]
    """All tensors of each decoder layer."""
    layer_linear_bytes: tuple[int, ...]
    """The 2-D weights of each decoder layer (the Linears that are packed to NVFP4)."""
    layer_linears: int
    """Linears per decoder layer (each carries quantizers)."""
    largest_linear: int
    """Bytes of the largest 2-D weight inside any decoder layer."""
    embed_bytes: int
    head_bytes: int
    """Final norm and lm_head: exported by the last rank, never on its device."""
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 2
    layer_hessian_bytes: int = 0
    """GPTQ's FP32 Hessians of one decoder layer: in_features^2 x 4 bytes per Linear (modelopt keeps
    one per Linear, shared inputs included), largest layer."""
    largest_hessian_bytes: int = 0
    """The largest single Linear's Hessian (Llama-70B's down_proj: 28672^2 x 4 = 3.3 GB)."""

    @property
    def num_layers(self) -> int:
        return len(self.layer_bytes)

    @classmethod
    def from_source(cls, source: SourceCheckpoint, arch: Architecture) -> ModelSizes:
        """Sizes from config.json and the safetensors headers (no tensor is read)."""
        c = source.text_config
        n = c["num_hidden_layers"]
        layer_bytes, linear_bytes, linears, hessians = [0] * n, [0] * n, [0] * n, [0] * n
        embed = head = largest = largest_hessian = 0
        for name in source.weight_map:
            nbytes = source.nbytes(name)
            layer = arch.layer_of(name)
            if layer is None:
                if arch.on_last_stage(name):
                    head += nbytes
                else:
                    embed += nbytes
                continue
            layer_bytes[layer] += nbytes
            if len(source.shape(name)) == 2 and name.endswith(".weight"):
                linear_bytes[layer] += nbytes
                linears[layer] += 1
                hessians[layer] += source.shape(name)[1] ** 2 * 4
                largest_hessian = max(largest_hessian, source.shape(name)[1] ** 2 * 4)
                largest = max(largest, nbytes)
        heads = c["num_attention_heads"]
        return cls(
            layer_bytes=tuple(layer_bytes), layer_linear_bytes=tuple(linear_bytes), layer_linears=max(linears),
            largest_linear=largest, embed_bytes=embed, head_bytes=head, hidden=c["hidden_size"],
            intermediate=c["intermediate_size"], heads=heads, kv_heads=c.get("num_key_value_heads", heads),
            head_dim=c.get("head_dim") or c["hidden_size"] // heads, layer_hessian_bytes=max(hessians, default=0),
            largest_hessian_bytes=largest_hessian,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Workload:
    """The calibration shape that sizes activations."""

    batch_size: int
    max_length: int
    calibration_tokens: int = 0
    """Tokens of the whole calibration set (layer-by-layer calibration keeps them all as hidden states)."""
    hessians: bool = False
    """The algorithm collects Hessians (GPTQ): flat, for every Linear of the stage at once."""
    layer_major: bool = False
    """Layers calibrated one at a time (layerwise.enable, or a streaming run): the stage holds the
    whole set's hidden states, and one layer's Hessians."""
    trials: bool = False
    """`algorithm: auto`: each candidate fits a copy of the layer, judged on held-out outputs."""
    smoothing: bool = False
    """`smooth` (or a stack with it): a layer's group inputs and its search's copies (smoothing_bytes)."""
    guard: bool = False
    """`auto`'s guard: its candidate run alone beside it, with two streams of hidden states and two held-out
    ones on the device, and its fitted copy of the stage's layers in host memory."""

    @property
    def tokens(self) -> int:
        return self.batch_size * self.max_length


@dataclasses.dataclass(frozen=True, slots=True)
class Need:
    """Predicted peak bytes of one stage in each pool (baseline included)."""

    device: int
    """On the stage's device (for cpu ranks the same figure as `host`)."""
    host: int
    """Host RAM; for cpu and unified ranks this is the whole footprint (the one pool)."""
    items: dict[str, int]

    def peak(self, shared: bool) -> int:
        """The figure compared with the rank's main budget pool."""
        return self.host if shared else self.device


def activation_bytes(s: ModelSizes, w: Workload, sends: bool) -> int:
    """One micro-batch in flight through one stage (see the module docstring)."""
    t, b = w.tokens, s.dtype_bytes
    hidden = t * s.hidden * b
    buffers = hidden * (2 + (SENDS_IN_FLIGHT if sends else 0))
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    scores = w.batch_size * s.heads * w.max_length**2 * 4 + w.batch_size * w.max_length**2
    attention = t * (2 * s.hidden + q + 2 * kv + 2 * (q + kv) + q) * b + scores
    mlp = t * (2 * s.hidden + 4 * s.intermediate) * b
    amax_copy = t * max(s.hidden, s.intermediate, q) * 4
    return buffers + max(attention, mlp) + amax_copy


def gptq_solve_bytes(s: ModelSizes) -> int:
    """One Linear's GPTQ update in modelopt 0.47: a damped copy of its Hessian, the Cholesky factor, the
    inverse and its upper factor (3 Hessians at once), and an FP32 copy of the weight with its error
    (2 Llama-70B layers on an H200 peaked 10.7 GB over the plan without it; this term is 11.7 GB there)."""
    return 3 * s.largest_hessian_bytes + 4 * s.largest_linear


def smoothing_bytes(s: ModelSizes) -> int:
    """The smoothing search of one layer (algorithms/smoothing.py): every group's inputs kept (SMOOTHING_ROWS
    tokens of q/k/v's, gate/up's and down_proj's input widths); for the widest group, its inputs scaled in
    FP32 and quantized, its Linears' FP32 reference outputs, and one weight's FP32 scaled and quantized copies."""
    rows, b = SMOOTHING_ROWS, s.dtype_bytes
    widest = max(s.hidden, s.intermediate)
    outputs = max(s.heads * s.head_dim + 2 * s.kv_heads * s.head_dim, 2 * s.intermediate, s.hidden)
    return (rows * (2 * s.hidden + s.intermediate) * b + rows * widest * (4 + 2 * b) + rows * outputs * 4
            + s.largest_linear // b * (4 + 2 * b))


def algorithm_bytes(s: ModelSizes, w: Workload, layers: int) -> int:
    """What the calibration algorithm holds beside the weights: GPTQ's Hessians (every Linear of the
    stage at once when flat, one layer's when layer by layer) and the solve of one Linear; layer by
    layer, also the whole set's hidden states twice (a layer's inputs and its outputs); under `auto`,
    a candidate's copy of the largest layer and the held-out outputs it is judged on (both its own and
    the BF16 layer's: at most the set's hidden states once more); with smoothing, its search of one layer
    (smoothing works layer by layer only)."""
    gptq = (s.layer_hessian_bytes * (1 if w.layer_major else layers) + gptq_solve_bytes(s)) if w.hessians else 0
    hidden_states = w.calibration_tokens * s.hidden * s.dtype_bytes
    trials = max(s.layer_bytes, default=0) + hidden_states if w.trials else 0
    smoothing = smoothing_bytes(s) if w.smoothing else 0
    guard = 3 * hidden_states if w.guard else 0  # two streams, and two of at most half the micro-batches
    if w.layer_major:
        return 2 * hidden_states + gptq + trials + smoothing + guard
    return gptq


def stage_need(
    s: ModelSizes,
    kind: str,
    baseline: int,
    start: int,
    stop: int,
    first: bool,
    last: bool,
    workload: Workload,
    wire_on_host: bool = False,
    streaming: bool = False,
) -> Need:
    """Peak memory of the stage holding decoder layers [start, stop) on a rank of `kind`.

    `wire_on_host`: hidden states cross to the next rank through host memory (gloo with a CUDA
    stage), adding host copies of what is in flight. `streaming`: only a window of two layers (the
    one calibrated, the next one being read) is held at once.
    """
    layers = s.layer_bytes[start:stop]
    linear = sum(s.layer_linear_bytes[start:stop])
    held = sum(sorted(layers)[-STREAM_WINDOW:]) if streaming else sum(layers)
    weights = held + (s.embed_bytes if first else 0)
    quantizers = QUANTIZER_BYTES * s.layer_linears * len(layers)
    activations = activation_bytes(s, workload, sends=not last)
    transient = EXPORT_TRANSIENT_PER_BF16_BYTE * min(s.largest_linear, EXPORT_CHUNK_ELEMENTS * s.dtype_bytes)
    written = math.ceil(linear * PACKED_PER_BF16_BYTE) + (sum(layers) - linear)
    written += (s.embed_bytes if first else 0) + (s.head_bytes if last else 0)
    buffer = min((WRITE_WORKERS + 1) * max(DEFAULT_SHARD_BYTES, s.embed_bytes, s.head_bytes), written)
    guard_copies = sum(layers) if workload.guard else 0  # `auto`'s guard: host memory
    wire = s.dtype_bytes * workload.tokens * s.hidden * (SENDS_IN_FLIGHT + 1) if wire_on_host else 0

    # A layer-major stage exports layer k while layer k+1 calibrates (layer_by_layer.py), unless `auto`'s guard
    # may replace its layers after the last (a streaming stage anywhere skips the guard); others calibrate, then export.
    # `auto`'s guard judges on the last stage through the source's final norm and lm_head, which no stage holds
    algorithm = algorithm_bytes(s, workload, len(layers)) + (s.head_bytes if workload.guard and last else 0)
    packed_layer = math.ceil(max(s.layer_linear_bytes[start:stop], default=0) * PACKED_PER_BF16_BYTE)
    exports_layers = streaming or (workload.layer_major and not workload.guard)
    overlap = transient + packed_layer if exports_layers else 0
    calibrate = (weights + quantizers + activations + CALIBRATION_TRANSIENT_PER_BF16_BYTE * s.largest_linear
                 + algorithm + overlap)
    export = weights + quantizers + transient
    items = {"baseline": baseline, "weights": weights, "activations": activations,
             "export transient": transient, "export buffer": buffer, "quantizers": quantizers,
             "export overlap": overlap,
             "runtime": RUNTIME_BYTES, "wire copies": wire, "layer inputs, Hessians, auto trials": algorithm,
             "auto guard's layer copies": guard_copies}
    if kind == "cpu":  # the export buffer fills while a stage that exports its layers as solved calibrates
        during = buffer if exports_layers else 0
        host = baseline + RUNTIME_BYTES + wire + max(calibrate + guard_copies + during, export + buffer)
        return Need(device=host, host=host, items=items)
    device = math.ceil(max(calibrate, export) * (1 + CUDA_FRAGMENTATION)) + CUDA_DEVICE_BYTES
    if kind == "unified":
        host = baseline + RUNTIME_BYTES + CUDA_HOST_BYTES + wire + device + guard_copies
        return Need(device=device, host=host, items={**items, "CUDA libraries": CUDA_HOST_BYTES})
    staging = PINNED_STAGING_PER_BYTE * max(layers) if streaming else 0
    # packed layers in pinned memory: one being copied there, one waiting for the copy-out, one being copied out
    pinned_export = PINNED_STAGING_PER_BYTE * (EXPORT_QUEUE_LAYERS + 2) * packed_layer
    host = baseline + RUNTIME_BYTES + CUDA_HOST_BYTES + wire + max(guard_copies, buffer + pinned_export + staging)
    return Need(device=device, host=host,
                items={**items, "CUDA libraries": CUDA_HOST_BYTES, "pinned staging": staging,
                       "pinned export copies": pinned_export})


def written_bytes(sizes: ModelSizes, recipe: str, start: int, stop: int, first: bool, last: bool) -> int:
    """About what a stage writes as shards: its Linears packed, the rest (norms, embeddings, head) as in the
    source. A Linear kept in BF16 by `ignore` or an override is counted packed, so this can fall short."""
    per_byte = FP8_PER_BF16_BYTE if RECIPES[recipe].fp8_linears else PACKED_PER_BF16_BYTE
    linear = sum(sizes.layer_linear_bytes[start:stop])
    rest = sum(sizes.layer_bytes[start:stop]) - linear
    return math.ceil(linear * per_byte) + rest + (sizes.embed_bytes if first else 0) + (sizes.head_bytes if last else 0)
