"""A learner rank that dies in any call the learners make together is named as a death, not as the survivors'
collective error (cluster/learner_deaths.py), on real Ray actors."""
from __future__ import annotations

import os
import time

import pytest

from cluster.learner_deaths import check_learners_alive, learner_results


def _ranks(ray):
    @ray.remote(max_restarts=0)
    class Rank:
        def __init__(self, rank: int) -> None:
            self.rank = rank

        def save(self) -> int:
            if self.rank == 1:
                time.sleep(1.0)  # the survivor's error comes first, as a peer's reset does in a collective
                os._exit(1)
            raise RuntimeError("Connection reset by peer")

        def fine(self) -> int:
            return self.rank

    return [Rank.remote(r) for r in range(2)]


def test_a_rank_dying_during_a_save_is_named_even_when_the_survivor_fails_first(ray_local, tmp_path):
    ranks = _ranks(ray_local)
    with pytest.raises(RuntimeError) as err:
        learner_results([r.save.remote() for r in ranks], "the checkpoint save", tmp_path)
    msg = str(err.value)
    assert msg.startswith("learner rank 1 died during the checkpoint save ("), msg
    assert f"no checkpoint was finished yet under {tmp_path}" in msg
    # later, a broadcast that failed through other actors: the dead rank is found by probing
    with pytest.raises(RuntimeError, match="learner rank 1 died during the weight broadcast"):
        check_learners_alive(ranks, "the weight broadcast", tmp_path)


def test_a_plain_error_on_every_rank_is_raised_as_it_is(ray_local, tmp_path):
    ranks = _ranks(ray_local)
    with pytest.raises(ray_local.exceptions.RayTaskError, match="Connection reset by peer"):
        learner_results([ranks[0].save.remote(), ranks[0].save.remote()], "the checkpoint save", tmp_path)
    assert learner_results([r.fine.remote() for r in ranks], "the optimizer step", tmp_path) == [0, 1]
    check_learners_alive(ranks, "the weight broadcast", tmp_path, timeout_s=10)  # all alive: returns
