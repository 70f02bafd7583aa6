"""The ``length`` reward: a length bonus squashed into (0, 1) by a sigmoid.

From "On the Suitability of Reinforcement Fine-Tuning to Visual Tasks" (normalized length
reward): r = 1 / (1 + exp(-alpha * (L - L0) / L0)), with L the completion length in
tokens. A raw per-token bonus was gamed with repetition; the sigmoid's diminishing
returns cap what extra length can earn.

L comes from ``info["completion_lengths"]`` (one int per completion, counted by the
rollout in tokens; text length in characters would be a different, tokenizer-free
quantity). A missing or misaligned key is a programming error and raises ValueError.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .registry import RewardParamError, is_real, register

LENGTHS_KEY = "completion_lengths"
# The paper fixes L0 but its value did not survive in our copy of the text. 512 tokens is
# half the 1024-token completion budget of the reference runs: r = 0.5 at L0, 0.27 for an
# empty answer and 0.73 at the 1024-token cap (alpha = 1).
DEFAULT_L0 = 512.0


def _check(params: Mapping[str, Any]) -> None:
    if not is_real(params["alpha"]):
        raise RewardParamError(
            f"reward 'length': param 'alpha' must be a finite number, got {params['alpha']!r}"
        )
    L0 = params["L0"]
    if not is_real(L0) or float(L0) <= 0:
        raise RewardParamError(f"reward 'length': param 'L0' must be a positive number of tokens, got {L0!r}")


def _sigmoid(z: float) -> float:
    # Branches keep exp() from overflowing for very long or very short completions.
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


@register("length", uses_solutions=False, check=_check)
def length(
    completions: Sequence[str],
    solutions: Any,
    info: Mapping[str, Any],
    *,
    alpha: float = 1.0,
    L0: float = DEFAULT_L0,
) -> list[float]:
    """Sigmoid length reward in [0, 1] from ``info["completion_lengths"]`` (tokens)."""
    lengths = info.get(LENGTHS_KEY)
    if lengths is None:
        raise ValueError(
            f"reward 'length' needs info[{LENGTHS_KEY!r}] (token count per completion); "
            f"got info keys {sorted(info)}"
        )
    sized = not isinstance(lengths, (str, bytes)) and hasattr(lengths, "__len__")
    if not sized or len(lengths) != len(completions):
        n = len(lengths) if hasattr(lengths, "__len__") else type(lengths).__name__
        raise ValueError(
            f"reward 'length': info[{LENGTHS_KEY!r}] must have one length per completion "
            f"({len(completions)} completions, got {n})"
        )
    a, l0 = float(alpha), float(L0)
    out: list[float] = []
    for i, L in enumerate(lengths):
        if not is_real(L) or L < 0:
            raise ValueError(
                f"reward 'length': info[{LENGTHS_KEY!r}][{i}] must be a token count >= 0, got {L!r}"
            )
        out.append(_sigmoid(a * (float(L) - l0) / l0))
    return out
