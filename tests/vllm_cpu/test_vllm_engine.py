"""The vLLM engine for real, on vLLM's CPU build (run in its own environment: `make test-vllm`).

A tiny text-only Qwen2 (Qwen2-VL with images: test_vllm_images.py) runs inside a Ray actor. The test process plays
learner rank 0: it broadcasts changed weights over gloo through the worker extension, after which vLLM's
greedy answers and log-probs must match the HF engine's holding the same weights, vision tokens must stay
blocked although the new weights favour one, and sampled log-probs must be those of the tempered policy.
"""
from __future__ import annotations

import pytest
import ray
import torch

from actors.hf_engine import HFEngine
from protocol.components import SamplingConfig, WeightSyncConfig
from protocol.rollout import PromptInputs, RolloutRequest
from vlm.logprobs import policy_logprobs
from weights.checksum import checksums
from weights.sender import WeightSender

QUESTIONS = ["circle square", "which shape is it?", "the quick brown fox", "answer with one word"]
VISION = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


def _requests(tokenizer) -> list[RolloutRequest]:
    out = []
    for i, q in enumerate(QUESTIONS):
        text = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        out.append(RolloutRequest(f"p{i}", PromptInputs(torch.tensor(tokenizer.encode(text)))))
    return out


def _new_weights(hf: HFEngine, requests: list[RolloutRequest]) -> list[tuple[str, torch.Tensor]]:
    """The learner's next version: every weight moved, and <|image_pad|>'s tied embedding row made 10x the
    row of the token greedy decoding picks first, so an unblocked engine would emit the image token."""
    gen = torch.Generator().manual_seed(1)
    named = [(n, p.detach() + 0.02 * torch.randn(p.shape, generator=gen)) for n, p in hf.model.named_parameters()]
    hf.update_weights(named, 1)
    first = hf.generate(requests[:1], SamplingConfig(n=1, max_new_tokens=1, greedy=True))[0].completions[0].token_ids[0]
    emb_name = next(n for n, p in hf.model.named_parameters() if p is hf.model.get_input_embeddings().weight)
    image_pad = hf.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    emb = dict(named)[emb_name]
    emb[image_pad] = 10 * emb[first]
    hf.update_weights(named, 1)
    with torch.no_grad():
        logits = hf.model(requests[0].inputs.input_ids[None]).logits[0, -1]
    assert int(logits.argmax()) == image_pad  # unblocked, the image token would win
    return named


def _broadcast(engine, named, version: int) -> dict:
    cfg = WeightSyncConfig(timeout_s=60, bucket_mb=1)
    sender = WeightSender("127.0.0.1", 0, 1, cfg, connect=False)
    try:
        joined = engine.join_weight_group.remote("127.0.0.1", sender.port, 1, 1, cfg, "vllm-engine")
        sender.connect()
        assert len(ray.get(joined)) == 1
        receiving = engine.receive_weights.remote(60)
        stats = sender.broadcast(iter(named), version)
        got = ray.get(receiving)
        assert got["version"] == version and got["tensors"] == len(named)
        return stats
    finally:
        sender.close()


@pytest.fixture(scope="module")
def engines(ray_local, text_model_dir):
    from actors.vllm_adapter import LLMOptions
    from actors.vllm_engine import VLLMEngine

    opts = LLMOptions(model=str(text_model_dir), dtype="float32", gpu_memory_utilization=0.05, max_model_len=512,
                      enforce_eager=True, ipc_weights=True)
    actor = ray.remote(num_cpus=1)(VLLMEngine).remote(opts)
    hf = HFEngine(text_model_dir)
    yield actor, hf
    ray.kill(actor)


def test_vllm_engine_after_a_gloo_broadcast_matches_the_hf_engine(engines):
    actor, hf = engines
    requests = _requests(hf.tokenizer)
    greedy = SamplingConfig(n=1, max_new_tokens=12, greedy=True)
    before = ray.get(actor.generate.remote(requests, greedy))
    assert [g.policy_version for g in before] == [0] * len(requests)
    sums_before = ray.get(actor.checksums.remote())
    named = _new_weights(hf, requests)
    stats = _broadcast(actor, named, version=1)
    assert stats["tensors"] == len(named) and stats["bytes"] == sum(t.numel() * t.element_size() for _, t in named)
    # the extension hashes with weights/checksum.py under vLLM's names: the embedding and the norms changed, and
    # the norms (kept unfused and unpacked) hash exactly like the learner's. On this CPU build the linear
    # projections run from a prepacked copy whose `weight` parameter no longer follows reloads (on GPU it does)
    sums = ray.get(actor.checksums.remote())
    assert sums.keys() == sums_before.keys()
    unchanged = {n for n in sums if sums[n] == sums_before[n]}
    assert "model.embed_tokens.weight" not in unchanged and all(n.endswith("_proj.weight") for n in unchanged)
    norms = [n for n in sums if n.endswith("norm.weight")]
    assert norms and {n: sums[n] for n in norms} == {n: d for n, d in checksums(named).items() if n in norms}

    ours = ray.get(actor.generate.remote(requests, greedy))
    theirs = hf.generate(requests, greedy)
    vision = set(hf.tokenizer.convert_tokens_to_ids(list(VISION)))
    for a, b, old in zip(ours, theirs, before):
        assert a.policy_version == 1
        (ca,), (cb,), (co,) = a.completions, b.completions, old.completions
        assert ca.token_ids == cb.token_ids and ca.finish_reason == cb.finish_reason and ca.text == cb.text
        assert not vision & set(ca.token_ids)
        assert torch.allclose(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs), atol=2e-3)
        assert ca.logprobs != co.logprobs  # the new weights are in use


def test_g_samples_carry_the_tempered_policy_logprobs(engines):
    actor, hf = engines
    requests = _requests(hf.tokenizer)
    sampling = SamplingConfig(n=4, max_new_tokens=10, temperature=0.7)
    groups = ray.get(actor.generate.remote(requests, sampling, 123))
    again = ray.get(actor.generate.remote(requests, sampling, 123))
    blocked = hf.tokenizer.convert_tokens_to_ids(list(VISION))
    for r, g, g2 in zip(requests, groups, again):
        assert len(g.completions) == 4 and g.request.prompt_id == r.prompt_id
        assert [c.token_ids for c in g.completions] == [c.token_ids for c in g2.completions]  # seeded
        for c in g.completions:
            assert 1 <= len(c.token_ids) <= 10 and len(c.logprobs) == len(c.token_ids)
            assert c.finish_reason == ("stop" if c.token_ids[-1] == hf.tokenizer.convert_tokens_to_ids("<|im_end|>")
                                       else "length")
            ids = torch.cat([r.inputs.input_ids, torch.tensor(c.token_ids)])
            with torch.no_grad():
                logits = hf.model(ids[None]).logits[0, len(r.inputs) - 1:-1]
            expect = policy_logprobs(logits, torch.tensor(c.token_ids), 0.7, blocked)
            assert torch.allclose(torch.tensor(c.logprobs), expect, atol=2e-3)
    assert len({tuple(c.token_ids) for g in groups for c in g.completions}) > len(requests)  # not all alike


def test_colocated_load_path_on_cpu_where_handles_carry_copies_not_cuda_ipc(engines):
    """Colocated mode's weight path (learner handles -> engine.load_ipc -> worker extension -> in-place reload)
    end to end. On CPU, torch's handles of CPU tensors travel as copies through pickling; CUDA IPC itself and
    vLLM's sleep/wake need a GPU (docs/vllm.md)."""
    from weights.ipc import share

    actor, hf = engines
    requests = _requests(hf.tokenizer)
    gen = torch.Generator().manual_seed(2)
    named = [(n, p.detach() + 0.05 * torch.randn(p.shape, generator=gen)) for n, p in hf.model.named_parameters()]
    hf.update_weights(named, 2)
    handles, keep = share(named)
    assert ray.get(actor.load_ipc.remote(handles, 2)) == len(named)
    greedy = SamplingConfig(n=1, max_new_tokens=8, greedy=True)
    for a, b in zip(ray.get(actor.generate.remote(requests, greedy)), hf.generate(requests, greedy)):
        assert a.policy_version == 2
        assert a.completions[0].token_ids == b.completions[0].token_ids
        assert torch.allclose(torch.tensor(a.completions[0].logprobs), torch.tensor(b.completions[0].logprobs), atol=2e-3)
    del keep


def test_rollout_worker_hosting_vllm_publishes_scored_groups_to_redis(ray_local, text_model_dir, tmp_path):
    """The actor shell around the engine, as a run drives it: rollout.engine: vllm -> sample G, score on the
    reward actor, publish to the Redis stream the learners read."""
    from actors.reward_actor import RewardActor
    from actors.rollout_worker import RolloutWorker
    from protocol.components import RedisConfig, RewardTerm
    from protocol.config import RolloutConfig
    from stream.buffer import RolloutBuffer
    from stream.server import connect

    redis_cfg = RedisConfig()
    url, server = connect(redis_cfg, tmp_path)
    rollout = RolloutConfig(engine="vllm", dtype="fp32", prompts_per_call=3, gpu_memory_utilization=0.05, max_model_len=512,
                            enforce_eager=True)
    reward = ray.remote(RewardActor).remote({"text": [RewardTerm("cls_equality")]})
    worker = ray.remote(RolloutWorker).remote(0, str(text_model_dir), SamplingConfig(n=4, max_new_tokens=8), rollout, url,
                                              redis_cfg, [reward], {"text": "cls_equality"})
    buffer = RolloutBuffer.from_config(redis_cfg, url, consumer="test")
    try:
        tokenizer = HFEngine(text_model_dir).tokenizer
        requests = _requests(tokenizer)
        for i, r in enumerate(requests):
            r.solution, r.meta = "circle", {"dataset": "text", "draw": i}
        summary = ray.get(worker.rollout.remote(requests, 7))
        assert sorted(summary.published) == [0, 1, 2, 3] and summary.policy_version == 0
        assert len(summary.datasets["text"].rewards) == 16
        groups = [g for _, g in buffer.take(8, block_ms=2000)]
        assert sorted(g.request.prompt_id for g in groups) == ["p0", "p1", "p2", "p3"]
        for g in groups:
            assert len(g.completions) == 4 and len(g.rewards) == 4 and set(g.reward_components) == {"cls_equality"}
            assert all(len(c.logprobs) == len(c.token_ids) > 0 for c in g.completions)
            inputs = g.request.inputs  # a text prompt travels without image fields
            assert inputs.image is None and inputs.image_grid_thw is None
        answers = ray.get(worker.evaluate.remote(requests[:2], 6))
        assert [a.prompt_id for a in answers] == ["p0", "p1"] and all(a.correct in (0.0, 1.0) for a in answers)
    finally:
        buffer.close()
        ray.get(worker.close.remote())
        ray.kill(worker)
        if server is not None:
            server.stop()
