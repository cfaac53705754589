# Every target that CI and people run. `make demo` and `make test` install what they need.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
NATIVE_SRC := $(shell find native/src -name '*.rs') native/Cargo.toml
PKG_SRC := $(shell find tiered_limiter -name '*.py' -o -name '*.lua' -o -name '*.pyi')

.PHONY: all demo test test-fast lint typecheck native-test bench system-packages redis-server clean help
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

# redis-server, redis-tools (redis-cli) and nginx come from the system's packages; install
# them when we may, else say what to do.
SYSTEM_BINS := redis-server redis-cli nginx
SYSTEM_PACKAGES := redis-server redis-tools nginx
system-packages:
	@missing=0; for bin in $(SYSTEM_BINS); do \
	  command -v $$bin >/dev/null || [ -x /usr/sbin/$$bin ] || missing=1; \
	done; \
	[ $$missing = 0 ] && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing $(SYSTEM_PACKAGES) from the system's packages"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	else \
	  echo "redis-server, redis-cli or nginx is missing: install them (e.g. 'sudo apt-get install $(SYSTEM_PACKAGES)')" >&2; exit 1; \
	fi

# The old name, kept for scripts that call it.
redis-server: system-packages

demo: .stamp-build system-packages
	$(BIN)/python -m tiered_limiter._demo

lint: .stamp-build
	$(BIN)/ruff check tiered_limiter tests bench integration
	$(BIN)/ruff format --check tiered_limiter tests bench integration
	cd native && cargo fmt --check
	cd native && cargo clippy --quiet --all-targets -- -D warnings

typecheck: .stamp-build
	$(BIN)/mypy
	$(BIN)/python -m mypy.stubtest tiered_limiter._native

native-test:
	cd native && cargo test --quiet

test-fast: .stamp-build system-packages
	$(BIN)/pytest -q -m "not slow"

test: lint typecheck native-test .stamp-build system-packages
	$(BIN)/pytest -q

bench: .stamp-build system-packages
	@echo "run the scripts in bench/ one by one; each says what it measures"

clean:
	rm -rf $(VENV) native/target .stamp-* .pytest_cache .mypy_cache .ruff_cache
