"""How to serve a written checkpoint, read from its own files: vLLM commands per hardware class, a
llama-swap entry, the source's sampling defaults and its chat template.

`checkpoint_facts(directory)` reads what the card needs from the assembled directory (its
quantization config as vLLM reads it, the tensors its index names, config.json,
generation_config.json, the tokenizer files); `serving_lines(facts, ...)` renders the card's
Serving section from those facts alone, so a flag appears exactly when the checkpoint calls for it
(`--kv-cache-dtype fp8` only when K/V scales were written).
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Sequence
from pathlib import Path

from nvfp4_pp.records import CheckpointFacts
from nvfp4_pp.vllm_contract import VLLM_RELEASE, declared_config, read_quant_config, vllm_method, vllm_problems

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty")
"""generation_config.json fields vLLM applies as default sampling parameters (`--generation-config auto`)."""
SCHEME_TEXT = {
    "nvfp4": "NVFP4 W4A4", "nvfp4_awq": "NVFP4-AWQ W4A4", "w4a16_nvfp4": "NVFP4 weight-only (W4A16)",
    "fp8": "FP8 W8A8", "mxfp4": "MXFP4", "int4_awq": "INT4 weight-only (W4A16, group 128)",
}
ACTIVATION_QUANTIZED = ("nvfp4", "nvfp4_awq", "fp8", "mxfp4")
OTHER_READERS = {
    "modelopt": "TensorRT-LLM and SGLang, whose ModelOpt loaders read modelopt's own export (nvfp4_pp does not "
                "check their loaders)",
    "compressed-tensors": "transformers with compressed-tensors (`CompressedTensorsConfig(dequantize=True)`) and "
                          "compressed-tensors' own decompressors",
}
"""Who reads a layout besides vLLM, named on the card of a checkpoint vLLM VLLM_RELEASE does not load."""
GPU_CLASSES = (
    ("Blackwell (B200, GB200, RTX PRO 6000, RTX 50x0)", 180),
    ("Hopper and Ampere (H100, H200, A100, RTX 30x0 / 40x0)", 80),
)
"""(class, GB per GPU the tensor-parallel size is computed for: B200 and H100/A100 80 GB)."""
WEIGHTS_SHARE = 0.75
"""At most this share of each GPU's memory for weights; the rest is KV cache and activations."""
SPARK_GB = 128
"""GB10 (DGX Spark): 128 GB of memory shared by CPU and GPU."""


def checkpoint_facts(directory: Path) -> CheckpointFacts:
    """What the Serving section needs, read from the checkpoint's files."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    layout = read_quant_config(directory, config.get("quantization_config") or {}, [])
    schemes = sorted({s for s in [layout.default_scheme, *layout.by_module.values(),
                                  *(s for _, s in layout.patterns)] if s}) if layout else []
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    names = index["weight_map"]
    kv_scales = any(n.endswith((".k_scale", ".v_scale")) for n in names)
    text = config.get("text_config") or config
    generation = directory / "generation_config.json"
    sampling = {}
    if generation.is_file():
        g = json.loads(generation.read_text())
        sampling = {k: g[k] for k in SAMPLING_KEYS if g.get(k) is not None}
    return CheckpointFacts(
        method=layout.method if layout else None, schemes=tuple(schemes), kv_cache_scales=kv_scales,
        max_model_len=text.get("max_position_embeddings"), bytes=index["metadata"]["total_size"], sampling=sampling,
        chat_template=_chat_template_file(directory))


def _chat_template_file(directory: Path) -> str | None:
    """The file that holds the chat template vLLM applies, if any."""
    for name in ("chat_template.jinja", "chat_template.json"):
        if (directory / name).is_file():
            return name
    tokenizer_config = directory / "tokenizer_config.json"
    if tokenizer_config.is_file() and json.loads(tokenizer_config.read_text()).get("chat_template"):
        return "tokenizer_config.json"
    return None


def _tensor_parallel(size_bytes: int, gpu_gb: int) -> int:
    """The smallest power-of-two GPU count whose memory holds the weights with room for the KV cache."""
    need = size_bytes / (gpu_gb * 1e9 * WEIGHTS_SHARE)
    return 1 if need <= 1 else 2 ** math.ceil(math.log2(need))


def _declared(facts: CheckpointFacts) -> dict:
    return (declared_config(facts.method, list(facts.schemes)) if facts.method and facts.schemes else None) or {}


def vllm_flags(facts: CheckpointFacts) -> list[str]:
    """Flags every vLLM command for this checkpoint carries, in the order they are shown: a modelopt
    checkpoint names the method whose config loads its quant_algo in vLLM VLLM_RELEASE (which also
    detects it; older releases needed the flag)."""
    flags = []
    method = vllm_method(_declared(facts))
    if method:
        flags.append(f"--quantization {method}")
    if facts.max_model_len:
        flags.append(f"--max-model-len {facts.max_model_len}")
    if facts.kv_cache_scales:
        flags.append("--kv-cache-dtype fp8")
    return flags


def not_vllm_loadable(facts: CheckpointFacts) -> list[str]:
    """Why vLLM VLLM_RELEASE's loaders refuse the checkpoint's layout (empty: vLLM serves it)."""
    declared = _declared(facts)
    return vllm_problems(declared) if declared else []


def serve_command(facts: CheckpointFacts, path: str, extra: Sequence[str] = ()) -> str:
    if not_vllm_loadable(facts):
        return (f"none with vLLM {VLLM_RELEASE} ({not_vllm_loadable(facts)[0]}); readers: "
                f"{OTHER_READERS[facts.method or '']}")
    return " ".join(["vllm serve", shlex.quote(str(path)), *vllm_flags(facts), *extra])


def spark_memory_utilization(size_bytes: int) -> float | None:
    """`--gpu-memory-utilization` for one GB10 (weights + 16 GB of KV cache, at least 0.3 and at most
    0.85 of the 128 GB the CPU shares); None when the weights do not fit in one."""
    share = (size_bytes / 1e9 + 16) / SPARK_GB
    if share > 0.85:
        return None
    return max(0.3, math.ceil(share * 20) / 20)


def _hardware_note(schemes: tuple[str, ...]) -> tuple[str, str]:
    """(Blackwell note, Hopper/Ampere note) for the checkpoint's schemes."""
    fp4_w4a4 = any(s in ("nvfp4", "nvfp4_awq") for s in schemes)
    if fp4_w4a4:
        return ("native FP4 W4A4 kernels (weights and activations in FP4, the calibrated input scales used).",
                "no FP4 tensor cores: vLLM runs the FP4 weights through its weight-only Marlin kernel "
                "(activations in BF16, input scales unused); same files, same command.")
    if schemes == ("int4_awq",):
        note = "vLLM's weight-only INT4 kernels (Marlin), activations in BF16."
        return (note, note)
    if schemes == ("w4a16_nvfp4",):
        return ("weight-only FP4 (Marlin), activations in BF16.", "weight-only FP4 (Marlin), activations in BF16.")
    if schemes == ("fp8",):
        return ("native FP8 W8A8.", "Hopper: native FP8 W8A8; Ampere: vLLM's weight-only FP8 Marlin kernel.")
    return ("the schemes' native kernels where vLLM has them.", "weight-only kernels where vLLM has them.")


def serving_lines(facts: CheckpointFacts, path: str, name: str) -> list[str]:
    """The card's Serving section (markdown lines) for a checkpoint at `path` served as `name`."""
    size_gb = facts.bytes / 1e9
    blackwell, older = _hardware_note(facts.schemes)
    lines = [
        "## Serving",
        f"{size_gb:.1f} GB of tensors, `{facts.method}` layout ("
        + ", ".join(SCHEME_TEXT.get(s, s) for s in facts.schemes) + "); "
        + ("FP8 KV-cache scales calibrated, so vLLM keeps the KV cache in FP8 (`--kv-cache-dtype fp8`)."
           if facts.kv_cache_scales else "no KV-cache scales (the KV cache stays BF16)."),
        "vLLM reads the quantization from `config.json`"
        + (f"; `--max-model-len {facts.max_model_len}` is the source's `max_position_embeddings` "
           "(lower it to fit more sequences)." if facts.max_model_len else "."),
        "",
    ]
    unloadable = not_vllm_loadable(facts)
    if unloadable:
        other = "modelopt" if facts.method == "compressed-tensors" else "compressed-tensors"
        other_qc = declared_config(other, list(facts.schemes))
        instead = (f"The same recipe in `format: {other}` is one vLLM {VLLM_RELEASE} loads."
                   if other_qc and not vllm_problems(other_qc) else
                   f"No layout of these schemes loads in vLLM {VLLM_RELEASE}; recipe `nvfp4` does in both.")
        return lines + [f"vLLM {VLLM_RELEASE} does not load this checkpoint ({'; '.join(unloadable)}), so no vLLM "
                        f"command is given. It is for {OTHER_READERS[facts.method or '']}. {instead}", ""] + sampling_lines(facts)
    notes = {GPU_CLASSES[0][0]: blackwell, GPU_CLASSES[1][0]: older}
    for gpu_class, gpu_gb in GPU_CLASSES:
        tp = _tensor_parallel(facts.bytes, gpu_gb)
        extra = [f"--tensor-parallel-size {tp}"] if tp > 1 else []
        lines += [f"**{gpu_class}**: {notes[gpu_class]}"
                  + (f" {tp} GPUs of {gpu_gb} GB." if tp > 1 else ""),
                  "```bash", serve_command(facts, path, extra), "```"]
    utilization = spark_memory_utilization(facts.bytes)
    if utilization is None:
        lines += [f"**GB10 (DGX Spark, {SPARK_GB} GB unified memory)**: {size_gb:.0f} GB of weights do not fit one "
                  "GB10 with room for the KV cache; use two (tensor or pipeline parallel across both)."]
    else:
        lines += [f"**GB10 (DGX Spark, {SPARK_GB} GB unified memory)**: Blackwell, so the notes above apply; "
                  "the GPU's memory is the system's, and vLLM takes `--gpu-memory-utilization` of it up front "
                  f"(weights + KV cache). {utilization} leaves the rest to the OS and other processes.",
                  "```bash", serve_command(facts, path, [f"--gpu-memory-utilization {utilization}"]), "```"]
    if facts.kv_cache_scales:
        lines.append("FP8 KV cache needs an attention backend that supports it on the GPU (Hopper and newer "
                     "with the default backends); where vLLM refuses it, drop `--kv-cache-dtype fp8`.")
    lines += ["", "[llama-swap](https://github.com/mostlygeek/llama-swap) entry (`${PORT}` is its own macro):",
              "```yaml", *llama_swap_entry(facts, path, name), "```", ""]
    lines += sampling_lines(facts)
    return lines


def llama_swap_entry(facts: CheckpointFacts, path: str, name: str) -> list[str]:
    """A `models:` entry for llama-swap's config.yaml: vLLM on the port llama-swap assigns."""
    absolute = shlex.quote(str(Path(path).resolve()))
    return ["models:", f'  "{name}":', "    cmd: |", f"      vllm serve {absolute}", "      --port ${PORT}",
            "      --served-model-name ${MODEL_ID}", *(f"      {flag}" for flag in vllm_flags(facts)),
            "    checkEndpoint: /health", "    ttl: 0"]


def sampling_lines(facts: CheckpointFacts) -> list[str]:
    """The source's recommended sampling and the chat template note."""
    sampling = facts.sampling
    if sampling:
        lines = ["Sampling defaults from the source's `generation_config.json` (vLLM applies them to requests "
                 "that do not set them, `--generation-config auto`): "
                 + ", ".join(f"`{k}={v}`" for k, v in sampling.items()) + "."]
    else:
        lines = ["The source's `generation_config.json` sets no sampling parameters; vLLM's defaults apply."]
    template = facts.chat_template
    lines.append("")
    lines.append(f"Chat template: the source's, copied unchanged (`{template}`); vLLM applies it on "
                 "`/v1/chat/completions`." if template else
                 "Chat template: none in the source; use `/v1/completions`, or pass `--chat-template`.")
    return lines + [""]
