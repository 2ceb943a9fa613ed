# keepax developer entry points. Everything is installed into .venv by these targets.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test bench clean

$(VENV)/.installed-core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-core
	$(PIP) install --quiet -e '.[test]'
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

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: $(VENV)/.installed-bench
	$(PY) benchmarks/bench_core.py

clean:
	rm -rf $(VENV) demo_out bench_out
