# The two quick-start commands (README): `make baseline` and `make test`.
# Every install goes through constraints.txt, which pins torch==2.13.0 (CPU build here): an
# unpinned install would pull the newest torch with gigabytes of CUDA packages.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: setup baseline test

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/activate pyproject.toml constraints.txt
	$(PIP) -e ".[test,fast-lap]"
	@touch $@

setup: $(VENV)/.installed  ## create .venv and install detrkd (pinned torch) with test extras

baseline: setup  ## digits data -> teacher and student trained and evaluated -> their table (~1.5 h on 2 cores)
	$(BIN)/python benchmarks/baseline.py

test: setup  ## the test suite (CI runs exactly this)
	$(BIN)/python -m pytest -q
