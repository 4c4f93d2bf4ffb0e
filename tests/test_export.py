"""Packing a Linear in row chunks (bounded export memory) gives modelopt's whole-tensor bytes (NVFP4, and
INT4, which modelopt packs two output rows per byte)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import REPO

SCRIPT = """
import torch
import modelopt.torch.quantization as mtq
from modelopt.torch.export.quant_utils import postprocess_state_dict
from modelopt.torch.export.unified_export_hf import _export_quantized_weight
from nvfp4_pp.checkpoint import export
from nvfp4_pp.calibration.calibrate import modelopt_config

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(256, 200, bias=False, dtype=torch.bfloat16))  # 200 rows: last chunk short
with torch.no_grad():
    model[0].weight[7, :16] *= 40  # one outlier block: block scales must differ between rows
x = torch.randn(4, 256, dtype=torch.bfloat16)
mtq.quantize(model, modelopt_config(RECIPE), lambda m: m(x))
linear = model[0]

export.EXPORT_CHUNK_ELEMENTS = 256 * 48  # 48 rows per chunk: 5 chunks, the last one short
scheme, chunked = export.quantize_linear("0", linear, torch.bfloat16)
assert (scheme, tuple(chunked["0.weight"].shape)) == SCHEME_AND_PACKED_SHAPE, (scheme, chunked["0.weight"].shape)
assert len(set(chunked["0.weight_scale"][:, 0].float().tolist())) > 1

# modelopt's own per-module export of the whole tensor (what export_hf_checkpoint runs), last: it mutates the module
_export_quantized_weight(linear, torch.bfloat16)
whole = postprocess_state_dict({f"0.{k}": v for k, v in linear.state_dict().items()}, 448.0, None)
assert sorted(whole) == sorted(chunked), (sorted(whole), sorted(chunked))
for key, value in whole.items():
    ours = chunked[key]
    assert ours.dtype == value.dtype and ours.shape == value.shape, (key, ours.dtype, ours.shape, value.dtype, value.shape)
    assert torch.equal(ours.view(torch.uint8) if ours.dtype == torch.float8_e4m3fn else ours,
                       value.cpu().view(torch.uint8) if value.dtype == torch.float8_e4m3fn else value.cpu()), key
print("identical")
"""


@pytest.mark.parametrize("recipe,scheme,packed", [("nvfp4", "nvfp4", (200, 128)), ("w4a16_int4", "int4_awq", (100, 256))])
@pytest.mark.whole
def test_row_chunks_pack_the_same_bytes_as_the_whole_tensor(recipe, scheme, packed):
    # Own process: modelopt's quantize patches modules globally.
    script = f"RECIPE = {recipe!r}\nSCHEME_AND_PACKED_SHAPE = ({scheme!r}, {packed!r})\n" + SCRIPT
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0 and "identical" in result.stdout, result.stderr[-3000:]
