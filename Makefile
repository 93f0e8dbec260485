# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test test-long lint typecheck pytest bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(VENV)/.installed $@

demo: $(VENV)/.installed
	$(BIN)/imsd demo

lint: $(VENV)/.installed-test
	$(BIN)/ruff check daemon plugins tests $(wildcard bench)
	$(BIN)/ruff format --check daemon plugins tests $(wildcard bench)

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

# Four workers (pytest-xdist): most tests wait on sockets, processes and timers, so even two
# cores run them about twice as fast; the long variants below stay one at a time.
pytest: $(VENV)/.installed-test
	$(BIN)/pytest -q -n 4

test: lint typecheck pytest

# The long fault-injection variants (kill -9 over 1,000 refreshes, 1,000 socket clients for
# 60 s); .ci/run runs them after `make test`.
test-long: $(VENV)/.installed-test
	$(BIN)/pytest -q -m long

bench: $(VENV)/.installed-test
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build *.egg-info
