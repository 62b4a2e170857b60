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
# The shipped models `make serve` pulls and serves together (names from the model catalogue).
SERVE_MODELS ?= SmolLM2-135M-Instruct gemma-3-270m

.PHONY: setup build wheels serve test test-rust test-python typecheck stubtest bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip "maturin>=1.7,<2"

# Two distributions (see pyproject.toml): cheapest-core (the Rust extension, built in place by maturin) and
# cheapest (the service, python/pyproject.toml), installed editable with its test dependencies. Dependencies
# change only with the two pyproject files; the stamp keeps reruns quick.
$(VENV)/.deps: pyproject.toml python/pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade "maturin>=1.7,<2"
	$(BIN)/maturin develop --release --quiet
	$(BIN)/pip install --quiet -e "python[test]"
	touch $@

# Always rebuild the extension (cargo makes it incremental) so tests and the
# server never run a stale core.
build: $(VENV)/.deps
	$(BIN)/maturin develop --release --quiet --skip-install

# Both distributions as wheels in dist/: the abi3 cheapest-core wheel an embedder installs alone, and the
# service's. tests/core/test_distribution.py installs the first into an empty virtualenv.
wheels: build
	$(BIN)/maturin build --release --quiet --out dist
	$(BIN)/pip wheel --quiet --no-deps --wheel-dir dist ./python

setup: build

serve: setup
	$(BIN)/cheapest model pull $(SERVE_MODELS)
	CHEAPEST_MODELS="$(shell echo $(SERVE_MODELS) | tr ' ' ',')" $(BIN)/cheapest serve --host $(HOST) --port $(PORT) --workers $(WORKERS) --init-dev-account

test-rust:
	cargo test --release --quiet

stubtest: setup
	$(BIN)/python -m mypy.stubtest cheapest_core._cheapest_core

# mypy over python/cheapest, configured in pyproject.toml ([tool.mypy]).
typecheck: setup
	$(BIN)/python -m mypy

# tests/dashboard drive Debian's chromium through its own chromedriver (selenium never downloads a browser):
# installed with apt-get when missing (CI runs as root; elsewhere through sudo).
CHROMEDRIVER := /usr/bin/chromedriver
$(CHROMEDRIVER):
	$(if $(filter 0,$(shell id -u)),,sudo) sh -c 'export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y chromium chromium-driver || (apt-get update && apt-get install -y chromium chromium-driver)'

# The many-hosts backend's tests (tests/backends.py) start real PostgreSQL and Redis servers from Debian's packages,
# installed the same way when missing. PostgreSQL refuses root: the tests run it as `nobody` (setpriv).
REDIS_SERVER := /usr/bin/redis-server
POSTGRES_LIB := /usr/lib/postgresql
$(REDIS_SERVER) $(POSTGRES_LIB):
	$(if $(filter 0,$(shell id -u)),,sudo) sh -c 'export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y postgresql redis-server || (apt-get update && apt-get install -y postgresql redis-server)'

test-python: setup $(CHROMEDRIVER) $(REDIS_SERVER) $(POSTGRES_LIB)
	$(BIN)/python -m pytest -q

test: setup wheels test-rust stubtest typecheck test-python

bench: setup $(REDIS_SERVER) $(POSTGRES_LIB)
	$(BIN)/python -m pytest bench --benchmark-enable --benchmark-columns=median,mean,ops -q

clean:
	rm -rf $(VENV) target dist
