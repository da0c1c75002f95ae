# `make demo` runs the demo, `make test` the tests; each makes .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint check bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,embedded,deploy]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/minicelery demo

test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy minicelery

check: lint test

bench: $(STAMP)
	$(BIN)/python bench/compare.py
	$(BIN)/python bench/run.py
	$(BIN)/python bench/drain.py
	$(BIN)/python bench/metrics_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
