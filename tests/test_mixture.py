"""MixtureOrder: weighted per-step split across data sets, each on its own EpochOrder, resumable from its state."""
from __future__ import annotations

import json
import logging
import math

import pytest

from tasks.mixture import MixtureOrder, dataset_seed
from tasks.order import EpochOrder

SIZES = {"flowers": 37, "cars": 11, "pets": 5}
WEIGHTS = {"flowers": 0.5, "cars": 0.3, "pets": 0.2}
# (weights, k): uneven weights, k below the number of data sets, exact integer quotas, near-0 and near-1 fractions
CONFIGS = [
    (WEIGHTS, 8),
    (WEIGHTS, 10),
    ({"a": 1.0, "b": 1.0, "c": 1.0}, 1),
    ({"a": 1.0, "b": 1.0, "c": 1.0}, 2),
    ({"a": 0.01, "b": 0.99}, 7),
    ({"a": 3.0, "b": 2.0, "c": math.pi, "d": 0.1, "e": 7.5}, 13),
]


def ids_for(sizes: dict[str, int]) -> dict[str, list[str]]:
    return {name: [f"{name}/{i}" for i in range(n)] for name, n in sizes.items()}


def mixture(weights=WEIGHTS, seed=3, sizes=None) -> MixtureOrder:
    """SIZES for the default weights, else 6 ids per data set unless `sizes` says otherwise."""
    if sizes is None:
        sizes = SIZES if weights is WEIGHTS else dict.fromkeys(weights, 6)
    return MixtureOrder(ids_for(sizes), weights, seed)


def quotas(weights: dict[str, float], k: int) -> dict[str, float]:
    total = sum(weights.values())
    return {name: k * w / total for name, w in weights.items()}


@pytest.mark.parametrize("weights, k", CONFIGS)
def test_counts_sum_to_k_and_stay_within_one_of_quota_each_step(weights, k):
    m, q = mixture(weights), quotas(weights, k)
    seen = set()
    for step in range(500):
        c = m.counts(k, step)
        assert list(c) == list(weights) and sum(c.values()) == k
        assert all(abs(c[n] - q[n]) < 1 and c[n] in (math.floor(q[n]), math.ceil(q[n])) for n in weights), (step, c)
        seen.add(tuple(c.values()))
    # the remainder seats really move between data sets (a fixed tie-break would give one pattern forever)
    assert len(seen) > 1 or all(float(v).is_integer() for v in q.values())


def test_integer_quotas_are_exact_and_k_zero_is_empty():
    m = mixture({"a": 1.0, "b": 3.0})
    assert all(m.counts(8, s) == {"a": 2, "b": 6} for s in range(50))
    assert m.counts(0, 5) == {"a": 0, "b": 0} and m.take(0, 5) == []


@pytest.mark.parametrize("weights, k", CONFIGS)
def test_running_totals_stay_close_to_weights_over_1000_steps(weights, k):
    """Every prefix of 1000 steps is within 3.7 prompts of steps * quota (independent draws would drift ~16)."""
    m, q = mixture(weights, seed=11), quotas(weights, k)
    totals = dict.fromkeys(weights, 0)
    worst = 0.0
    for step in range(1000):
        for name, n in m.counts(k, step).items():
            totals[name] += n
            worst = max(worst, abs(totals[name] - (step + 1) * q[name]))
    assert worst < 3.7, worst
    # the same holds for any window, e.g. steps 5000..5999 as seen after a resume
    totals = dict.fromkeys(weights, 0)
    for step in range(5000, 6000):
        for name, n in m.counts(k, step).items():
            totals[name] += n
    assert all(abs(totals[name] - 1000 * q[name]) < 3.7 for name in weights), totals


def test_counts_unbiased_over_seeds():
    """For a fixed step, the seed's draw gives each data set its exact quota in expectation."""
    weights, k, seeds = {"a": 1.0, "b": 1.0, "c": 1.0}, 1, 3000
    hits = dict.fromkeys(weights, 0)
    for seed in range(seeds):
        for name, n in MixtureOrder(ids_for({"a": 1, "b": 1, "c": 1}), weights, seed).counts(k, 17).items():
            hits[name] += n
    # binomial(3000, 1/3): sd ~ 26
    assert all(abs(h - seeds / 3) < 110 for h in hits.values()), hits


def test_counts_pure_in_seed_and_step():
    a, b = mixture(seed=5), mixture(seed=5)
    a.take(200, 0)  # consuming data does not change the split
    assert [a.counts(9, s) for s in range(300)] == [b.counts(9, s) for s in reversed(range(300))][::-1]
    assert [a.counts(9, s) for s in range(300)] != [mixture(seed=6).counts(9, s) for s in range(300)]
    # weights given in another dict order split the same way
    shuffled = MixtureOrder(ids_for(SIZES), dict(reversed(list(WEIGHTS.items()))), 5)
    assert all(shuffled.counts(9, s) == a.counts(9, s) for s in range(300))


def test_take_groups_by_dataset_in_given_order():
    order = {"pets": 5, "flowers": 37, "cars": 11}
    m = MixtureOrder(ids_for(order), WEIGHTS, 0)
    for step in range(50):
        batch = m.take(10, step)
        names = [name for name, _ in batch]
        assert len(batch) == 10 and names == sorted(names, key=list(order).index)
        assert all(i.startswith(f"{name}/") for name, i in batch)


def test_every_dataset_walks_whole_epochs_without_repeats_or_skips():
    m = mixture()
    stream: dict[str, list[str]] = {name: [] for name in SIZES}
    for step in range(400):
        for name, i in m.take(8, step):
            stream[name].append(i)
    ids = ids_for(SIZES)
    for name, got in stream.items():
        n = SIZES[name]
        assert len(got) >= 10 * n  # many epochs of every data set
        full, rest = divmod(len(got), n)
        epochs = [got[e * n:(e + 1) * n] for e in range(full)]
        assert all(sorted(e) == sorted(ids[name]) for e in epochs), name
        assert len(set(got[full * n:])) == rest and set(got[full * n:]) <= set(ids[name])
        assert len({tuple(e) for e in epochs}) > 1  # reshuffled per epoch
        assert m.epochs()[name] == pytest.approx(len(got) / n)


def test_datasets_get_different_orders():
    m = MixtureOrder({"x": [f"x/{i}" for i in range(20)], "y": [f"y/{i}" for i in range(20)]}, {"x": 1, "y": 1}, 0)
    xs = [i.split("/")[1] for i in m.orders["x"].take(20)]
    ys = [i.split("/")[1] for i in m.orders["y"].take(20)]
    assert xs != ys


def test_single_dataset_is_epoch_order():
    ids = [f"s/{i}" for i in range(13)]
    m, ref = MixtureOrder({"s": ids}, {"s": 2.5}, 7), EpochOrder(ids, dataset_seed(7, "s"))
    for step, k in enumerate([4, 5, 13, 1, 20, 7, 9]):
        assert m.counts(k, step) == {"s": k}
        assert m.take(k, step) == [("s", i) for i in ref.take(k)]
    assert m.state_dict() == {"datasets": {"s": ref.state_dict()}, "seed": 7, "calls": 0}


@pytest.mark.parametrize("n_first", [0, 1, 37, 123])
def test_resume_matches_uninterrupted_run(n_first):
    k, n_more = 9, 150
    run = mixture(seed=21)
    for step in range(n_first):
        run.take(k, step)
    state = json.loads(json.dumps(run.state_dict()))  # checkpoints store it as JSON
    continued = [run.take(k, step) for step in range(n_first, n_first + n_more)]
    resumed = mixture(seed=21)
    resumed.load_state_dict(state)
    assert resumed.epochs() == pytest.approx(mixture_epochs_after(n_first, k))
    assert [resumed.take(k, step) for step in range(n_first, n_first + n_more)] == continued
    assert resumed.state_dict() == run.state_dict()


def mixture_epochs_after(steps: int, k: int) -> dict[str, float]:
    m = mixture(seed=21)
    for step in range(steps):
        m.take(k, step)
    return m.epochs()


def test_epochs_are_fractional():
    m = mixture({"a": 1.0, "b": 1.0}, sizes={"a": 4, "b": 10})
    m.take(6, 0)
    assert m.epochs() == {"a": 0.75, "b": 0.3}
    m.take(6, 1)
    assert m.epochs() == {"a": 1.5, "b": 0.6}


@pytest.mark.parametrize("weight", [0, -1.0, float("nan"), float("inf"), "heavy", None])
def test_bad_weight_names_dataset(weight):
    with pytest.raises(ValueError, match="'cars'"):
        MixtureOrder(ids_for(SIZES), {**WEIGHTS, "cars": weight}, 0)


def test_construction_errors_name_datasets():
    with pytest.raises(ValueError, match="'pets' has no ids"):
        MixtureOrder({**ids_for(SIZES), "pets": []}, WEIGHTS, 0)
    with pytest.raises(ValueError, match="no weight for data set.*'pets'"):
        MixtureOrder(ids_for(SIZES), {"flowers": 1, "cars": 1}, 0)
    with pytest.raises(ValueError, match="unknown data set.*'birds'"):
        MixtureOrder(ids_for(SIZES), {**WEIGHTS, "birds": 1}, 0)
    with pytest.raises(ValueError, match="'cars' lists ids more than once: \\['cars/1'\\]"):
        MixtureOrder({**ids_for(SIZES), "cars": ["cars/0", "cars/1", "cars/1"]}, WEIGHTS, 0)
    with pytest.raises(ValueError, match="unique across data sets.*'7' in 'cars', 'flowers'"):
        MixtureOrder({"flowers": ["1", "7"], "cars": ["7", "8"]}, {"flowers": 1, "cars": 1}, 0)
    with pytest.raises(ValueError, match="at least one data set"):
        MixtureOrder({}, {}, 0)
    with pytest.raises(ValueError, match="k and step"):
        mixture().counts(-1, 0)


def test_load_state_errors_name_dataset_and_change_nothing():
    src = mixture(seed=4)
    for step in range(20):
        src.take(8, step)
    state = src.state_dict()
    m = mixture(seed=4)
    m.take(8, 0)
    before = m.state_dict()

    def bad(mutate, match):
        broken = json.loads(json.dumps(state))
        mutate(broken)
        with pytest.raises(ValueError, match=match):
            m.load_state_dict(broken)
        assert m.state_dict() == before  # all or nothing

    bad(lambda s: s["datasets"]["pets"].update(size=6), "'pets'.*6 ids")
    bad(lambda s: s["datasets"]["pets"].update(seed=1), "'pets'.*seed 1")
    bad(lambda s: s["datasets"]["pets"].update(position=5), "'pets'.*bad epoch/position")
    bad(lambda s: s["datasets"]["pets"].pop("epoch"), "'pets'.*malformed")
    bad(lambda s: s["datasets"].pop("cars"), "'cars' not in the checkpoint.*allow_new")
    bad(lambda s: s["datasets"].update(birds={"epoch": 0, "position": 0, "size": 3, "seed": 0}), "'birds'.*allow_removed")
    bad(lambda s: s.update(seed=5), "seed 5")
    bad(lambda s: s.pop("datasets"), "no 'datasets'")
    m.load_state_dict(state)
    assert m.state_dict() == state


def test_new_and_removed_datasets_when_allowed(caplog):
    old = MixtureOrder(ids_for({"flowers": 37, "cars": 11}), {"flowers": 1, "cars": 1}, 2)
    for step in range(10):
        old.take(8, step)
    m = mixture(seed=2)
    m.take(3, 0)  # pets moves off epoch 0 so the reset is visible
    with caplog.at_level(logging.WARNING, logger="tasks.mixture"):
        m.load_state_dict(old.state_dict(), allow_new=True)
    assert "'pets'" in caplog.text and "epoch 0" in caplog.text
    assert m.state_dict()["datasets"]["pets"]["position"] == 0 and m.epochs()["pets"] == 0
    assert {n: m.state_dict()["datasets"][n] for n in ("flowers", "cars")} == old.state_dict()["datasets"]

    back = MixtureOrder(ids_for({"flowers": 37, "cars": 11}), {"flowers": 1, "cars": 1}, 2)
    with pytest.raises(ValueError, match="'pets'"):
        back.load_state_dict(m.state_dict())
    back.load_state_dict(m.state_dict(), allow_removed=True)
    assert back.state_dict() == old.state_dict()


def test_next_batch_counts_calls_and_resumes_where_it_left_off():
    ids = {"a": [f"a{i}" for i in range(7)], "b": [f"b{i}" for i in range(5)]}
    first = MixtureOrder(ids, {"a": 2.0, "b": 1.0}, 3)
    batches = [first.next_batch(4) for _ in range(3)]
    assert first.calls == 3 and [len(b) for b in batches] == [4, 4, 4]
    assert batches[0] == [i for _, i in MixtureOrder(ids, {"a": 2.0, "b": 1.0}, 3).take(4, 0)]
    state = first.state_dict()
    ahead = [first.next_batch(4) for _ in range(5)]
    resumed = MixtureOrder(ids, {"a": 2.0, "b": 1.0}, 3)
    resumed.load_state_dict(state)
    assert [resumed.next_batch(4) for _ in range(5)] == ahead  # same seats, same epoch positions
