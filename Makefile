# The README's two commands: `make serve` and `make test`. Both set up
# everything on a fresh machine: the virtualenv, the release build of the
# Rust extension, the project and its test dependencies.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export VIRTUAL_ENV := $(CURDIR)/$(VENV)
export PATH := $(CURDIR)/$(BIN):$(PATH)
HOST ?= 127.0.0.1
PORT ?= 8000
WORKERS ?= 1
# Models, the LMDB store and secrets live here (see README: Configuration).
export CHEAPEST_DATA_DIR ?= $(CURDIR)/.data

.PHONY: setup build serve test test-rust test-python typecheck stubtest bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip "maturin>=1.7,<2"

# Dependencies change only with pyproject.toml; the stamp keeps reruns quick.
$(VENV)/.deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade "maturin>=1.7,<2"
	$(BIN)/maturin develop --release --extras test --quiet
	touch $@

# Always rebuild the extension (cargo makes it incremental) so tests and the
# server never run a stale core.
build: $(VENV)/.deps
	$(BIN)/maturin develop --release --extras test --quiet --skip-install

setup: build

serve: setup
	$(BIN)/cheapest model pull
	$(BIN)/cheapest serve --host $(HOST) --port $(PORT) --workers $(WORKERS) --init-dev-account

test-rust:
	cargo test --release --quiet

stubtest: setup
	$(BIN)/python -m mypy.stubtest cheapest_core._cheapest_core

# mypy over python/cheapest, configured in pyproject.toml ([tool.mypy]).
typecheck: setup
	$(BIN)/python -m mypy

test-python: setup
	$(BIN)/python -m pytest -q

test: setup test-rust stubtest typecheck test-python

bench: setup
	$(BIN)/python -m pytest bench --benchmark-enable --benchmark-columns=median,mean,ops -q

clean:
	rm -rf $(VENV) target
