"""The DeepSpeed learner group on a real local Ray cluster: two ranks over gloo."""
from __future__ import annotations

import pytest
import torch

from learner.grpo import group_advantages
from learner.worker import LearnerWorker
from protocol.components import GRPOConfig, LearnerConfig, SamplingConfig
from protocol.rollout import RolloutGroup, RolloutRequest
from tasks.examples import build_examples
from vlm.generation import sample_completions
from weights.checksum import checksums
from weights.network import listen_port


def _groups(tiny_policy, dataset, prompts=4, n=4):
    model, processor = tiny_policy
    examples, _ = build_examples(processor, dataset, dataset.split("train")[:prompts], "no_think", 3136, 12544, seed=0)
    sampling = SamplingConfig(n=n, max_new_tokens=6)
    outs = sample_completions(model, processor.tokenizer, [e.inputs for e in examples], sampling, seed=0, image_processor=processor.image_processor)
    groups = [RolloutGroup(RolloutRequest(e.id, e.inputs, e.solution), o, 0) for e, o in zip(examples, outs)]
    rewards = torch.tensor([[float(i == j) for j in range(n)] for i in range(prompts)]).flatten()
    adv = group_advantages(rewards, n).view(prompts, n)
    return [(g, a.tolist()) for g, a in zip(groups, adv)]


@pytest.mark.slow
@pytest.mark.parametrize("stage, beta", [(2, 0.04), (3, 0.04)])
def test_two_rank_train_step(ray_local, tiny_model_dir, tiny_policy, shapes_dataset, stage, beta, tmp_path):
    ray = ray_local
    Worker = ray.remote(num_cpus=1)(LearnerWorker)
    port = listen_port("127.0.0.1")
    # learner.attn_implementation reaches the model: sdpa (auto on CPU) for ZeRO-2, eager for ZeRO-3
    attn = "auto" if stage == 2 else "eager"
    cfg = LearnerConfig(zero_stage=stage, micro_batch_size=4, lr=1e-3, attn_implementation=attn)
    workers = [Worker.remote(r, 2, "127.0.0.1", port, str(tiny_model_dir), cfg, GRPOConfig(beta=beta),
                             samples_per_rank=8, total_steps=3) for r in range(2)]
    try:
        assert ray.get(workers[0].kernels.remote()) == {"attention": "sdpa" if stage == 2 else "eager",
                                                        "optimizer": "AdamW"}  # torch's: no op build on CPU
        held = ray.get([w.held_parameters.remote() for w in workers])
        for h in held:  # ZeRO-3 (built under zero.Init): each rank holds about half of each model, never all
            share = h["policy"] / h["policy_total"], h["reference"] / h["reference_total"]
            assert all(0.45 < s < 0.6 for s in share) if stage == 3 else share == (1.0, 1.0), (stage, h)
        before = ray.get([w.parameter_checksums.remote() for w in workers])[0]  # ZeRO-3 gathers on all ranks
        groups = _groups(tiny_policy, shapes_dataset)
        for _ in range(2):
            stats = ray.get([w.train_step.remote(groups[r * 2:(r + 1) * 2]) for r, w in enumerate(workers)])
        assert all(torch.isfinite(torch.tensor(s["pg_loss"])) and s["grad_norm"] > 0 for s in stats)
        assert ("kl" in stats[0]) == (beta > 0)
        assert stats[0]["logprob_gap"] > 0  # weights moved after step 1, the rollout's behaviour logprobs are stale
        after = ray.get([w.parameter_checksums.remote() for w in workers])
        assert after[0] == after[1]  # data-parallel ranks hold the same weights, bit for bit
        assert after[0].keys() == before.keys() and after[0] != before  # and training moved them

        ray.get([w.save_checkpoint.remote(str(tmp_path), "step-2", {"step": 2}) for w in workers])
        from transformers import AutoModelForImageTextToText

        exported = AutoModelForImageTextToText.from_pretrained(tmp_path / "step-2" / "hf", dtype=torch.float32)
        exported_sums = checksums(exported.named_parameters())
        assert exported_sums == {n: after[0][n] for n in exported_sums}  # the trained weights, ZeRO-3 gathered
        assert ray.get([w.load_checkpoint.remote(str(tmp_path), "step-2") for w in workers])[0]["step"] == 2
    finally:
        ray.get([w.close.remote() for w in workers])
        for w in workers:
            ray.kill(w)
