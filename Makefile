# The two commands a new user runs: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test lint typecheck pytest demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Reinstall only when the project's metadata changes.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps 'crypten==0.4.1'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check gateway zk mpc tests bench
	$(VENV)/bin/ruff format --check gateway zk mpc tests bench

typecheck: install
	$(VENV)/bin/mypy

pytest: install
	$(PY) -m pytest -q -ra --durations=15 $(PYTEST_ARGS)

test: lint typecheck pytest

demo: install
	$(VENV)/bin/ztgate demo

bench: install
	$(PY) bench/node_latency.py

clean:
	rm -rf $(VENV) .ztgate .pytest_cache .mypy_cache .ruff_cache
