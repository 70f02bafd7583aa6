"""A weighted sum of registered rewards, built from config.

    CompositeReward.from_config([
        {"name": "format", "weight": 1.0},
        {"name": "cls_accuracy"},
        {"name": "rec_iou", "params": {"threshold": 0.5}},
    ])

Calling it returns ``(totals, components)``: the weighted sum per completion, and each
reward's unweighted values keyed by reward name (for logging).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from protocol.components import RewardTerm

from .registry import BoundReward, get_reward, is_real

_TERM_KEYS = ("name", "weight", "params")


class CompositeReward:
    """Weighted sum of rewards. Each reward name may appear once (components are keyed by name)."""

    def __init__(self, terms: Sequence[RewardTerm]):
        if not terms:
            raise ValueError("CompositeReward needs at least one RewardTerm")
        self.terms: list[RewardTerm] = list(terms)
        self._bound: list[tuple[str, float, BoundReward]] = []
        for k, t in enumerate(self.terms):
            if not isinstance(t, RewardTerm):
                raise TypeError(f"reward term {k}: expected RewardTerm, got {type(t).__name__}")
            if not is_real(t.weight):
                raise ValueError(
                    f"reward term {k} ({t.name!r}): weight must be a finite number, got {t.weight!r}"
                )
            if not isinstance(t.params, Mapping):
                raise ValueError(f"reward term {k} ({t.name!r}): params must be a dict, got {t.params!r}")
            if any(name == t.name for name, _, _ in self._bound):
                raise ValueError(
                    f"reward term {k}: {t.name!r} appears twice; components are keyed by reward name"
                )
            # Resolve now so that a bad name or param fails at config time, not mid-training.
            self._bound.append((t.name, float(t.weight), get_reward(t.name, **t.params)))

    @classmethod
    def from_config(cls, config: Sequence[Mapping[str, Any]]) -> CompositeReward:
        """Build from a list of ``{"name": ..., "weight": ..., "params": {...}}`` dicts."""
        if isinstance(config, (str, bytes, Mapping)) or not isinstance(config, Sequence):
            raise ValueError(f"reward config must be a list of dicts, got {type(config).__name__}")
        terms: list[RewardTerm] = []
        for k, entry in enumerate(config):
            if not isinstance(entry, Mapping):
                raise ValueError(f"reward term {k}: expected a dict, got {entry!r}")
            for key in entry:
                if key not in _TERM_KEYS:
                    hint = difflib.get_close_matches(str(key), _TERM_KEYS, n=1)
                    did = f" (did you mean {hint[0]!r}?)" if hint else ""
                    raise ValueError(
                        f"reward term {k}: unknown key {key!r}{did}; accepted keys: {', '.join(_TERM_KEYS)}"
                    )
            if "name" not in entry:
                raise ValueError(f"reward term {k}: missing required key 'name'")
            terms.append(
                RewardTerm(
                    name=entry["name"],
                    weight=entry.get("weight", 1.0),
                    params=dict(entry.get("params") or {}),
                )
            )
        return cls(terms)

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self._bound]

    def __call__(
        self, completions: Sequence[str], solutions: Sequence[Any] | None = None, **info: Any
    ) -> tuple[list[float], dict[str, list[float]]]:
        components: dict[str, list[float]] = {}
        totals = [0.0] * len(completions)
        for name, weight, fn in self._bound:
            values = fn(completions, solutions, **info)
            components[name] = values
            totals = [t + weight * v for t, v in zip(totals, values, strict=True)]
        return totals, components

    def __repr__(self) -> str:
        inner = ", ".join(f"{w:g}*{fn!r}" for _, w, fn in self._bound)
        return f"CompositeReward({inner})"
