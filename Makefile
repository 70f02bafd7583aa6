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
	$(PY) bench/vs_trl.py --out runs/bench-vs-trl

clean:
	rm -rf runs .pytest_cache
