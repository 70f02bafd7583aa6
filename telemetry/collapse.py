"""Collapse seen, not guessed: a pure watcher fed each step's metrics row.

GRPO learns only from groups whose G rewards differ. Two ways a run stops learning while its loss looks fine:
- entropy collapse: the policy's token entropy falls near zero, so the G samples of a prompt are the same
  answer and every group's rewards are equal;
- no signal: for a stretch of steps most groups carry no gradient (all G rewards equal: `groups/equal_rewards`
  at the learners, or the share dynamic sampling filtered out before them, `groups/filtered`).
`CollapseWatch.observe(row)` adds 0/1 flags to the row (so metrics.jsonl records them) and logs one warning
line, with the likely causes and the settings that help, when a condition starts; it re-arms once the run
recovers. `clsrl report` replays the same watcher over metrics.jsonl (`replay`).
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from rewards.parsing import extract_answer

log = logging.getLogger(__name__)

ENTROPY_FLAG = "collapse/entropy"
NO_SIGNAL_FLAG = "collapse/no_signal"
HELP = ("likely causes: a learning rate too high for the data, symmetric clipping that lets the top answer "
        "take over, too few samples per prompt; settings that help: learner.lr lower (e.g. 3e-4), "
        "algorithm.clip_high 0.28 (clip-higher), algorithm.dynamic_sampling true, a larger sampling.n, "
        "algorithm.beta > 0 (KL to the start) - see docs/defaults.md")


def answer_key(text: str) -> str:
    """What counts as one answer: the graded part (rewards.parsing: the <answer> tag's content when there is
    one, else the whole text); case and surrounding white space ignored."""
    return extract_answer(text).strip().lower()


def group_answer_shares(groups: list[tuple[list[str], list[float]]]) -> dict[str, float]:
    """Per (completion texts, correctness per completion: 1 = correct) of each group: the share of groups
    whose G completions give one answer, and of those that are all wrong with that one repeated answer (the
    signature of a collapsed policy: the group has no gradient and nothing to sample its way out)."""
    if not groups:
        return {}
    one = [len({answer_key(t) for t in texts}) == 1 for texts, _ in groups]
    wrong = [o and max(correct) < 1 for o, (_, correct) in zip(one, groups)]
    return {"groups/one_answer": sum(one) / len(groups), "groups/one_wrong_answer": sum(wrong) / len(groups)}


def answer_diversity(texts: list[str], solutions: list[object]) -> float:
    """Distinct greedy answers over distinct solutions (classes) in one eval: 1 = as many answers as classes,
    1/classes = one answer for everything."""
    if not texts:
        raise ValueError("answer_diversity needs at least one answer")
    return len({answer_key(t) for t in texts}) / len({repr(s) for s in solutions})


def no_signal_share(row: dict) -> float | None:
    """Share of this step's groups without a gradient: those the learners got with all rewards equal, plus
    those dynamic sampling dropped before them (whichever is larger; each is a share of what it saw)."""
    keys = ("groups/equal_rewards", "groups/filtered")
    shares = [row[k] for k in keys if isinstance(row.get(k), float | int)]
    return max(shares) if shares else None


@dataclass
class CollapseWatch:
    """Flags entropy below `entropy_floor` for `window` consecutive steps that report entropy, and a share
    of groups without a gradient above `no_signal` for `window` consecutive steps."""

    window: int = 10  # steps (train.collapse_window)
    # a step whose mean reward is at least this has groups without a gradient because they are all right (the
    # policy solved its training prompts), not a collapse; rewards of 0-1 per completion assumed
    solved_reward: float = 0.9
    entropy_floor: float = 0.3
    no_signal: float = 0.8
    log_warnings: bool = True  # False: only collect them (a report replaying a finished run)
    warnings: list[str] = field(default_factory=list)  # every warning issued, in order
    _entropy: deque = field(default_factory=deque, repr=False)
    _signal: deque = field(default_factory=deque, repr=False)
    _active: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"CollapseWatch window must be >= 1 step, got {self.window}")
        self._entropy = deque(maxlen=self.window)
        self._signal = deque(maxlen=self.window)

    def observe(self, row: dict) -> dict:
        """Record this step's row; add the flags to it (in place) and return it."""
        step = row.get("step", "?")
        entropy = row.get("entropy")
        if isinstance(entropy, float | int):
            self._entropy.append(entropy)
            low = len(self._entropy) == self.window and max(self._entropy) < self.entropy_floor
            row[ENTROPY_FLAG] = float(low)
            self._transition(ENTROPY_FLAG, low, step,
                             f"entropy below {self.entropy_floor} for {self.window} steps "
                             f"(now {entropy:.3f}): "
                             "the policy answers the same way every time")
        share = no_signal_share(row)
        reward = row.get("reward/mean")
        if share is not None and isinstance(reward, float | int) and reward >= self.solved_reward:
            share = 0.0  # all-right groups: learned, not stuck
        if share is not None:
            self._signal.append(share)
            dead = len(self._signal) == self.window and min(self._signal) > self.no_signal
            row[NO_SIGNAL_FLAG] = float(dead)
            extra = row.get("groups/one_wrong_answer")
            tail = f"; {extra:.0%} all wrong with one repeated answer" if isinstance(extra, float) else ""
            self._transition(NO_SIGNAL_FLAG, dead, step,
                             f"over {self.no_signal:.0%} of groups carried no gradient (all G rewards equal) "
                             f"for {self.window} steps (now {share:.0%}{tail})")
        return row

    def _transition(self, flag: str, on: bool, step: object, what: str) -> None:
        if on and not self._active.get(flag):
            message = f"step {step}: GRPO collapse - {what}. {HELP}"
            self.warnings.append(message)
            if self.log_warnings:
                log.warning("%s", message)
        self._active[flag] = on


def replay(rows: list[dict], **kwargs) -> list[str]:
    """The warnings a run's metrics rows give (what `clsrl report` shows), without logging them."""
    watch = CollapseWatch(log_warnings=False, **kwargs)
    for row in rows:
        watch.observe(dict(row))
    return watch.warnings
