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
DEMO_MODEL ?= $(ARTIFACTS)/demo-model
DEMO_INDEX ?= $(ARTIFACTS)/demo-index
DEMO_DRIN ?= $(ARTIFACTS)/demo-drin
HOST ?= 127.0.0.1
PORT ?= 8000
# The demo recipe: frozen pretrained backbone, fresh MIMIC layers. The released lr 1e-5 is
# tuned for fine-tuning CLIP end to end; fresh interaction layers need a larger step.
DEMO_TRAIN_ARGS ?= --lr 1e-3 --epochs 8 --val-every 2 --patience 3 --batch-size 128
# DRIN over the demo model's retrieved top-20: the released recipe (lr, batch, margin, 30 epochs,
# no early stop); the best dev epoch is kept.
DEMO_DRIN_ARGS ?= --candidates 20 --eval-candidates 100 --epochs 30 --patience 30
DATA ?= ../shared/data/wikimel
NAME ?= $(notdir $(abspath $(DATA)))
# Extra bench/wikimel.py flags, e.g. WIKIMEL_ARGS="--fresh" or "--ablations cmfu".
WIKIMEL_ARGS ?=
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install lint format typecheck unit test demo demo-world demo-model demo-drin demo-index serve clean bench-wikimel bench-data bench-demo

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 needed"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PIP) install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

install: $(STAMP) ## Create .venv, install torch (CPU pin) then the project with dev extras (idempotent)

lint: install ## ruff lint + format check, mypy on service/, index/ and models/
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

demo-model: demo-world ## Train the default model on the demo world (reused when present)
	@if [ -f $(DEMO_MODEL)/best/config.json ]; then echo "demo model present: $(DEMO_MODEL)/best"; \
	else $(VENV)/bin/mel-train --data $(DEMO_DIR) --out $(DEMO_MODEL) $(DEMO_TRAIN_ARGS); fi
	@if [ -f $(DEMO_MODEL)/test-metrics.json ]; then echo "test metrics: $(DEMO_MODEL)/test-metrics.json"; \
	else $(VENV)/bin/mel-eval --model $(DEMO_MODEL)/best --data $(DEMO_DIR) --split test \
		--out $(DEMO_MODEL)/test-metrics.json > /dev/null; fi

demo-drin: demo-model ## Train DRIN over the demo model's retrieval (reused when present)
	@if [ -f $(DEMO_DRIN)/best/config.json ]; then echo "demo DRIN present: $(DEMO_DRIN)/best"; \
	else $(VENV)/bin/mel-train-drin --data $(DEMO_DIR) --model $(DEMO_MODEL)/best \
		--out $(DEMO_DRIN) $(DEMO_DRIN_ARGS); fi
	@if [ -f $(DEMO_DRIN)/test-metrics.json ]; then echo "test metrics: $(DEMO_DRIN)/test-metrics.json"; \
	else $(VENV)/bin/mel-eval-drin --data $(DEMO_DIR) --model $(DEMO_MODEL)/best \
		--drin $(DEMO_DRIN)/best --split test --candidates 100 \
		--out $(DEMO_DRIN)/test-metrics.json > /dev/null; fi

demo-index: demo-model ## Build the FAISS index + entity store of the demo world (reused)
	$(VENV)/bin/mel-index build --kb $(DEMO_DIR)/kb.jsonl --model $(DEMO_MODEL)/best \
		--out $(DEMO_INDEX)

demo: demo-index demo-drin ## The main job: world -> model (+ DRIN) -> index -> server on $(HOST):$(PORT)
	@$(VENV)/bin/mel-demo-request --data $(DEMO_DIR) --model $(DEMO_MODEL)/best \
		--index $(DEMO_INDEX) --out $(ARTIFACTS)/demo-request.json --port $(PORT) \
		--drin $(DEMO_DRIN)/best
	$(VENV)/bin/mel-serve --model $(DEMO_MODEL)/best --index $(DEMO_INDEX) \
		--drin $(DEMO_DRIN)/best --host $(HOST) --port $(PORT)

serve: install ## Serve MEL_MODEL_PATH / MEL_INDEX_PATH (defaults: the demo artifacts)
	$(VENV)/bin/mel-serve --host $(HOST) --port $(PORT)

bench-wikimel: install ## WikiMEL end to end (DATA=path to the MELBench/WikiMEL folder): bench/results/wikimel.*
	$(PY) bench/wikimel.py --data $(DATA) --work $(ARTIFACTS)/wikimel-bench --name WikiMEL \
		--note "Not comparable with the papers' 109,976-entity KB (CLIP, entity images)." \
		$(WIKIMEL_ARGS)

bench-data: install ## The same protocol on any MELBench/GHMFC or canonical folder (DATA=..., NAME=...)
	$(PY) bench/wikimel.py --data $(DATA) --name $(NAME) --work $(ARTIFACTS)/bench-$(NAME) \
		--out bench/results/$(NAME).json $(WIKIMEL_ARGS)

bench-demo: demo-world ## The same protocol on the demo world: bench/results/demo-world.*
	$(PY) bench/wikimel.py --data $(DEMO_DIR) --name demo-world --work $(ARTIFACTS)/bench-demo \
		--out bench/results/demo-world.json --ablations --skip-drin $(WIKIMEL_ARGS)

clean: ## Remove generated artifacts (keeps .venv)
	rm -rf $(ARTIFACTS) .pytest_cache .ruff_cache .mypy_cache
