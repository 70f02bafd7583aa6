"""Generation that yields to weight updates (partial rollout).

By default an engine finishes its whole batch before new weights are copied in. With partial rollout a
weight update that arrives mid-batch interrupts it instead: the `generate` call in flight stops after the
token it is sampling, the weights are swapped, and the unfinished rows continue from their prefix (prompt +
tokens so far) under the new weights, until `max_new_tokens` in total; rows that already stopped stay
finished. Every token keeps the behaviour log-prob of the version that sampled it and is stamped with that
version, which is what the off-policy importance ratio and the staleness count (from the oldest token) need.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from protocol.components import SamplingConfig
from protocol.rollout import Completion, PromptInputs
from vlm.generation import eos_token_ids, generate_segment, stop_index
from vlm.inputs import left_pad_prompts


class WeightGate:
    """Orders a generating thread and a weight-updating thread on one model.

    Generation runs in segments, each under `segment()`; an update runs under `update()`. An update waits for
    the segment in flight to end (an interruptible one ends after its next token, see `update_waiting`), and
    no new segment starts while an update waits, so every segment sees exactly one version of the weights.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting = threading.Event()
        self._updates = threading.Lock()  # one update at a time

    @property
    def update_waiting(self) -> bool:
        return self._waiting.is_set()

    @contextmanager
    def segment(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._waiting.is_set())
            yield

    @contextmanager
    def update(self) -> Iterator[None]:
        with self._updates:
            self._waiting.set()  # before taking the lock: it is what makes the segment in flight stop early
            with self._cond:
                try:
                    yield
                finally:
                    self._waiting.clear()
                    self._cond.notify_all()


class StopForUpdate(StoppingCriteria):
    """Ends every row of a `generate` call once a weight update waits (checked after each sampled token)."""

    def __init__(self, gate: WeightGate) -> None:
        self.gate = gate

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.gate.update_waiting, dtype=torch.bool,
                          device=input_ids.device)


@dataclass
class _Row:
    prompt: int  # index into the prompts
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    stopped: bool = False  # emitted a stop token


def _with_prefix(prompt: PromptInputs, tokens: list[int]) -> PromptInputs:
    """The prompt followed by a row's tokens so far, with the prompt's own image."""
    ids = torch.cat([prompt.input_ids, torch.as_tensor(tokens, dtype=prompt.input_ids.dtype)])
    return PromptInputs(input_ids=ids, image=prompt.image, image_grid_thw=prompt.image_grid_thw)


def continuation_inputs(prompts: Sequence[PromptInputs], rows: Sequence[tuple[int, list[int]]],
                        pad_token_id: int, image_token_id: int, image_processor=None) -> dict:
    """Generation inputs for rows given as (prompt index, tokens so far): left-padded prompt + prefix, each
    row with its own image's patches (concatenated in row order) and grid, image tokens typed in
    `mm_token_type_ids`."""
    prefixed = [_with_prefix(prompts[p], tokens) for p, tokens in rows]
    return left_pad_prompts(prefixed, pad_token_id, image_token_id, image_processor)


@torch.no_grad()
def sample_in_segments(model, tokenizer, prompts: Sequence[PromptInputs], cfg: SamplingConfig,
                       gate: WeightGate, version: Callable[[], int],
                       seed: int | None = None, image_processor=None) -> list[list[Completion]]:
    """Like `sample_completions`, but interrupted by (and continued after) weight updates through `gate`;
    `version()` names the weights a segment samples with. Without an update it is one segment, token for
    token what `sample_completions` gives for the same seed."""
    n = 1 if cfg.greedy else cfg.n
    pad = model.generation_config.pad_token_id
    image = model.config.image_token_id
    eos_ids = eos_token_ids(model)
    stop_for_update = StoppingCriteriaList([StopForUpdate(gate)])
    rows = [_Row(i // n) for i in range(len(prompts) * n)]  # generate repeats each prompt n times, in place
    live = rows
    first = True
    while live:
        with gate.segment():
            v = version()
            if first:
                if seed is not None:
                    torch.manual_seed(seed)
                inputs = left_pad_prompts(prompts, pad, image, image_processor)
                expand = n
            else:  # finished rows are dropped; every live row has the same number of tokens so far
                inputs = continuation_inputs(prompts, [(r.prompt, r.tokens) for r in live], pad, image,
                                             image_processor)
                expand = 1
            budget = cfg.max_new_tokens - len(live[0].tokens)
            ids, logprobs = generate_segment(model, inputs, cfg, expand, budget, stop_for_update)
        for r, row_ids, row_lp in zip(live, ids, logprobs):
            stop = stop_index(row_ids, eos_ids)
            keep = len(row_ids) if stop is None else stop + 1
            r.tokens += row_ids[:keep]
            r.logprobs += row_lp[:keep].tolist()
            r.versions += [v] * keep
            r.stopped = stop is not None
        live = [r for r in live if not r.stopped and len(r.tokens) < cfg.max_new_tokens]
        first = False
    completions = [Completion(token_ids=r.tokens, logprobs=r.logprobs, versions=r.versions,
                              text=tokenizer.decode(r.tokens, skip_special_tokens=True),
                              finish_reason="stop" if r.stopped else "length") for r in rows]
    return [completions[i * n:(i + 1) * n] for i in range(len(prompts))]
