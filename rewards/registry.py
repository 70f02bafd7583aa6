"""Name -> reward registry.

A reward is one *batch* function registered under a name:

    @register("rec_iou", check=_check)
    def rec_iou(completions, solutions, info, *, threshold=None) -> list[float]: ...

Its keyword-only arguments are its params (with their defaults); ``info`` is the
mapping of extra per-batch data (e.g. ``completion_lengths``). ``get_reward(name,
**params)`` validates the params once and returns a ``BoundReward`` whose call
signature is the public one: ``fn(completions, solutions, **info) -> list[float]``.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

BatchFn = Callable[..., list[float]]
ParamCheck = Callable[[Mapping[str, Any]], None]


class UnknownRewardError(ValueError):
    """Raised for a reward name that is not registered (the message lists the names)."""


class RewardParamError(ValueError):
    """Raised for an unknown or invalid reward parameter."""


@dataclass(frozen=True)
class RewardSpec:
    name: str
    fn: BatchFn
    defaults: Mapping[str, Any]  # accepted params and their defaults
    uses_solutions: bool
    value_range: tuple[float, float]
    check: ParamCheck | None
    doc: str


_REGISTRY: dict[str, RewardSpec] = {}


def register(
    name: str,
    *,
    uses_solutions: bool = True,
    value_range: tuple[float, float] = (0.0, 1.0),
    check: ParamCheck | None = None,
) -> Callable[[BatchFn], BatchFn]:
    """Decorator: register ``fn(completions, solutions, info, *, **params)`` under ``name``."""

    def deco(fn: BatchFn) -> BatchFn:
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is already registered")
        sig = inspect.signature(fn)
        defaults: dict[str, Any] = {}
        for p in sig.parameters.values():
            if p.kind is inspect.Parameter.KEYWORD_ONLY:
                if p.default is inspect.Parameter.empty:
                    raise TypeError(f"reward {name!r}: param {p.name!r} needs a default")
                defaults[p.name] = p.default
        _REGISTRY[name] = RewardSpec(
            name=name,
            fn=fn,
            defaults=defaults,
            uses_solutions=uses_solutions,
            value_range=value_range,
            check=check,
            doc=inspect.getdoc(fn) or "",
        )
        return fn

    return deco


def available() -> list[str]:
    """Sorted names of all registered rewards."""
    return sorted(_REGISTRY)


def _did_you_mean(name: str, options: Iterable[str]) -> str:
    hint = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {hint[0]!r}?)" if hint else ""


def get_spec(name: str) -> RewardSpec:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        did = _did_you_mean(str(name), _REGISTRY)
        available_names = ", ".join(available())
        raise UnknownRewardError(f"unknown reward {name!r}{did}; available: {available_names}") from None


class BoundReward:
    """A registered reward with its params fixed; call it on a batch."""

    def __init__(self, spec: RewardSpec, params: Mapping[str, Any]):
        self.spec = spec
        self.name = spec.name
        self.__name__ = spec.name  # trainers (e.g. TRL) log reward functions by __name__
        self.params: dict[str, Any] = {**spec.defaults, **params}
        self.value_range = spec.value_range

    def __call__(
        self, completions: Sequence[str], solutions: Sequence[Any] | None = None, **info: Any
    ) -> list[float]:
        # Wrong batch *shapes* are programming errors: fail loudly. Wrong *text* never raises.
        if isinstance(completions, (str, bytes)) or not isinstance(completions, Sequence):
            raise TypeError(
                f"reward {self.name!r}: completions must be a list of str, got {type(completions).__name__}"
            )
        for i, c in enumerate(completions):
            if not isinstance(c, str):
                raise TypeError(f"reward {self.name!r}: completions[{i}] is {type(c).__name__}, expected str")
        if self.spec.uses_solutions:
            if solutions is None or len(solutions) != len(completions):
                got = "None" if solutions is None else str(len(solutions))
                raise ValueError(
                    f"reward {self.name!r}: need one solution per completion "
                    f"({len(completions)} completions, {got} solutions)"
                )
        return self.spec.fn(completions, solutions, info, **self.params)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"<reward {self.name}({args})>"


def get_reward(name: str, **params: Any) -> BoundReward:
    """Return the reward ``name`` with ``params`` bound.

    Raises UnknownRewardError (a ValueError) for an unknown name, listing the
    available ones, and RewardParamError (a ValueError) for an unknown or invalid
    param, naming it and the accepted ones.
    """
    spec = get_spec(name)
    for key in params:
        if key not in spec.defaults:
            accepted = ", ".join(spec.defaults) or "none"
            did = _did_you_mean(key, spec.defaults)
            raise RewardParamError(
                f"reward {name!r} got unknown param {key!r}{did}; accepted params: {accepted}"
            )
    merged = {**spec.defaults, **params}
    if spec.check is not None:
        spec.check(merged)
    return BoundReward(spec, params)


# Shared param validators -------------------------------------------------------------


def is_real(x: Any) -> bool:
    """A finite int/float (bools are rejected: `True` as a threshold is a config typo)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))


def require_unit_interval(reward: str, param: str, value: Any) -> None:
    if not is_real(value) or not 0.0 <= float(value) <= 1.0:
        raise RewardParamError(
            f"reward {reward!r}: param {param!r} must be a number in [0, 1], got {value!r}"
        )
