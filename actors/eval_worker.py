"""Greedy evaluation: answers for held-out prompts, scored by each data set's correctness protocol.

`greedy_answers` is what a rollout worker runs for the in-training evals; `EvalWorker` is the engine-only actor
that `clsrl eval` spreads over the cluster (no Redis, no weight group: the weights come from model_path).
"""
from __future__ import annotations

import os

import torch

from actors.engine import RolloutEngine
from protocol.components import SamplingConfig
from protocol.rollout import RolloutRequest
from rewards import get_reward


def greedy_answers(engine: RolloutEngine, correct: dict, requests: list[RolloutRequest], max_new_tokens: int,
                   prompts_per_call: int) -> list[dict]:
    """One greedy answer per request: {dataset, prompt_id, text, solution, correct (1/0)}."""
    cfg = SamplingConfig(n=1, max_new_tokens=max_new_tokens, greedy=True)
    out = []
    for start in range(0, len(requests), prompts_per_call):
        chunk = requests[start:start + prompts_per_call]
        groups = engine.generate(chunk, cfg, interruptible=False)  # one policy version per answer
        for r, g in zip(chunk, groups):
            dataset, completion = r.meta["dataset"], g.completions[0]
            out.append({"dataset": dataset, "prompt_id": r.prompt_id, "text": completion.text, "solution": r.solution,
                        "correct": float(correct[dataset]([completion.text], [r.solution])[0]),
                        "tokens": len(completion.token_ids), "truncated": completion.finish_reason == "length"})
    return out


class EvalWorker:
    def __init__(self, model_path: str, rollout, correct_reward: dict[str, str], trust_remote_code: bool = False,
                 seed: int = 0) -> None:
        """`rollout`: the config's rollout section (which engine, dtype, prompts per call)."""
        from actors.engine import make_engine

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.engine = make_engine(rollout, model_path, trust_remote_code, seed)
        self.correct = {dataset: get_reward(name) for dataset, name in correct_reward.items()}
        self.prompts_per_call = rollout.prompts_per_call

    def answer(self, requests: list[RolloutRequest], max_new_tokens: int) -> list[dict]:
        return greedy_answers(self.engine, self.correct, requests, max_new_tokens, self.prompts_per_call)
