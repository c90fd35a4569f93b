# make quickstart  -- set-up + the main job on the embedded default (CPU, a few minutes)
# make test        -- set-up + the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
RUN_DIR ?= runs/quickstart
# A torch wheel shipped on the machine (CPU build) is used when present; otherwise pip's choice.
TORCH ?= $(shell ls /opt/wheels/torch-*.whl 2>/dev/null | head -n1 | sed -E 's/.*torch-([0-9.]+).*/torch==\1/')

.PHONY: install quickstart test test-fast lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(if $(TORCH),$(BIN)/pip install --quiet "$(TORCH)")
	$(BIN)/pip install --quiet -e .
	touch $(STAMP)

# the tests' extras (pytest, ruff, lm-eval for the backend's parity tests) and DeepSpeed's CPU op;
# the quickstart needs neither
$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e ".[dev]"
	@# DeepSpeed's CPU Adam (ZeRO-Offload) is a C++ op compiled on first use, minutes on a small CPU:
	@# built once here, cached in ~/.cache/torch_extensions
	$(BIN)/python -c "import torch; from deepspeed.ops.adam import DeepSpeedCPUAdam; DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(1))])" >/dev/null 2>&1 || echo "note: DeepSpeed's CPU Adam op did not build (ZeRO-Offload unavailable)"
	touch $(DEV_STAMP)

install: $(DEV_STAMP)

quickstart: $(STAMP)
	$(BIN)/svdecode fit --config configs/quickstart.yaml --trainer.default_root_dir $(RUN_DIR)
	$(BIN)/svdecode test --config configs/quickstart.yaml --trainer.default_root_dir $(RUN_DIR) \
		--model.adapter_path $(RUN_DIR)/adapter

test: $(DEV_STAMP)
	$(BIN)/python -m pytest -q tests

test-fast: $(DEV_STAMP)
	$(BIN)/python -m pytest -q tests -m "not slow and not slurm"

lint: $(DEV_STAMP)
	$(BIN)/ruff check svdecode_pl tests benchmarks

bench: $(DEV_STAMP)
	$(BIN)/python benchmarks/steering_extraction.py
	$(BIN)/python benchmarks/truthfulqa_mc.py

clean:
	rm -rf runs lightning_logs .pytest_cache
