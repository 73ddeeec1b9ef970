# Two entry points for a fresh machine with Python >= 3.11: `make demo` and `make test`.
# Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# dlt gets a venv of its own: its dependencies (rich, ...) would otherwise be imported by
# syncd too (structlog loads rich when it is installed) and weigh on syncd's figures.
DLT_VENV := .venv-dlt

$(DLT_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(DLT_VENV)
	$(DLT_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(DLT_VENV)/bin/python -m pip install --quiet -e '.[bench]'
	touch $@

demo: $(VENV)/.installed-test
	$(BIN)/syncd demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed-test $(DLT_VENV)/.installed
	$(BIN)/python bench/run.py --dlt-python $(DLT_VENV)/bin/python $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(DLT_VENV) build *.egg-info

# The fault checker's long run (tests/faultcheck): SOAK_SEEDS=1-200 by default, needs PostgreSQL.
.PHONY: soak
SOAK_SEEDS ?= 1-200
soak: $(VENV)/.installed-test
	$(BIN)/python -m tests.faultcheck --seeds $(SOAK_SEEDS) $(SOAK_ARGS)
