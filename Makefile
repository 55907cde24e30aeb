# The README's commands. Each runs the idempotent setup first (seconds when nothing changed).
VENV ?= .venv
PY := $(VENV)/bin/python
export ION_D2_VENV := $(VENV)
# `make compare PROPOSALS=ss`: the comparison on selective-search proposals instead of an RPN.
PROPOSALS ?= rpn
# `make bench BENCH_ARGS="--quick"`: options for benchmarks/bench_ion.py (see its --help); then
# benchmarks/bench_train_step.py times a training step on the bundled data.
BENCH_ARGS ?=
# `make gate GATE_ARGS="--seeds 1 2"`: options for benchmarks/accuracy_gate.py (see its --help).
GATE_ARGS ?=
# What `make lint` checks and `make format` rewrites (settings: pyproject.toml, .flake8; pinned
# tools: tools/bootstrap/requirements-dev.txt).
LINT_PATHS := ion_d2 tools benchmarks tests train_net.py setup.py configs/lazy

.PHONY: setup test demo compare bench gate lint format

setup:
	bash tools/bootstrap/setup_env.sh

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) tools/run_demo.py

compare: setup
	$(PY) benchmarks/compare_baseline.py --proposals $(PROPOSALS)

bench: setup
	$(PY) benchmarks/bench_ion.py $(BENCH_ARGS)
	$(PY) benchmarks/bench_train_step.py

gate: setup
	$(PY) benchmarks/accuracy_gate.py $(GATE_ARGS)

# Checks only, all three even when one fails; fails when any does. `make format` fixes what black
# and isort report; flake8's findings are fixed by hand.
lint: setup
	@status=0; \
	$(PY) -m black --check $(LINT_PATHS) || status=1; \
	$(PY) -m isort --check-only $(LINT_PATHS) || status=1; \
	$(PY) -m flake8 $(LINT_PATHS) || status=1; \
	if [ $$status -eq 0 ]; then echo "lint: passed"; else echo "lint: failed"; fi; \
	exit $$status

format: setup
	$(PY) -m isort $(LINT_PATHS)
	$(PY) -m black $(LINT_PATHS)
