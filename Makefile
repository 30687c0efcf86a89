# Two commands do everything on a fresh machine:
#   make run    install, then serve on the embedded default store (./data/memory.db, port 50051)
#   make test   install, then lint, type-check and run the whole test suite against real components
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test lint typecheck pytest bench bench-full proto clean

$(STAMP): pyproject.toml clients/python/pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: installed any later (or unpinned) it pulls a CUDA build of several GB.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e clients/python -e '.[dev]'
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

# `make bench`: every benchmark at sizes that finish within about ten minutes on a 2-core machine; every figure also
# lands in bench/results/<name>.json. `make bench-full`: the sizes docs/benchmarks.md reports (an hour and more).
bench: install
	$(PY) -m bench --entities 5000 --calls 1000
	$(PY) -m bench.migration --entities 5000 --memory-entities 30000 --writes 1000 --rounds 3
	$(PY) -m bench.chase --entities 5000
	$(PY) -m bench.stores --entities 2000 --qdrant-sizes 2000
	$(PY) -m bench.fleet --changes 20
	$(PY) -m bench.placement --entities 4000 --window 4
	$(PY) -m bench.flood
	$(PY) -m bench.transfer --entities 2000 --calls 200
	$(PY) -m bench.reference --sizes 1000,5000 --calls 100
	$(PY) -m bench.search --entities 100000
	$(PY) -m bench.scale --entities 100000 --window 10 --json bench/results/scale-100k.json

bench-full: install
	$(PY) -m bench $(ARGS)
	$(PY) -m bench.migration $(MIGRATION_ARGS)
	$(PY) -m bench.chase $(CHASE_ARGS)
	$(PY) -m bench.stores $(STORES_ARGS)
	$(PY) -m bench.fleet $(FLEET_ARGS)
	$(PY) -m bench.placement $(PLACEMENT_ARGS)
	$(PY) -m bench.flood $(FLOOD_ARGS)
	$(PY) -m bench.transfer $(TRANSFER_ARGS)
	$(PY) -m bench.reference --sizes 1000,5000,50000
	$(PY) -m bench.search --entities 1000000
	$(PY) -m bench.scale --entities 1000000 --json bench/results/scale-1m.json

proto: install
	$(PY) tools/gen_proto.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
