# The README's commands. Each runs the idempotent setup first (seconds when nothing changed).
VENV ?= .venv
PY := $(VENV)/bin/python
export ION_D2_VENV := $(VENV)
# `make compare PROPOSALS=ss`: the comparison on selective-search proposals instead of an RPN.
PROPOSALS ?= rpn

.PHONY: setup test demo compare

setup:
	bash tools/bootstrap/setup_env.sh

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) tools/run_demo.py

compare: setup
	$(PY) benchmarks/compare_baseline.py --proposals $(PROPOSALS)
