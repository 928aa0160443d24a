# The two quick-start commands (README): `make distill` and `make test`.
# Every install goes through constraints.txt, which pins torch==2.14.1 + torchvision==0.29.1 (a CUDA build that runs on the CPU here): an
# unpinned install would pull the newest torch with gigabytes of CUDA packages.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: setup distill baseline bench test

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/activate pyproject.toml constraints.txt
	$(PIP) -e ".[test,fast-lap]"
	@touch $@

setup: $(VENV)/.installed  ## create .venv and install detrkd (pinned torch) with test extras

distill: setup  ## the main job: digits data, the shipped teacher evaluated, a no-KD and a QSKD student trained + evaluated -> their table (~20 min on 2 cores)
	$(BIN)/detrkd bench accuracy --preset quick --suite qskd --only qskd

bench: setup  ## every method at its paper defaults (accuracy.json; hours on 2 cores) and the step-time overhead
	$(BIN)/detrkd bench overhead --threads 2 --steps 15
	$(BIN)/detrkd bench accuracy --suite all

baseline: setup  ## digits data -> teacher and student trained and evaluated -> their table (~1.5 h on 2 cores)
	$(BIN)/python benchmarks/baseline.py

test: setup  ## the test suite (CI runs exactly this)
	$(BIN)/python -m pytest -q
