"""nvfp4_pp: pipeline-parallel NVFP4 quantization of large dense LLMs with torch.distributed."""

__version__ = "0.2.0"
