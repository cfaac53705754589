# Every target that CI and people run. `make demo` and `make test` install what they need.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
NATIVE_SRC := $(shell find native/src -name '*.rs') native/Cargo.toml
PKG_SRC := $(shell find tiered_limiter -name '*.py' -o -name '*.lua' -o -name '*.pyi')

.PHONY: all demo test test-fast lint typecheck native-test bench redis-server clean help
all: test

help:
	@echo "make demo   - start a throwaway Redis and show three proxies sharing limits"
	@echo "make test   - linters, type checks, Rust tests and the Python test suite"
	@echo "make bench  - the benchmarks in bench/ (by hand; see docs/benchmarks.md)"

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The virtual environment: maturin builds the package in place and installs its dependencies
# with the dev and litellm extras, so one step brings every tool the targets below use.
.stamp-build: pyproject.toml $(NATIVE_SRC) | $(BIN)/python
	$(BIN)/pip install --quiet "maturin>=1.5,<2"
	VIRTUAL_ENV=$(abspath $(VENV)) $(BIN)/maturin develop --release --quiet --extras dev,litellm
	touch $@

# redis-server comes from the system's packages; install it when we may, else say what to do.
redis-server:
	@command -v redis-server >/dev/null && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing redis-server from the system's packages"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	else \
	  echo "redis-server is missing: install it (e.g. 'sudo apt-get install redis-server')" >&2; exit 1; \
	fi

demo: .stamp-build redis-server
	$(BIN)/python -m tiered_limiter._demo

lint: .stamp-build
	$(BIN)/ruff check tiered_limiter tests bench
	$(BIN)/ruff format --check tiered_limiter tests bench
	cd native && cargo fmt --check
	cd native && cargo clippy --quiet --all-targets -- -D warnings

typecheck: .stamp-build
	$(BIN)/mypy
	$(BIN)/python -m mypy.stubtest tiered_limiter._native

native-test:
	cd native && cargo test --quiet

test-fast: .stamp-build redis-server
	$(BIN)/pytest -q -m "not slow"

test: lint typecheck native-test .stamp-build redis-server
	$(BIN)/pytest -q

bench: .stamp-build redis-server
	@echo "run the scripts in bench/ one by one; each says what it measures"

clean:
	rm -rf $(VENV) native/target .stamp-* .pytest_cache .mypy_cache .ruff_cache
