# Two commands do everything on a fresh machine:
#   make run    install, then serve on the embedded default store (./data/memory.db, port 50051)
#   make test   install, then lint, type-check and run the whole test suite against real components
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test lint typecheck pytest bench proto clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: installed any later (or unpinned) it pulls a CUDA build of several GB.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/memshift serve $(ARGS)

lint: install
	$(VENV)/bin/ruff check .

typecheck: install
	$(VENV)/bin/mypy

pytest: install
	$(PY) -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

bench: install
	$(PY) -m bench $(ARGS)
	$(PY) -m bench.migration $(MIGRATION_ARGS)
	$(PY) -m bench.stores $(STORES_ARGS)
	$(PY) -m bench.fleet $(FLEET_ARGS)
	$(PY) -m bench.flood $(FLOOD_ARGS)
	$(PY) -m bench.transfer $(TRANSFER_ARGS)

proto: install
	$(PY) tools/gen_proto.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
