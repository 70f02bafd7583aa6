"""The scheduler's exactly-once bookkeeping (cluster/draws.py), in one process without Ray."""
from __future__ import annotations

import pytest

from cluster.draws import MAX_FILTERED_IN_A_ROW, DrawLedger
from cluster.staleness import StalenessManager
from protocol.results import RolloutSummary
from tasks.mixture import MixtureOrder

IDS = [f"p{i}" for i in range(10)]


def _ledger(max_staleness: int = 0, workers: int = 2, chunk: int = 2, per_step: int = 4, **kw) -> DrawLedger:
    order = MixtureOrder({"toy": IDS}, {"toy": 1.0}, seed=0)
    return DrawLedger(order, StalenessManager(per_step, max_staleness), chunk, workers, **kw)


def _done(draws, filtered=()) -> RolloutSummary:
    return RolloutSummary(published=[d for d, _ in draws if d not in filtered], filtered=list(filtered))


def test_assign_gives_each_idle_worker_one_chunk_within_the_staleness_budget():
    ledger = _ledger()
    first = ledger.assign(version=0)
    assert [w for w, _ in first] == [0, 1]
    assert [d for _, draws in first for d, _ in draws] == [0, 1, 2, 3]  # draws number the prompts issued
    assert ledger.assign(version=0) == []  # both busy, and the budget of version 0 is spent
    ledger.completed(0, _done(first[0][1]))
    assert ledger.assign(version=0) == []  # idle, but synchronous: the next chunk waits for version 1
    assert [w for w, _ in ledger.assign(version=1)] == [0]


def test_rollout_runs_ahead_by_max_staleness_versions():
    ledger = _ledger(max_staleness=1, workers=4)
    assert sum(len(d) for _, d in ledger.assign(version=0)) == 8  # (0 + 1 + 1) steps x 4 groups


def test_a_dead_workers_chunk_is_issued_again_first_and_the_worker_waits_for_revive():
    ledger = _ledger(workers=2, per_step=4)
    chunks = dict(ledger.assign(version=0))
    lost = ledger.died(1)
    assert lost == chunks[1]
    assert set(ledger.outstanding) == {d for d, _ in chunks[0]}
    ledger.completed(0, _done(chunks[0]))
    again = ledger.assign(version=0)
    assert again == [(0, lost)]  # the lost draws, same numbers, to a live worker; worker 1 is dead
    ledger.completed(0, _done(lost))
    assert ledger.revive() == [1]
    assert [w for w, _ in ledger.assign(version=1)] == [0, 1]


def test_settle_twice_or_unknown_draw_stops_the_run():
    ledger = _ledger()
    (_, draws), _ = ledger.assign(version=0)
    ledger.settle([draws[0][0]])
    with pytest.raises(RuntimeError, match="twice"):
        ledger.settle([draws[0][0]])
    with pytest.raises(RuntimeError, match="never issued"):
        ledger.settle([999])


def test_filtered_groups_are_settled_and_their_slots_reused():
    ledger = _ledger(workers=1, chunk=4, per_step=4)
    ((_, draws),) = ledger.assign(version=0)
    ledger.completed(0, _done(draws, filtered=[draws[0][0], draws[1][0]]))
    assert set(ledger.outstanding) == {draws[2][0], draws[3][0]}
    ((_, more),) = ledger.assign(version=0)  # two slots came back within version 0's budget
    assert [d for d, _ in more] == [4, 5]


def test_dynamic_sampling_that_never_finds_signal_stops_with_a_reason():
    ledger = _ledger(workers=1, chunk=4, per_step=4)
    with pytest.raises(RuntimeError, match="dynamic sampling dropped"):
        for _ in range(MAX_FILTERED_IN_A_ROW // 4 + 2):
            ((_, draws),) = ledger.assign(version=0)
            ledger.completed(0, _done(draws, filtered=[d for d, _ in draws]))


def test_state_dict_reissues_whatever_was_not_trained_and_forget_below_tracks_the_oldest():
    ledger = _ledger(workers=2)
    chunks = dict(ledger.assign(version=0))
    ledger.completed(0, _done(chunks[0]))
    ledger.settle([d for d, _ in chunks[0]])
    assert ledger.forget_below() == chunks[1][0][0]
    state = ledger.state_dict()
    assert state["next_draw"] == 4 and [tuple(x) for x in state["reissue"]] == chunks[1]
    resumed = _ledger(workers=2, next_draw=state["next_draw"], reissue=[tuple(x) for x in state["reissue"]])
    assert dict(resumed.assign(version=0))[0] == chunks[1]  # the same draws and prompts go out again


def test_a_dead_workers_draws_trained_before_its_death_was_seen_are_not_issued_again():
    # the worker got its groups into the stream and the learners trained them, then its node died before
    # the call could return: only the draws still open go out again (a second copy would be trained twice
    # once the claim filter forgot the first)
    ledger = _ledger(workers=2, per_step=4)
    chunks = dict(ledger.assign(version=0))
    ledger.completed(0, _done(chunks[0]))
    trained, lost = chunks[1][0], chunks[1][1]
    ledger.settle([d for d, _ in chunks[0]] + [trained[0]])
    assert ledger.died(1) == [lost]
    started = ledger.staleness.started
    assert ledger.assign(version=0) == [(0, [lost])]  # its slot only: the trained draw kept its own
    assert ledger.staleness.started == started + 1 == 4
    ledger.settle([lost[0]])
    assert not ledger.outstanding and not ledger.reissue


def test_a_queued_draw_whose_first_copy_is_trained_after_all_is_not_issued_again():
    ledger = _ledger(workers=2, per_step=4)
    ledger.assign(version=0)
    lost = ledger.died(1)
    ledger.settle([lost[0][0]])  # the dead worker's copy reached the stream and was trained
    assert list(ledger.reissue) == lost[1:]
    assert ledger.staleness.started == 3  # 2 live + the trained one; the queued one gave its slot back
    with pytest.raises(RuntimeError, match="twice"):
        ledger.settle([lost[0][0]])


def test_forget_below_keeps_the_claims_of_draws_a_live_worker_still_holds_a_copy_of():
    ledger = _ledger(workers=2, per_step=4, max_staleness=1)
    chunks = dict(ledger.assign(version=0))  # 0: draws 0,1; 1: draws 2,3
    lost = ledger.died(0)
    ledger.completed(1, _done(chunks[1]))
    ledger.settle([2, 3])
    assert ledger.assign(version=0) == [(1, lost)]  # the copies go to worker 1
    ledger.settle([d for d, _ in lost])  # the dead worker's own copies arrived first and were trained
    assert not ledger.outstanding
    # worker 1's copies may still reach the stream: the learners must still know draws 0 and 1 were taken
    assert ledger.forget_below() == 0
    # dynamic sampling may drop a second copy at the source: not an error, no slot given back twice
    started = ledger.staleness.started
    ledger.completed(1, _done(lost, filtered=[d for d, _ in lost]))
    assert ledger.staleness.started == started
    assert ledger.forget_below() == ledger.next_draw
    with pytest.raises(RuntimeError, match="twice"):  # a draw never issued twice gets no such pass
        ledger.settle([2], copies_ok=True)
