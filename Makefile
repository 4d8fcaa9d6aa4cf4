# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench-eval mutate clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/raml demo --out demo

# PYTHONDONTWRITEBYTECODE emptied: pytest keeps the test modules it rewrote for its asserts (and Python raml's
# compiled modules) in __pycache__ (git-ignored), so that a second run does not rewrite them again in each worker
# (about 7 CPU s a worker, docs/benchmarks.md "Test suite"). The files the suite runs first: tests/conftest.py.
test: $(STAMP)
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest -q -n auto --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

bench-eval: $(STAMP)
	$(BIN)/raml bench eval

# Mutation testing of the core modules against their own tests (long; not part of `make test`):
# docs/benchmarks.md "Mutation testing". One target: make mutate TARGETS=metrics
mutate: $(STAMP)
	$(BIN)/python scripts/mutate.py $(TARGETS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info
