"""Partial rollout: a weight update interrupts generation in flight, which continues under the new weights, each
token keeping the version (and behaviour log-prob) that sampled it; and the same option through the whole loop."""
from __future__ import annotations

import json
import threading

import pytest
import torch

from actors.hf_engine import HFEngine
from cluster.driver import train
from commands.cli import DEFAULT_CONFIG
from learner.objective import pad_rows
from protocol.components import SamplingConfig
from protocol.config import ExperimentConfig
from protocol.overrides import ConfigError, load_config
from protocol.rollout import RolloutRequest
from tasks.examples import build_examples
from vlm.inputs import build_sequence_batch, image_patches, left_pad_prompts, vision_token_ids
from vlm.logprobs import completion_logprobs
from vlm.partial import continuation_inputs

SWITCH_AFTER = 3  # tokens sampled under the old weights before the update lands
SAMPLING = SamplingConfig(n=4, max_new_tokens=12, temperature=1.0)


def _requests(engine, dataset, n=2):
    examples, _ = build_examples(engine.processor, dataset, dataset.split("test")[:n], "no_think", 56 * 56, 112 * 112, seed=0)
    return [RolloutRequest(e.id, e.inputs, e.solution) for e in examples]


def _old_and_new(engine) -> tuple[dict, dict]:
    """Two clearly different weight sets: the old one makes the stop token likely (some rows finish before the
    switch and must be dropped from the continuation), the new one is the model plus noise."""
    gen = torch.Generator().manual_seed(0)
    old = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    new = {n: p + 0.05 * torch.randn(p.shape, generator=gen) for n, p in old.items()}
    eos, emb = engine.model.generation_config.eos_token_id, engine.model.get_input_embeddings().weight
    name = next(n for n, p in engine.model.named_parameters() if p is emb)
    old[name][eos] *= 20
    return old, new


def _pause_at_forward(model, k: int, engine, reached: threading.Event, rows: int):
    """After the model's k-th forward over the `rows` sampled rows (the one that samples token k), block the
    generating thread until a weight update waits, so the update lands after exactly k tokens."""
    calls = [0]

    def hook(module, args, output):
        if output.logits.shape[0] != rows:  # the prompts' one shared forward (shared_prefill) samples nothing
            return
        calls[0] += 1
        if calls[0] == k:
            reached.set()
            for _ in range(600):
                if engine.gate.update_waiting:
                    return
                threading.Event().wait(0.05)
            raise TimeoutError("no weight update arrived")

    return model.register_forward_hook(hook)


def _generate_with_update(engine, requests, new: dict, version: int) -> list:
    reached, out = threading.Event(), {}
    handle = _pause_at_forward(engine.model, SWITCH_AFTER, engine, reached, len(requests) * SAMPLING.n)
    worker = threading.Thread(target=lambda: out.update(groups=engine.generate(requests, SAMPLING, seed=5)))
    worker.start()
    try:
        assert reached.wait(60), "generation did not start"
        assert engine.update_weights(new.items(), version) == len(new)  # returns once the copy is done
        worker.join(60)
        assert not worker.is_alive()
    finally:
        handle.remove()
    return out["groups"]


def _rescored(engine, requests, groups) -> tuple[torch.Tensor, torch.Tensor]:
    model = engine.model
    comps = [c for g in groups for c in g.completions]
    prompts = [r.inputs for r, g in zip(requests, groups) for _ in g.completions]
    batch = build_sequence_batch(prompts, [c.token_ids for c in comps], model.generation_config.pad_token_id,
                                 model.config.image_token_id, engine.processor.image_processor)
    with torch.no_grad():
        lp, mask = completion_logprobs(model, batch, SAMPLING.temperature, vision_token_ids(model.config))
    return lp, mask


def _load(engine, weights: dict) -> None:
    params = dict(engine.model.named_parameters())
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)


def test_update_mid_generation_continues_under_the_new_weights(tiny_model_dir, shapes_dataset):
    engine = HFEngine(tiny_model_dir, partial_rollout=True)
    old, new = _old_and_new(engine)
    _load(engine, old)
    requests = _requests(engine, shapes_dataset)
    groups = _generate_with_update(engine, requests, new, version=1)
    assert engine.policy_version == 1 and not engine.gate.update_waiting
    comps = [c for g in groups for c in g.completions]
    before = [c for c in comps if len(c.token_ids) <= SWITCH_AFTER and c.finish_reason == "stop"]
    continued = [c for c in comps if c not in before]
    assert before and continued  # both kinds of rows, so the continuation really selected a subset
    for c in before:
        assert c.versions == [0] * len(c.token_ids)
    for c in continued:
        assert c.versions == [0] * SWITCH_AFTER + [1] * (len(c.token_ids) - SWITCH_AFTER)
        assert len(c.token_ids) == SAMPLING.max_new_tokens or c.finish_reason == "stop"
        assert len(c.logprobs) == len(c.token_ids)
    assert not set(vision_token_ids(engine.model.config)) & {t for c in comps for t in c.token_ids}
    assert all(g.policy_version == 0 for g in groups)
    assert {g.version_span for g in groups} <= {(0, 0), (0, 1)} and (0, 1) in {g.version_span for g in groups}

    # behaviour log-probs: tokens before the switch are the old weights' (with that row's own image), after it the new's
    under_new, mask = _rescored(engine, requests, groups)
    _load(engine, old)
    under_old, _ = _rescored(engine, requests, groups)
    behaviour = pad_rows([c.logprobs for c in comps], mask.shape[1])
    version = pad_rows([c.versions for c in comps], mask.shape[1])
    is_old, is_new = mask.bool() & (version == 0), mask.bool() & (version == 1)
    assert is_old.sum() and is_new.sum()
    assert (behaviour - under_old)[is_old].abs().max() < 1e-4
    assert (behaviour - under_new)[is_new].abs().max() < 1e-4
    assert (under_old - under_new)[is_new].abs().mean() > 0.05  # the check tells the two versions apart


def test_without_partial_rollout_an_update_waits_for_the_batch(tiny_model_dir, shapes_dataset):
    engine = HFEngine(tiny_model_dir)
    old, new = _old_and_new(engine)
    _load(engine, old)
    requests = _requests(engine, shapes_dataset)
    groups = _generate_with_update(engine, requests, new, version=1)
    assert engine.policy_version == 1
    assert all(c.versions == [0] * len(c.token_ids) for g in groups for c in g.completions)
    assert {g.version_span for g in groups} == {(0, 0)}
    lp, mask = _rescored(engine, requests, groups)  # now the new weights: not what sampled
    _load(engine, old)
    lp_old, _ = _rescored(engine, requests, groups)
    behaviour = pad_rows([c.logprobs for g in groups for c in g.completions], mask.shape[1])
    assert ((behaviour - lp_old).abs() * mask).max() < 1e-4 < ((behaviour - lp).abs() * mask).max()


def test_idle_update_applies_at_once_and_uninterrupted_sampling_is_unchanged(tiny_model_dir, shapes_dataset):
    partial, plain = HFEngine(tiny_model_dir, partial_rollout=True), HFEngine(tiny_model_dir)
    requests = _requests(partial, shapes_dataset)
    a, b = partial.generate(requests, SAMPLING, seed=3), plain.generate(requests, SAMPLING, seed=3)
    assert [c.token_ids for g in a for c in g.completions] == [c.token_ids for g in b for c in g.completions]
    assert [c.logprobs for g in a for c in g.completions] == [c.logprobs for g in b for c in g.completions]

    _, new = _old_and_new(partial)
    updating = threading.Thread(target=partial.update_weights, args=(new.items(), 4))
    updating.start()
    updating.join(60)
    assert not updating.is_alive() and partial.policy_version == 4  # nothing in flight: nothing to wait for
    groups = partial.generate(requests, SAMPLING, seed=3)
    assert {g.version_span for g in groups} == {(4, 4)} and {g.policy_version for g in groups} == {4}


def test_continuation_inputs_keep_each_rows_own_image(tiny_policy, shapes_dataset):
    model, processor = tiny_policy
    examples, _ = build_examples(processor, shapes_dataset, shapes_dataset.split("train")[:3], "no_think",
                                 56 * 56, 112 * 112, seed=0)
    prompts = [e.inputs for e in examples]
    pad, image = model.generation_config.pad_token_id, model.config.image_token_id
    rows = [(2, [5, 6, 7]), (0, [8, 9, 10])]  # prompt 1's rows finished: dropped
    patches = processor.image_processor
    inputs = continuation_inputs(prompts, rows, pad, image, patches)
    assert torch.equal(inputs["pixel_values"], torch.cat([image_patches(patches, prompts[2]),
                                                          image_patches(patches, prompts[0])]))
    assert torch.equal(inputs["image_grid_thw"], torch.cat([prompts[2].image_grid_thw, prompts[0].image_grid_thw]))
    for i, (p, tokens) in enumerate(rows):
        n = len(prompts[p]) + len(tokens)
        assert inputs["input_ids"][i, -n:].tolist() == prompts[p].input_ids.tolist() + tokens  # left-padded
        assert int(inputs["attention_mask"][i].sum()) == n
        assert int(inputs["mm_token_type_ids"][i].sum()) == int((prompts[p].input_ids == image).sum())
    # the continued rows score their prefix exactly as the prompt + tokens would be scored from scratch
    fresh = left_pad_prompts([prompts[2]], pad, image, patches)
    with torch.no_grad():
        one = model(**continuation_inputs(prompts, rows[:1], pad, image, patches)).logits[0, -4]
        ref = model(**fresh).logits[0, -1]
    assert torch.allclose(one, ref, atol=1e-4)


def test_partial_rollout_needs_rollout_to_run_ahead():
    with pytest.raises(ConfigError, match="rollout.partial_rollout needs rollout.max_staleness >= 1"):
        load_config(ExperimentConfig, DEFAULT_CONFIG, ["rollout.partial_rollout=true"])
    assert load_config(ExperimentConfig, DEFAULT_CONFIG, ["rollout.partial_rollout=true", "rollout.max_staleness=1"])


@pytest.mark.slow
def test_partial_rollout_through_the_loop(ray_local, tmp_path):
    """Rollout one version ahead with interruptible generation: it finishes, every draw is trained on once, staleness
    (from the oldest token) stays within the bound, and the driver logs how many groups spanned versions."""
    cfg = load_config(ExperimentConfig, DEFAULT_CONFIG, [
        "train.steps=3", "train.warm_start_steps=0", "train.prompts_per_step=4", "train.eval_every=0",
        "train.save_every=0", "data.eval_limit=4", "sampling.n=4", "sampling.max_new_tokens=64",
        "learner.micro_batch_size=8", "weight_sync.timeout_s=15", "rollout.prompts_per_call=1",
        "rollout.max_staleness=1", "rollout.partial_rollout=true", "algorithm.off_policy=tis",
        "algorithm.dynamic_sampling=false", "cluster.learner_ranks=1"])  # no warm start: no signal to keep
    result = train(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][1:]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert set(result["staleness"]) <= {0, 1} and sum(result["staleness"].values()) == 3 * 4
    assert all(r["dropped/duplicate"] == 0 for r in rows)
    logged = [r for r in rows if "rollout/partial_frac" in r]
    print("partial_frac per step:", [r.get("rollout/partial_frac") for r in rows])
    assert logged and all(0 <= r["rollout/partial_frac"] <= 1 and r["rollout/span_max"] in (0, 1) for r in logged)
    # some group was interrupted by a broadcast and continued under the newer weights
    assert any(r["rollout/span_max"] == 1 and r["rollout/partial_frac"] > 0 for r in logged), \
        [(r["rollout/partial_frac"], r["rollout/span_max"]) for r in logged]
