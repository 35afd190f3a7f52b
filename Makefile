# The two commands a new user runs: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test lint typecheck pytest demo bench clean wheelhouse

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

# Everything an air-gapped install needs in one directory (deploy/wheelhouse.py):
# make wheelhouse [WHEELHOUSE=dir] [SRS=ceremony.srs SRS_SHA256=hex]
WHEELHOUSE ?= wheelhouse
wheelhouse: install
	$(PY) deploy/wheelhouse.py --out $(WHEELHOUSE) $(if $(SRS),--srs $(SRS) --srs-sha256 $(SRS_SHA256))

clean:
	rm -rf $(VENV) .ztgate .pytest_cache .mypy_cache .ruff_cache wheelhouse
