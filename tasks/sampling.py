"""Seeded, reproducible few-shot sampling and base-to-new class splits."""
from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence

from tasks.manifest import DatasetError, Sample


def k_shot(
    samples: Sequence[Sample], k: int, seed: int, classnames: Sequence[str] | None = None
) -> list[Sample]:
    """k samples per class, the same ones for the same seed whatever the input order.

    A class with fewer than k samples is an error naming it: silently training on fewer shots would
    make a k-shot result incomparable.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    by_class: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_class[s.label].append(s)
    chosen: list[Sample] = []
    for label in classnames or sorted(by_class):
        pool = sorted(by_class.get(label, []), key=lambda s: s.id)
        if len(pool) < k:
            raise DatasetError(f"class {label!r} has {len(pool)} samples, fewer than k={k}")
        # one RNG per class, so adding a class does not change the others' shots
        chosen += random.Random(f"{seed}:{label}").sample(pool, k)
    return chosen


def base_new_split(classnames: Sequence[str], seed: int | None = None) -> tuple[list[str], list[str]]:
    """Base-to-new protocol: the first ceil(n/2) classes are base, the rest new (CoOp's rule).

    With a seed, the class order is shuffled first (reproducibly) for studies beyond CoOp's fixed split.
    """
    names = list(classnames)
    if len(names) < 2:
        raise DatasetError(f"base-to-new needs at least 2 classes, got {names}")
    if seed is not None:
        random.Random(seed).shuffle(names)
    cut = math.ceil(len(names) / 2)
    return names[:cut], names[cut:]


def subset_classes(samples: Sequence[Sample], classnames: Sequence[str]) -> list[Sample]:
    keep = set(classnames)
    return [s for s in samples if s.label in keep]
