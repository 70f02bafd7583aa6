"""Fixtures for the vLLM tests (their own environment: vLLM's CPU build pins transformers < 5.20)."""
from __future__ import annotations

import pytest

CORPUS = ["the quick brown fox jumps over the lazy dog", "circle square triangle star", "which shape is it?",
          "answer with one word", "<think> a </think> <answer> b </answer>"]


@pytest.fixture(scope="session")
def text_model_dir():
    from vlm.tiny_text import TinyTextSpec, ensure_tiny_text_lm

    return ensure_tiny_text_lm(TinyTextSpec(), CORPUS)


@pytest.fixture(scope="session", autouse=True)
def vllm_compat_installed():
    """vLLM's Qwen2-VL here needs actors/vllm_compat.py in every process vLLM and Ray start: the Makefile
    writes its .pth into the environment; an environment built before that gets it here (and this process,
    which started without it, installs the hook now)."""
    import sysconfig
    from pathlib import Path

    from actors import vllm_compat

    pth = Path(sysconfig.get_paths()["purelib"]) / vllm_compat.PTH_NAME
    repo = Path(vllm_compat.__file__).resolve().parent.parent
    if not pth.exists() or pth.read_text() != vllm_compat.pth_text(repo):
        vllm_compat.write_pth()
    vllm_compat.install()


@pytest.fixture(scope="session")
def vl_model_dir(shapes_dataset):
    """The tiny Qwen2-VL with head_dim 64 (vLLM's CPU attention kernels take nothing smaller)."""
    from tasks.examples import tokenizer_corpus
    from vlm.tiny import VLLM_CPU_SPEC, ensure_tiny_vlm

    return ensure_tiny_vlm(VLLM_CPU_SPEC, tokenizer_corpus([shapes_dataset]))
