"""Seconds per named stage, instead of hand-kept t0/t1/t2: `with timer("generate"): ...` adds to the stage."""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class StageTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def row(self, prefix: str = "time/") -> dict[str, float]:
        return {f"{prefix}{stage}": s for stage, s in self.seconds.items()}
