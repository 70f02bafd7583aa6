"""Admission and freshness rules of the asynchronous rollout."""
from __future__ import annotations

import pytest

from cluster.staleness import StalenessManager


def test_zero_staleness_is_the_synchronous_loop():
    s = StalenessManager(groups_per_step=4, max_staleness=0)
    assert s.capacity(0) == 4
    s.start(4)
    assert s.capacity(0) == 0  # the next batch waits for version 1
    assert s.capacity(1) == 4
    assert s.is_fresh(3, 3) and not s.is_fresh(2, 3)


def test_staleness_bound_lets_rollout_run_ahead_by_that_many_steps():
    s = StalenessManager(groups_per_step=8, max_staleness=2)
    assert s.capacity(0) == 24
    s.start(24)
    assert s.capacity(0) == 0 and s.capacity(1) == 8
    s.release(3)  # three dropped groups are replaced
    assert s.capacity(0) == 3
    assert s.is_fresh(1, 3) and not s.is_fresh(0, 3)


def test_rejects_bad_settings():
    with pytest.raises(ValueError):
        StalenessManager(0, 1)
    with pytest.raises(ValueError):
        StalenessManager(4, -1)
