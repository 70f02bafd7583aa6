# `make demo` and `make test` set up .venv on first use (CPU torch pinned by constraints-cpu.txt).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_FLAGS ?=

.PHONY: setup demo test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(PIP_FLAGS) -c constraints-cpu.txt torch==2.13.0
	$(PY) -m pip install -q $(PIP_FLAGS) -c constraints-cpu.txt -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/clsrl demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) bench/bench_rewards.py
	$(PY) bench/async_vs_sync.py --out runs/bench-async
	$(PY) bench/limits_rollout.py --out runs/bench-limits
	$(PY) bench/limits_weights.py --out runs/bench-limits
	$(PY) bench/limits_buffer.py --out runs/bench-limits
	$(PY) bench/limits_learner.py --out runs/bench-limits
	$(PY) bench/scaling_model.py --out runs/bench-limits

clean:
	rm -rf runs .pytest_cache
