"""Fixtures for the vLLM tests (their own environment: vLLM's CPU build pins transformers < 5.20)."""
from __future__ import annotations

import pytest

CORPUS = ["the quick brown fox jumps over the lazy dog", "circle square triangle star", "which shape is it?",
          "answer with one word", "<think> a </think> <answer> b </answer>"]


@pytest.fixture(scope="session")
def text_model_dir():
    from vlm.tiny_text import TinyTextSpec, ensure_tiny_text_lm

    return ensure_tiny_text_lm(TinyTextSpec(), CORPUS)
