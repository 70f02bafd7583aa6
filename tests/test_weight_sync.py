"""Learner -> engine weight broadcast (weights.sender, weights.receiver): protocol tests in one process (threads)."""
from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.distributed as dist

from protocol.components import WeightSyncConfig
from tests.weight_sync_data import FAST, HOST, bits, make_weights, sent
from weights.group import Packer, WeightSyncError, check_header, connected, resolve_backend
from weights.receiver import WeightReceiver
from weights.sender import WeightSender


def run_threads(cfg, num_engines, send, version=1):
    """Sender in this thread, engines in threads of this process; returns (stats, {rank: (version, named)})."""
    sender = WeightSender(HOST, 0, num_engines, cfg, connect=False)
    got, errors = {}, {}

    def engine(rank):
        try:
            with WeightReceiver(HOST, sender.port, rank, num_engines, cfg, f"thread-engine-{rank}") as rx:
                got[rank] = rx.receive()
        except Exception as exc:  # noqa: BLE001
            errors[rank] = exc

    threads = [threading.Thread(target=engine, args=(r,)) for r in range(1, num_engines + 1)]
    for t in threads:
        t.start()
    try:
        sender.connect()
        stats = sender.broadcast(send, version)
    finally:
        for t in threads:
            t.join(timeout=30)
        sender.close()
    assert not errors, errors
    return stats, got


# ---- in-process ----

def test_config_and_backend_choice():
    assert resolve_backend("auto") == ("nccl" if torch.cuda.is_available() else "gloo")
    assert resolve_backend("gloo") == "gloo"
    with pytest.raises(ValueError, match="backend"):
        WeightSyncConfig(backend="mpi")
    with pytest.raises(ValueError, match="bucket_mb"):
        WeightSyncConfig(bucket_mb=0)
    assert WeightSyncConfig(bucket_mb=1).bucket_bytes == 2**20


def test_packer_groups_by_dtype_and_caps_buckets():
    cap = 4096
    p = Packer(cap, torch.device("cpu"))
    ready = []
    tensors = [("a", torch.ones(500)), ("b", torch.ones(500).bfloat16()), ("c", torch.ones(600)),  # c overflows a
               ("big", torch.ones(2000)), ("d", torch.ones(10, dtype=torch.int64))]
    for i, (n, t) in enumerate(tensors):
        ready += p.add(n, t, i)
    ready += p.flush()
    layout = [(str(b.dtype), [e[0] for e in b.entries], b.nbytes) for b in ready]
    assert layout == [("torch.float32", ["a"], 2000), ("torch.float32", ["big"], 8000),
                      ("torch.bfloat16", ["b"], 1000), ("torch.float32", ["c"], 2400), ("torch.int64", ["d"], 80)]
    assert [b.borrowed for b in ready] == [False, True, False, False, False]
    assert all(b.nbytes <= cap for b in ready if not b.borrowed)


def test_receiver_rejects_bad_headers():
    good = {"v": 3, "i": 0, "dtype": "float32", "nbytes": 24, "t": [["a", [2], 0, 2, 0], ["b", [2, 2], 2, 4, 1]]}
    assert check_header(good, 0, 3)[0] is torch.float32
    bad = [({"i": 1}, "out of order"), ({"v": 4}, "out of order"), ({"dtype": "float99"}, "unknown dtype"),
           ({"nbytes": 22}, "whole number"), ({"nbytes": 28}, "cover"),
           ({"t": [["a", [2], 0, 2, 0], ["b", [2, 2], 3, 4, 1]]}, "bad layout"),
           ({"t": [["a", [3], 0, 2, 0], ["b", [2, 2], 2, 4, 1]]}, "bad layout")]
    for patch, msg in bad:
        with pytest.raises(WeightSyncError, match=msg):
            check_header({**good, **patch}, 0, 3)


def test_threads_bit_exact_and_lazy():
    """Each tensor is copied before the next is pulled: mutating it afterwards (a ZeRO-3 release) changes nothing."""
    weights = make_weights(0)
    pulled = []

    def lazily():
        for n, t in sent(weights):
            pulled.append(n)
            yield n, t.clone()  # the clone is what the caller "gathered" ...
            # ... and after the sender asked for the next one, it is gone
        pulled.append(None)

    def zero3_like():
        for n, t in lazily():
            yield n, t
            t.fill_(0) if t.dtype != torch.bool else t.logical_not_()

    stats, got = run_threads(FAST, 2, zero3_like(), version=5)
    assert pulled[-1] is None
    expected = sent(weights)
    assert stats["tensors"] == len(expected) and stats["buckets"] >= 5
    assert stats["bytes"] == sum(t.numel() * t.element_size() for _, t in expected)
    for rank in (1, 2):
        version, named = got[rank]
        assert version == 5
        assert [n for n, _ in named] == [n for n, _ in expected]
        for (n, a), (_, b) in zip(expected, named):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b)), n
    assert not dist.is_initialized()  # the default group was never needed nor touched


def test_empty_broadcast_and_misfit_receiver():
    stats, got = run_threads(FAST, 1, [], version=9)
    assert got[1] == (9, []) and stats["buckets"] == 0
    with WeightSender(HOST, 0, 2, FAST, connect=False) as sender:
        with pytest.raises(WeightSyncError, match="expects world 4"):
            WeightReceiver(HOST, sender.port, 1, 3, FAST, "wrong-size")


class _LazyBackendStandIn:
    """Stands in for a GPU-only ProcessGroupNCCL whose peer was lost between joining and the first
    collective: constructing it returned at once, its first collective never completes."""

    def __init__(self) -> None:
        self.aborted = False

    def broadcast(self, tensor, root):
        return self

    def is_completed(self) -> bool:
        return False

    def abort(self) -> None:
        self.aborted = True


def test_forming_a_group_runs_one_collective_within_the_deadline_lazy_nccl_stand_in():
    # on NCCL the rendezvous happens in the first collective; formation must include it, within its deadline
    pg = _LazyBackendStandIn()
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        connected(pg, "gloo", timeout_s=0.5)
    assert 0.5 <= time.monotonic() - start < 5 and pg.aborted



def test_engines_whose_heartbeat_stopped_reach_the_driver_by_index():
    """The learner's error carries the silent group ranks through Ray (pickled, as a task error's cause); the
    driver maps them to engine indices, so it replaces a frozen engine without waiting out the timeout."""
    import pickle

    import ray

    from cluster.weight_push import silent_engines

    err = pickle.loads(pickle.dumps(WeightSyncError("engine rank 3 is gone", silent_ranks=[3, 4])))
    assert (str(err), err.silent_ranks) == ("engine rank 3 is gone", (3, 4))
    from_task = ray.exceptions.RayTaskError("broadcast", "traceback", err).as_instanceof_cause()
    assert isinstance(from_task, WeightSyncError)
    # two tensor-parallel ranks per engine: ranks 3 and 4 are both the second member, engine 2
    assert silent_engines(from_task, members=[0, 2, 5], per_engine=2) == {2}
    assert silent_engines(from_task, members=[0, 2, 5], per_engine=1) == {5}  # rank 4 is past the group
    assert silent_engines(ray.exceptions.RayTaskError("broadcast", "tb", ValueError("x")), [0], 1) == set()
