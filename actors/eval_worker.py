"""Greedy evaluation: answers for held-out prompts, scored by each data set's correctness protocol.

`greedy_answers` is what a rollout worker runs for the in-training evals; `EvalWorker` is the engine-only
actor that `clsrl eval` spreads over the cluster (no Redis, no weight group: weights come from model_path,
and `load` moves one to another checkpoint of the same model, as `clsrl transfer` does for each of its runs).
"""
from __future__ import annotations

import os
import sys

import torch

from actors.engine import RolloutEngine, engine_dtype, make_engine
from protocol.components import SamplingConfig
from protocol.config import RolloutConfig
from protocol.results import EvalAnswer
from protocol.rollout import RolloutRequest
from rewards import get_reward
from tasks.examples import RequestEncoder


def greedy_answers(engine: RolloutEngine, correct: dict, requests: list[RolloutRequest], max_new_tokens: int,
                   prompts_per_call: int, encode: RequestEncoder) -> list[EvalAnswer]:
    """One greedy answer per request, scored 1/0 by its data set's correctness reward. Images are read and
    encoded a call's chunk at a time, so a whole test split streams through in bounded memory; an image
    unreadable here is skipped (named on stderr) when its data set allows, else the error."""
    cfg = SamplingConfig(n=1, max_new_tokens=max_new_tokens, greedy=True)
    out = []
    for start in range(0, len(requests), prompts_per_call):
        chunk, skipped = encode(requests[start:start + prompts_per_call])
        for _, message in skipped:
            print(f"clsrl: eval skips {message}", file=sys.stderr, flush=True)
        if not chunk:
            continue
        groups = engine.generate(chunk, cfg, interruptible=False)  # one policy version per answer
        for request, group in zip(chunk, groups):
            dataset = request.meta["dataset"]
            completion = group.completions[0]
            score = correct[dataset]([completion.text], [request.solution])[0]
            out.append(EvalAnswer(
                dataset=dataset,
                prompt_id=request.prompt_id,
                text=completion.text,
                solution=request.solution,
                correct=float(score),
                tokens=len(completion.token_ids),
                truncated=completion.finish_reason == "length",
            ))
    return out


def correctness_rewards(correct_reward: dict[str, str]) -> dict:
    """Each data set's eval scoring function, by the reward name its task names."""
    return {dataset: get_reward(name) for dataset, name in correct_reward.items()}


class EvalWorker:
    def __init__(self, model_path: str, rollout: RolloutConfig, correct_reward: dict[str, str],
                 trust_remote_code: bool = False, seed: int = 0) -> None:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.engine = make_engine(rollout, model_path, trust_remote_code, seed)
        self.correct = correctness_rewards(correct_reward)
        self.prompts_per_call = rollout.prompts_per_call
        self.encode = RequestEncoder(model_path, trust_remote_code)
        self.model_path, self.trust_remote_code = model_path, trust_remote_code
        self.dtype = engine_dtype(rollout.dtype)
        self.loads = 0  # checkpoints loaded since the engine started (its policy version)

    def load(self, model_path: str) -> int:
        """Answer with the weights of `model_path` from now on: another checkpoint of the same model, copied
        into the running engine through its weight-update path (an engine start costs far more: on a GPU,
        minutes for vLLM). A parameter that does not fit is an error naming it, before anything is copied.
        Returns the number of tensors loaded (0: that checkpoint is already loaded)."""
        if model_path == self.model_path:
            return 0
        from actors.hf_engine import load_policy

        model = load_policy(model_path, self.dtype, self.trust_remote_code)[0]
        self.loads += 1
        loaded = self.engine.update_weights(model.named_parameters(), self.loads)
        self.encode = RequestEncoder(model_path, self.trust_remote_code)
        self.model_path = model_path
        return loaded

    def answer(self, requests: list[RolloutRequest], max_new_tokens: int) -> list[EvalAnswer]:
        return greedy_answers(self.engine, self.correct, requests, max_new_tokens, self.prompts_per_call,
                              self.encode)
