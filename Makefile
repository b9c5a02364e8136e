# Set-up and the two entry points of the README. `make run` and `make test` set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# Real data (MNIST, the Pile sample, the Pythia tokenizer) lives outside the repository.
export HARNESS_DATA_DIR ?= $(abspath ../shared/data)
OUT ?= out
WORKERS ?= 2
PACK ?= 15
# pytest-xdist processes for `make test` (each test file stays in one; the suite's runs are single-threaded)
TEST_WORKERS ?= 2

.PHONY: setup run test test-all layering

setup: $(VENV)/.installed

# torch is pinned first so pip takes the CPU build on disk instead of downloading a CUDA one; then the
# exact versions of requirements.lock, then the project itself (its ranges in pyproject.toml are met).
$(VENV)/.installed: pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -r requirements.lock
	$(VENV)/bin/pip install -q --no-deps -e '.[dev]'
	touch $@

# The main job: the offline sparse-parity width sweep (10 widths x 3 seeds, packed: two single-threaded
# processes of 15 runs each, docs/packing.md), then its scaling analysis and its training dynamics
# (convergence time against frequency, never-learned subtasks censored).
run: setup
	mkdir -p $(OUT)
	WANDB_MODE=offline $(VENV)/bin/harness sweep sweeps/sparse_parity_width_smoke.yaml --local \
		--workers $(WORKERS) --pack $(PACK) --wandb-dir $(OUT)/wandb | tail -n 1 > $(OUT)/sweep_id
	$(PY) -m analysis.scaling $(OUT)/wandb --sweep $$(cat $(OUT)/sweep_id) --out $(OUT)/scaling
	$(PY) -m analysis.dynamics $(OUT)/wandb --sweep $$(cat $(OUT)/sweep_id) --out $(OUT)/dynamics

# Lint and format first (configured in pyproject.toml; `ruff format .` fixes the format), then the suite.
test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-all: setup
	$(PY) -m pytest -q -m '' -n $(TEST_WORKERS) --dist loadfile

# The architecture of DESIGN.md (tasks -> harness; analysis -> harness.runstore + pure helpers; harness ->
# nothing above it; each room of harness/ -> only the rooms below it; no import circles; no task -> task);
# also part of `make test`. Lists every violating import and circle.
layering: setup
	$(PY) tests/test_layering.py
