# The README's commands. Each runs the idempotent setup first (seconds when nothing changed).
VENV ?= .venv
PY := $(VENV)/bin/python
export ION_D2_VENV := $(VENV)
# `make compare PROPOSALS=ss`: the comparison on selective-search proposals instead of an RPN.
PROPOSALS ?= rpn
# `make bench BENCH_ARGS="--quick"`: options for benchmarks/bench_ion.py (see its --help).
BENCH_ARGS ?=
# `make gate GATE_ARGS="--seeds 1 2"`: options for benchmarks/accuracy_gate.py (see its --help).
GATE_ARGS ?=

.PHONY: setup test demo compare bench gate

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

gate: setup
	$(PY) benchmarks/accuracy_gate.py $(GATE_ARGS)
