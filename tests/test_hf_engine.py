"""The HF rollout engine: version stamps and weight updates by name."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from actors.hf_engine import HFEngine
from protocol.components import SamplingConfig
from protocol.rollout import RolloutRequest
from tasks.examples import build_examples


def test_generate_and_update_weights(tiny_model_dir, shapes_dataset):
    engine = HFEngine(tiny_model_dir)
    examples, _ = build_examples(engine.processor, shapes_dataset, shapes_dataset.split("test")[:2], "no_think",
                                 56 * 56, 112 * 112, seed=0)
    requests = [RolloutRequest(e.id, e.inputs, e.solution) for e in examples]
    groups = engine.generate(requests, SamplingConfig(n=3, max_new_tokens=5), seed=0)
    assert [len(g.completions) for g in groups] == [3, 3] and {g.policy_version for g in groups} == {0}
    assert groups[0].request.prompt_id == examples[0].id

    trained = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)
    loaded = engine.update_weights(trained.named_parameters(), version=7)
    assert loaded == len(list(trained.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(engine.model.parameters(), trained.parameters()))
    greedy = SamplingConfig(greedy=True, max_new_tokens=5)
    assert engine.generate(requests, greedy)[0].policy_version == 7

    with pytest.raises(KeyError, match="no parameter 'nope'"):
        engine.update_weights([("nope", torch.zeros(1))], version=8)
    name, p = next(iter(trained.named_parameters()))
    with pytest.raises(ValueError, match=f"parameter '{name}'"):
        engine.update_weights([(name, torch.zeros(p.shape[0] + 1))], version=8)
