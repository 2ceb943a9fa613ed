# keepax developer entry points. Everything is installed into .venv by these targets.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# s3rver (npm), a second S3 implementation the storage tests also run against.
NODE_BIN := $(CURDIR)/$(VENV)/node/node_modules/.bin

.PHONY: demo test lint bench clean

$(VENV)/.installed-core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-core
	$(PIP) install --quiet -e '.[test]'
	touch $@

$(VENV)/.installed-s3rver: $(VENV)/.installed-core
	npm install --silent --no-audit --no-fund --prefix $(VENV)/node s3rver@3.7.1
	touch $@

$(VENV)/.installed-examples: $(VENV)/.installed-core
	$(PIP) install --quiet -e '.[examples]'
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed-core
	$(PIP) install --quiet -e '.[bench]'
	touch $@

# The demo trains with optax, which the test extras install.
demo: $(VENV)/.installed-examples
	$(PY) examples/demo.py

test: $(VENV)/.installed-test $(VENV)/.installed-s3rver
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m mypy
	PATH="$(NODE_BIN):$$PATH" KEEPAX_REQUIRE_S3RVER=1 $(PY) -m pytest -q -p no:cacheprovider tests

# Lint and types only (make test runs them too).
lint: $(VENV)/.installed-test
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m mypy

bench: $(VENV)/.installed-bench
	$(PY) benchmarks/bench_core.py

clean:
	rm -rf $(VENV) demo_out bench_out
