# Two entry points for a fresh machine with Python >= 3.11: `make demo` and `make test`.
# Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test test-floors bench clean

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

# The lowest versions pyproject.toml declares, installed together: a floor that does not
# work fails here instead of on a user's machine. Constraints come from pyproject itself.
FLOORS_VENV := .venv-floors

$(FLOORS_VENV)/.installed: pyproject.toml .ci/floors.py
	rm -rf $(FLOORS_VENV)
	$(PYTHON) -m venv $(FLOORS_VENV)
	$(FLOORS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(FLOORS_VENV)/bin/python .ci/floors.py test > $(FLOORS_VENV)/constraints.txt
	$(FLOORS_VENV)/bin/python -m pip install --quiet -c $(FLOORS_VENV)/constraints.txt -e '.[test]'
	touch $@

demo: $(VENV)/.installed-test
	$(BIN)/syncd demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The suite on the floors, less the systemd boot and the fault checker (they run the same
# code as `make test`; what the floors change is the libraries), and less mypy: it checks
# syncd against the libraries' own annotations, older or absent at the floors (SQLAlchemy
# 2.0.0's Row, pycountry, nameparser and sqlparse without py.typed); `make test` runs it.
test-floors: $(FLOORS_VENV)/.installed
	$(FLOORS_VENV)/bin/python -m pytest $(PYTEST_ARGS) --ignore=tests/test_systemd_boot.py --ignore=tests/test_faultcheck.py \
		--deselect=tests/test_codebase.py::test_mypy_strict_passes_on_syncd

bench: $(VENV)/.installed-test $(DLT_VENV)/.installed
	$(BIN)/python bench/run.py --dlt-python $(DLT_VENV)/bin/python $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(DLT_VENV) $(FLOORS_VENV) build *.egg-info

# The fault checker's long run (tests/faultcheck): SOAK_SEEDS=1-200 by default, needs PostgreSQL.
.PHONY: soak
SOAK_SEEDS ?= 1-200
soak: $(VENV)/.installed-test
	$(BIN)/python -m tests.faultcheck --seeds $(SOAK_SEEDS) $(SOAK_ARGS)
