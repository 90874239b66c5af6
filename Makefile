# The two commands of the README: `make demo` and `make test`. Both create or reuse .venv.
SHELL := /bin/bash
VENV ?= .venv
export RLHF_RAY_CACHE ?= $(CURDIR)/.cache
export TORCH_EXTENSIONS_DIR ?= $(RLHF_RAY_CACHE)/torch_extensions
RUN_TAG := $(shell date +%Y%m%d-%H%M%S)

.PHONY: setup demo test test-unit bench clean-cache

setup:
	@VENV=$(VENV) bash scripts/setup.sh

demo: setup
	$(VENV)/bin/rlhf-ray synth-data data/generated
	$(VENV)/bin/rlhf-ray pipeline configs/tiny-cpu/pipeline.yaml sft.run.name=demo-sft-$(RUN_TAG) \
	  rm.run.name=demo-rm-$(RUN_TAG) rlhf.run.name=demo-rlhf-$(RUN_TAG)

test: setup
	$(VENV)/bin/python -m pytest tests

test-unit: setup
	$(VENV)/bin/python -m pytest tests/unit

bench: setup
	$(VENV)/bin/python scripts/bench_sft.py
