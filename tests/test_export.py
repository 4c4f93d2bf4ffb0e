"""Packing a Linear in row chunks (bounded export memory) gives modelopt's whole-tensor bytes."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO

SCRIPT = """
import torch
import modelopt.torch.quantization as mtq
from modelopt.torch.export.quant_utils import (get_quantization_format, get_weight_block_size,
    get_weight_scaling_factor, get_weight_scaling_factor_2, to_quantized_weight)
from nvfp4_pp import export
from nvfp4_pp.quantize import modelopt_config

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(256, 200, dtype=torch.bfloat16))  # 200 rows: the last chunk is short
with torch.no_grad():
    model[0].weight[7, :16] *= 40  # one outlier block: block scales must differ between rows
x = torch.randn(4, 256, dtype=torch.bfloat16)
mtq.quantize(model, modelopt_config(), lambda m: m(x))
linear = model[0]
linear.name = "0"

fmt = get_quantization_format(linear)
whole_scale = get_weight_scaling_factor(linear)
whole = to_quantized_weight(linear.weight, whole_scale, fmt, get_weight_scaling_factor_2(linear).squeeze(),
                            get_weight_block_size(linear))
export.EXPORT_CHUNK_ELEMENTS = 256 * 48  # 48 rows per chunk: 5 chunks
chunked = export.quantize_linear(linear, torch.bfloat16)
assert chunked.weight.dtype == torch.uint8 and chunked.weight.shape == (200, 128)
assert torch.equal(chunked.weight, whole), "packed codes differ"
assert torch.equal(chunked.weight_scale.view(torch.uint8), whole_scale.view(torch.uint8)), "block scales differ"
assert len(set(chunked.weight_scale[:, 0].float().tolist())) > 1
print("identical")
"""


def test_row_chunks_pack_the_same_bytes_as_the_whole_tensor():
    # Own process: modelopt's quantize patches modules globally.
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0 and "identical" in result.stdout, result.stderr[-3000:]
