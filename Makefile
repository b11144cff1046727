# The two commands of the README:  `make main` (the whole DAG on the embedded experiment)
# and `make test` (lint + test suite). Both create .venv and install what they need.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup main test lint
$(BIN)/nbp: pyproject.toml setup.py nbp/generator/kernels.c
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/nbp

main: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

lint: setup
	$(BIN)/ruff check nbp tests benchmarks

test: lint
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest -q
