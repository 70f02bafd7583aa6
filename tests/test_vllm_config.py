"""The vLLM engine's configuration and the pure parts of its prompt handling (vLLM itself: tests/vllm_cpu, `make test-vllm`)."""
from __future__ import annotations

import importlib.util

import pytest

from actors.vllm_engine import check_image_tokens, collapse_image_runs
from commands.cli import DEFAULT_CONFIG
from protocol.config import ExperimentConfig
from protocol.overrides import ConfigError, load_config

VLLM = ["rollout.engine=vllm"]


def _load(*overrides: str) -> ExperimentConfig:
    return load_config(ExperimentConfig, DEFAULT_CONFIG, list(overrides))


def test_vllm_engine_options_load_and_map_onto_the_rollout_section():
    cfg = _load(*VLLM, "rollout.tensor_parallel_size=2", "cluster.gpus_per_engine=2", "rollout.gpu_memory_utilization=0.6",
                "rollout.max_model_len=2048", "rollout.enforce_eager=true")
    r = cfg.rollout
    got = (r.engine, r.tensor_parallel_size, r.gpu_memory_utilization, r.max_model_len, r.enforce_eager)
    assert got == ("vllm", 2, 0.6, 2048, True)


@pytest.mark.parametrize("overrides, message", [
    (["rollout.engine=sglang"], r"'rollout.engine' must be one of 'hf', 'vllm', got 'sglang'"),
    (["rollout.engine=vlm"], r"'rollout.engine' must be one of .*; did you mean 'vllm'\?"),
    (["rollout.tensor_parallel_size=2"], "needs rollout.engine: vllm"),
    (VLLM + ["rollout.max_staleness=1", "rollout.partial_rollout=true"], "partial_rollout is implemented for the hf engine"),
    (VLLM + ["rollout.tensor_parallel_size=2"], "cluster.gpus_per_engine >= it"),
    (VLLM + ["rollout.gpu_memory_utilization=0"], "gpu_memory_utilization must be in"),
    (VLLM + ["rollout.colocate=true", "rollout.max_staleness=1"], "max_staleness: 0"),
    (["rollout.colocate=true", "cluster.rollout_workers=1"], "one engine per learner rank"),
    (["rollout.colocate=true", "cluster.gpus_per_engine=1", "cluster.gpus_per_learner=1"],
     r"gpus_per_engine \+ cluster.gpus_per_learner must be <= 1.*got 1.0 \+ 1.0.*wrong one"),
    (["rollout.min_pixels=20000", "rollout.max_pixels=10000"], "rollout.min_pixels=20000 must be <="),
])
def test_bad_vllm_settings_are_refused_naming_the_keys(overrides, message):
    with pytest.raises((ValueError, ConfigError), match=message):
        _load(*overrides)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_engine_vllm_without_vllm_says_what_to_install(tiny_model_dir):
    from actors.engine import make_engine
    from actors.vllm_adapter import VLLMUnavailable

    with pytest.raises(VLLMUnavailable, match=r"pip install 'clsrl\[gpu\]'.*rollout.engine: hf"):
        make_engine(_load(*VLLM).rollout, str(tiny_model_dir), False, 0)


def test_image_token_runs_collapse_to_one_placeholder_each():
    assert collapse_image_runs([1, 9, 9, 9, 2, 9, 9, 3], 9) == [1, 9, 2, 9, 3]
    assert collapse_image_runs([1, 2], None) == [1, 2]


def test_image_token_count_mismatch_names_the_prompt_and_the_fix():
    check_image_tokens("p", [1, 9, 9, 2], [1, 9, 9, 2], 9)
    check_image_tokens("p", [1, 9, 9, 2], [1, 9, 2], 9)  # reported before expansion: nothing to compare
    with pytest.raises(ValueError, match=r"prompt shapes/3: vLLM expanded the image into 3 tokens.*has 2.*min_pixels"):
        check_image_tokens("shapes/3", [1, 9, 9, 2], [1, 9, 9, 9, 2], 9)


def test_colocated_engine_gets_a_smaller_gpu_share_unless_one_is_set():
    from actors.vllm_engine import COLOCATED_GPU_MEMORY_UTILIZATION, GPU_MEMORY_UTILIZATION, engine_options

    def share(*overrides: str) -> float:
        cfg = _load(*VLLM, *overrides)
        return engine_options("m", cfg.rollout, "auto", 0, cfg.rollout.colocate).gpu_memory_utilization

    assert share() == GPU_MEMORY_UTILIZATION == 0.85
    assert share("rollout.colocate=true", "cluster.gpus_per_engine=0.5", "cluster.gpus_per_learner=0.5") == \
        COLOCATED_GPU_MEMORY_UTILIZATION < 0.5
    assert share("rollout.colocate=true", "rollout.gpu_memory_utilization=0.3") == 0.3
    assert _load("rollout.colocate=true", "cluster.gpus_per_engine=0.5", "cluster.gpus_per_learner=0.5")


def test_vllm_gets_one_image_no_video_and_the_data_pixel_bounds():
    """vLLM profiles memory for videos and the checkpoint's largest image unless told: the options name one
    image, no video and our data's bounds (the smallest min_pixels, the largest max_pixels of all data sets)."""
    from actors.vllm_adapter import LLMOptions
    from actors.vllm_engine import engine_options

    cfg = _load(*VLLM, "data.min_pixels=3136", "data.max_pixels=50176")
    assert (cfg.rollout.min_pixels, cfg.rollout.max_pixels) == (3136, 50176)
    opts = engine_options("m", cfg.rollout, "auto", 0, False)
    assert (opts.min_pixels, opts.max_pixels) == (3136, 50176)
    vision = LLMOptions(**{**vars(opts), "vision": True}).multimodal_kwargs()
    assert vision == {"limit_mm_per_prompt": {"image": 1, "video": 0},
                      "mm_processor_kwargs": {"min_pixels": 3136, "max_pixels": 50176}}
    assert opts.multimodal_kwargs() == {}  # a text-only model takes no multimodal options
    mixed = load_config(ExperimentConfig, DEFAULT_CONFIG, [*VLLM])
    assert mixed.rollout.max_pixels == mixed.data.max_pixels
    pinned = _load(*VLLM, "rollout.max_pixels=12544")
    assert pinned.rollout.max_pixels == 12544


def test_the_gpu_extra_resolves_without_building_flash_attn():
    """flash-attn is source-only on PyPI and needs torch and nvcc at build time: it has an extra of its own,
    installed with --no-build-isolation after `clsrl[gpu]`, whose vLLM range matches the adapter's."""
    import tomllib
    from pathlib import Path

    from actors.vllm_adapter import SUPPORTED

    extras = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert not any(d.startswith("flash-attn") for d in extras["gpu"]) and extras["flash"] == ["flash-attn>=2.7"]
    (low, high) = SUPPORTED
    assert f"vllm>={low[0]}.{low[1]},<{high[0]}.{high[1]}" in extras["gpu"]
    assert "--no-build-isolation" in (Path(__file__).parent.parent / "docs" / "vllm.md").read_text()
