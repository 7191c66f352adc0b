# Two commands on a fresh machine: `make demo` and `make test`. Each installs what it needs into .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vlmbatch demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Throughput benchmarks (never part of `make test`); about twenty-five minutes on 2 cores. Full sizes: see bench/README.md.
bench: $(STAMP)
	$(BIN)/python bench/images.py
	$(BIN)/python bench/saturation.py
	$(BIN)/python bench/client_cpu.py
	$(BIN)/python bench/memory.py --sizes 10000,50000
	$(BIN)/python bench/rerun.py
	$(BIN)/python bench/auto.py
	$(BIN)/python bench/report.py
	$(BIN)/python bench/replicas.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache demo-out
