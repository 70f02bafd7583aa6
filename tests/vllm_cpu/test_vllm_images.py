"""Qwen2-VL with images in vLLM's CPU build (actors/vllm_compat.py makes it run without torchvision).

A tiny Qwen2-VL (head_dim 64, vlm/tiny.py VLLM_CPU_SPEC) runs in a Ray actor next to the HF engine holding
the same weights. vLLM gets one placeholder per image plus the image and must expand it into exactly the
learner's image tokens, then answer greedily with the HF engine's tokens and log-probs; weights broadcast
over gloo must reach the vision tower; and an image repeated across many weight updates must keep working
(vLLM's scheduler must forget encoder outputs the reload dropped: else "Encoder cache miss" kills the
engine).
"""
from __future__ import annotations

import pytest
import ray
import torch

from actors.hf_engine import HFEngine
from protocol.components import SamplingConfig, WeightSyncConfig
from protocol.rollout import RolloutRequest
from tasks.examples import build_examples
from weights.checksum import checksums
from weights.sender import WeightSender

GREEDY = SamplingConfig(n=1, max_new_tokens=10, greedy=True)
ATOL = 1e-5


def _vllm_name(hf_name: str) -> str:
    """transformers 5's Qwen2-VL parameter names as vLLM's model names them (unfused ones)."""
    if hf_name.startswith("model.language_model."):
        return "language_model.model." + hf_name.removeprefix("model.language_model.")
    return hf_name.removeprefix("model.")


def _moved(hf: HFEngine, seed: int, scale: float) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(n, p.detach() + scale * torch.randn(p.shape, generator=gen)) for n, p in hf.model.named_parameters()]


def _assert_same_answers(ours, theirs, version: int) -> None:
    for a, b in zip(ours, theirs):
        (ca,), (cb,) = a.completions, b.completions
        assert a.policy_version == version
        assert ca.token_ids == cb.token_ids and ca.text == cb.text and ca.finish_reason == cb.finish_reason
        assert torch.allclose(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs), atol=ATOL)


@pytest.fixture(scope="module")
def vl(ray_local, vl_model_dir, shapes_dataset):
    from actors.vllm_adapter import LLMOptions, generate, sampling_params
    from actors.vllm_engine import VLLMEngine

    class Probe(VLLMEngine):
        """The engine plus one question for the test: the prompt ids vLLM ran, image expanded."""

        def ran_prompt_ids(self, requests: list[RolloutRequest]) -> list[list[int]]:
            params = [sampling_params(1, 1, 1.0, 1.0, 0, True, None, self.blocked)] * len(requests)
            with self.lock:
                return [ran for ran, _ in generate(self.llm, [self._prompt(r.inputs) for r in requests], params)]

    opts = LLMOptions(model=str(vl_model_dir), dtype="float32", gpu_memory_utilization=0.05, max_model_len=512,
                      enforce_eager=True, ipc_weights=True, min_pixels=56 * 56, max_pixels=112 * 112)
    actor = ray.remote(num_cpus=1)(Probe).remote(opts)
    hf = HFEngine(vl_model_dir)
    examples, _ = build_examples(hf.processor, shapes_dataset, shapes_dataset.split("test")[:4], "no_think",
                                 56 * 56, 112 * 112, seed=0)
    requests = [RolloutRequest(e.id, e.inputs, e.solution) for e in examples]
    yield actor, hf, requests
    ray.kill(actor)


def test_image_prompts_expand_into_the_learners_image_tokens_and_answer_like_hf(vl):
    actor, hf, requests = vl
    image_token = hf.model.config.image_token_id
    ran = ray.get(actor.ran_prompt_ids.remote(requests))
    for r, ids in zip(requests, ran):
        ours = r.inputs.input_ids.tolist()
        assert ours.count(image_token) > 1 and ids == ours  # one placeholder in, the learner's run out
    _assert_same_answers(ray.get(actor.generate.remote(requests, GREEDY)), hf.generate(requests, GREEDY), 0)


def test_gloo_broadcast_reaches_the_vision_tower_and_checksums_follow(vl):
    actor, hf, requests = vl
    before = ray.get(actor.checksums.remote())
    named = _moved(hf, seed=1, scale=0.02)
    hf.update_weights(named, 1)
    cfg = WeightSyncConfig(timeout_s=60, bucket_mb=1)
    sender = WeightSender("127.0.0.1", 0, 1, cfg, connect=False)
    try:
        joined = actor.join_weight_group.remote("127.0.0.1", sender.port, 1, 1, cfg, "vllm-vl")
        sender.connect()
        ray.get(joined)
        receiving = actor.receive_weights.remote(60)
        sender.broadcast(iter(named), 1)
        assert ray.get(receiving) == {"version": 1, "tensors": len(named)}
    finally:
        sender.close()
    sums, sent = ray.get(actor.checksums.remote()), checksums((_vllm_name(n), t) for n, t in named)
    same_name = {n for n in sums if n in sent}
    assert any(n.startswith("visual.") for n in same_name) and "language_model.model.embed_tokens.weight" in same_name
    # every unfused tensor equals what was sent, except 2-D linear weights: vLLM's CPU build computes those
    # from a prepacked copy and leaves the `weight` parameter stale (on GPU it follows); the answers below
    # show the new weights are in use
    stale = {n for n in same_name if sums[n] != sent[n]}
    assert all(sums[n] == before[n] and n.endswith(".weight") and not n.endswith("norm.weight") for n in stale)
    assert {"visual.patch_embed.proj.weight", "visual.merger.ln_q.weight"} <= same_name - stale
    _assert_same_answers(ray.get(actor.generate.remote(requests, GREEDY)), hf.generate(requests, GREEDY), 1)


def test_images_repeated_across_many_weight_updates_keep_working(vl):
    """Each version is loaded in place (the colocated path's loader; on CPU the handles carry copies) and
    the same four images are asked again: before the encoder-cache reset this died at the first repeat."""
    from weights.ipc import share

    actor, hf, requests = vl
    for version in range(2, 8):
        named = _moved(hf, seed=version, scale=0.01)
        hf.update_weights(named, version)
        handles, keep = share(named)
        assert ray.get(actor.load_ipc.remote(handles, version)) == len(named)
        del keep
        _assert_same_answers(ray.get(actor.generate.remote(requests, GREEDY)), hf.generate(requests, GREEDY),
                             version)
