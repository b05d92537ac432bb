# Multimodal entity linking service. `make help` lists the targets.
# A newcomer needs two commands: `make demo` (set up + run the main job on the demo world)
# and `make test` (set up + lint + tests).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch first and pinned: the CPU wheel; any looser requirement pulls gigabytes of CUDA.
TORCH_SPEC ?= torch==2.13.0
ARTIFACTS ?= artifacts
DEMO_DIR ?= $(ARTIFACTS)/demo-world
DEMO_ENTITIES ?= 2000
DEMO_SEED ?= 0
DATA ?= ../shared/data/wikimel
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install lint format typecheck unit test demo demo-world clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 needed"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PIP) install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

install: $(STAMP) ## Create .venv, install torch (CPU pin) then the project with dev extras (idempotent)

lint: install ## ruff lint + format check, mypy on service/ and index/
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy service index models

format: install ## Apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

unit: install ## Run the test suite only (no lint)
	$(PY) -m pytest -q

test: install lint unit ## Install (idempotent) + lint + the test suite: what CI runs

demo-world: install ## Generate the demo world (deterministic; reused when present)
	@if [ -f $(DEMO_DIR)/meta.json ]; then echo "demo world present: $(DEMO_DIR)"; \
	else $(VENV)/bin/mel-data demo --out $(DEMO_DIR) --entities $(DEMO_ENTITIES) --seed $(DEMO_SEED); fi
	$(VENV)/bin/mel-data summary $(DEMO_DIR)

demo: demo-world ## The main job on the embedded default (grows: world -> model -> index -> server)

clean: ## Remove generated artifacts (keeps .venv)
	rm -rf $(ARTIFACTS) .pytest_cache .ruff_cache .mypy_cache
