"""Input scales of a real stage calibrated four ways on the same two samples (tests/test_datasets.py).

`python tests/padding_probe.py MODEL_DIR TOKENS_JSONL OUT_JSON` builds the whole SmolLM2 as one
stage and calibrates it with nvfp4_pp's own calibrate + run_pipeline:
- `separate`: batch 1, each sample alone;
- `padded`: one right-padded micro-batch of both;
- `padded_pad_x1000`: the same, with the pad token's embedding row multiplied by 1000;
- `padded_unmasked`: as `padded_pad_x1000` with the mask switched off (shows the test can see pads).
It writes {variant: {linear: input_scale}} with modelopt's exported input scale of every Linear.
Run as its own process so modelopt's global patches stay out of the test process.
"""

import json
import sys

import torch


def main(model_dir: str, tokens: str, out: str) -> None:
    from modelopt.torch.export.quant_utils import get_activation_scaling_factor

    from nvfp4_pp.model.arch import architecture_of
    from nvfp4_pp.data.samples import Tokenizer, micro_batches
    from nvfp4_pp.runtime.dist import RankInfo
    from nvfp4_pp.calibration.pipeline import run_pipeline
    from nvfp4_pp.calibration.calibrate import ValidTokens, calibrate, modelopt_config
    from nvfp4_pp.model.source import SourceCheckpoint
    from nvfp4_pp.model.stage import build_stage

    class Unmasked(ValidTokens):
        def set(self, mask):
            self.mask = None

    with open(tokens) as f:
        samples = [json.loads(line)["input_ids"] for line in f if line.strip()]
    pad_id = Tokenizer(model_dir).pad_id
    assert all(pad_id not in s for s in samples), "the probe's samples must not contain the pad token"
    source = SourceCheckpoint(model_dir)
    arch = architecture_of(source.config)
    info = RankInfo(0, 1, 0, "local", torch.device("cpu"))
    layers = source.config["num_hidden_layers"]
    results = {}
    for variant, batch_size, scale_pad, valid in [("separate", 1, 1, ValidTokens()), ("padded", 2, 1, ValidTokens()),
                                                  ("padded_pad_x1000", 2, 1000, ValidTokens()),
                                                  ("padded_unmasked", 2, 1000, Unmasked())]:
        stage = build_stage(source, arch, 0, layers, info.device)
        with torch.no_grad():
            stage.get_submodule(f"{arch.decoder}.{arch.embeddings}").weight[pad_id] *= scale_pad
        batches = micro_batches(samples, batch_size, pad_id)
        lengths = [b.lengths for b in batches]
        calibrate(stage, lambda model: run_pipeline(model, info, batches, lengths, valid), modelopt_config(), valid)
        results[variant] = {name: float(get_activation_scaling_factor(m)) for name, m in stage.named_modules()
                            if hasattr(m, "input_quantizer") and m.input_quantizer.is_enabled}
        results[variant + "_widths"] = [b.ids.shape[1] for b in batches]
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
