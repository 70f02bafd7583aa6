"""What actors hand back to the driver: a rollout call's summary, a learner rank's step, a greedy eval answer,
and a weight update's transfer stats. Plain dataclasses (no tensors), so Ray ships them cheaply and the driver
builds every metric from typed fields (cluster/step_metrics.py)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DatasetRewards:
    """One data set's rewards within a rollout call: totals and each reward component, one per completion."""

    rewards: list[float] = field(default_factory=list)
    components: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class RolloutSummary:
    """What `RolloutWorker.rollout` returns: the groups themselves went to the Redis stream."""

    published: list[int] = field(default_factory=list)  # draws whose groups are in the stream
    filtered: list[int] = field(default_factory=list)  # draws dropped by dynamic sampling (all rewards equal)
    lengths: list[int] = field(default_factory=list)  # completion lengths in tokens
    truncated: int = 0  # completions cut at sampling.max_new_tokens
    version_spans: list[int] = field(default_factory=list)  # per group: newest - oldest version
    datasets: dict[str, DatasetRewards] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # busy time per stage: generate, reward, publish
    policy_version: int = 0
    # images unreadable when the worker encoded them (past the start-up scan), skipped as data.skip_bad_images
    # allows: their draws are also in `filtered` (settled, no group); one message (file, data set) each
    bad_images: list[str] = field(default_factory=list)


@dataclass
class LearnerStep:
    """What one learner rank's GRPO step returns (`LearnerActor.train`)."""

    stats: dict[str, float]  # loss terms, clip fractions, KL, entropy, grad_norm, lr (micro-batch means)
    draws: list[int]  # the draws trained on
    prompt_ids: list[str]
    staleness: list[int]  # per trained group: policy versions between its oldest token and the learner
    stale_draws: list[int]  # draws dropped as too stale (acked away, replaced by the scheduler)
    duplicates: int  # groups dropped because their draw was already trained on (a re-issued request)
    equal_rewards: float  # share of trained groups whose G rewards are all equal (no learning signal)
    take_seconds: float  # waiting for the stream
    step_seconds: float  # forward, backward, optimizer
    buffer: dict[str, float] = field(default_factory=dict)  # stream gauges: depth, pending, lost, corrupt
    one_answer: float = 0.0  # share of trained groups whose G completions give one answer
    one_wrong_answer: float = 0.0  # ... and that answer is wrong (telemetry/collapse.py)


@dataclass
class SFTStep:
    """What one learner rank's supervised step returns (`LearnerActor.sft_train`)."""

    stats: dict[str, float]  # sft_loss, grad_norm, lr
    step_seconds: float


@dataclass
class EvalAnswer:
    """One greedy answer to a held-out prompt, scored by its data set's correctness reward."""

    dataset: str
    prompt_id: str
    text: str
    solution: object
    correct: float  # 1.0 or 0.0
    tokens: int
    truncated: bool


@dataclass
class WeightUpdate:
    """One weight update as the learners' rank 0 (broadcast) or the colocated share saw it."""

    version: int
    bytes: int
    tensors: int
    seconds: float  # the whole update
    mb_per_s: float  # over the transfer itself (a broadcast's wait for engines to enter receive() excluded)
