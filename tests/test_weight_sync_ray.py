"""Learner -> engine weight broadcast between real processes: engines as Ray actors, killed with SIGKILL."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from dataclasses import asdict

import psutil
import pytest
import torch
import torch.distributed as dist

from protocol.components import WeightSyncConfig
from tests.fault_kit import wait_until
from tests.weight_sync_data import FAST, HOST, MARGIN_S, bits, make_weights, sent
from weights.group import WeightSyncError
from weights.receiver import WeightReceiver
from weights.sender import WeightSender

# ---- separate processes: Ray actors ----

class Engine:
    """A stand-in rollout engine: a name -> tensor model updated like HFEngine.update_weights."""

    def __init__(self, seed: int) -> None:
        torch.set_num_threads(1)
        self.model = make_weights(seed)
        self.rx = None
        self.version = 0

    def pid(self) -> int:
        return os.getpid()

    def join(self, port: int, rank: int, num_engines: int, cfg: dict, name: str) -> tuple[bool, float]:
        """Leaves any previous group (returning how long that took), joins the new one."""
        t = time.monotonic()
        if self.rx is not None:
            self.rx.close()
        close_s = time.monotonic() - t
        self.rx = WeightReceiver(HOST, port, rank, num_engines, WeightSyncConfig(**cfg), name)
        return dist.is_initialized(), close_s

    def receive(self) -> tuple[int, list[str], float]:
        t = time.monotonic()
        try:
            version, named = self.rx.receive()
        except WeightSyncError as exc:
            return -1, [str(exc)], time.monotonic() - t
        with torch.no_grad():
            for n, tensor in named:
                if self.model[n].shape != tensor.shape:
                    raise ValueError(n)
                self.model[n].copy_(tensor)
        self.version = version
        return version, [n for n, _ in named], time.monotonic() - t

    def state(self) -> dict[str, torch.Tensor]:
        return self.model

    def close(self) -> None:
        if self.rx is not None:
            self.rx.close()


class Learner:
    """Learner rank 0 in its own process, so that it can be killed."""

    def open(self, num_engines: int, cfg: dict) -> tuple[int, int]:
        self.tx = WeightSender(HOST, 0, num_engines, WeightSyncConfig(**cfg), connect=False)
        return self.tx.port, os.getpid()

    def connect(self) -> None:
        self.tx.connect()

    def broadcast_slowly(self, version: int, pause_s: float) -> dict:
        self.given = 0

        def slow():
            for item in sent(make_weights(0)):
                time.sleep(pause_s)
                self.given += 1
                yield item
        return self.tx.broadcast(slow(), version)

    def buckets_given(self) -> int:
        """Tensors handed to the broadcast so far (answered from a second thread while it runs)."""
        return getattr(self, "given", 0)


@pytest.fixture
def engines(ray_local):
    """engines(n, seed0) -> n fresh engine actors; all are killed after the test."""
    ray = ray_local
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    Actor = ray.remote(num_cpus=0, max_restarts=0)(Engine)
    made = []

    def make(n, seed0=100):
        actors = [Actor.remote(seed0 + i) for i in range(n)]
        pids = ray.get([a.pid.remote() for a in actors], timeout=120)
        made.extend(actors)
        return list(zip(actors, pids))

    yield make
    for a in made:
        ray.kill(a)


def form(ray, cfg, members, num_engines=None, ranks=None):
    """A sender in this process and the given (actor, pid) engines joined as ranks 1..; returns sender, names."""
    num_engines = num_engines or len(members)
    ranks = ranks or list(range(1, len(members) + 1))
    sender = WeightSender(HOST, 0, num_engines, cfg, connect=False)
    names = {r: f"rollout-{r} (pid {pid}, node {HOST})" for r, (_, pid) in zip(ranks, members)}
    joins = [a.join.remote(sender.port, r, num_engines, asdict(cfg), names[r]) for r, (a, _) in zip(ranks, members)]
    return sender, names, joins


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def assert_same(expected, state):
    for n, t in expected:
        assert torch.equal(bits(t), bits(state[n])), n


def test_ray_broadcast_bit_exact_twice(ray_local, engines):
    ray = ray_local
    cfg = WeightSyncConfig(bucket_mb=0.25, timeout_s=30, heartbeat_s=0.5)
    members = engines(2)
    sender, names, joins = form(ray, cfg, members)
    try:
        sender.connect()
        assert [j[0] for j in ray.get(joins)] == [False, False]  # no default group in the engines either
        assert sender.names == names
        weights = make_weights(0)
        before = ray.get([a.state.remote() for a, _ in members])
        for version in (1, 2):
            recv = [a.receive.remote() for a, _ in members]
            stats = sender.broadcast(iter(sent(weights)), version)
            assert stats["version"] == version and stats["buckets"] >= 5 and stats["tensors"] == 14
            for v, order, _ in ray.get(recv, timeout=60):
                assert v == version and order == [n for n, _ in sent(weights)]
            for (a, _), old in zip(members, before):
                state = ray.get(a.state.remote())
                assert_same(sent(weights), state)
                assert torch.equal(state["frozen.weight"], old["frozen.weight"])  # not sent, not touched
            weights = {n: (t + 1 if t.is_floating_point() else ~t if t.dtype == torch.bool else t * 3)
                       for n, t in weights.items()}
        assert not dist.is_initialized()
    finally:
        sender.close()


def test_ray_engine_killed_before_broadcast(ray_local, engines):
    ray = ray_local
    (a1, p1), (a2, p2) = members = engines(2)
    sender, names, joins = form(ray, FAST, members)
    try:
        sender.connect()
        ray.get(joins)
        kill(p2)
        r1 = a1.receive.remote()
        t0 = time.monotonic()
        with pytest.raises(WeightSyncError) as err:
            sender.broadcast(iter(sent(make_weights(0))), 1)
        elapsed = time.monotonic() - t0
        assert names[2] in str(err.value) and names[1] not in str(err.value)
        assert elapsed < FAST.timeout_s + MARGIN_S, elapsed
        v, msg, took = ray.get(r1, timeout=30)  # the survivor is told at once, not at its own timeout
        assert v == -1 and "aborted" in msg[0] and names[2] in msg[0] and took < FAST.timeout_s
        with pytest.raises(WeightSyncError, match="unusable"):
            sender.broadcast([], 2)
    finally:
        sender.close()


def test_ray_engine_never_joins(ray_local, engines):
    ray = ray_local
    members = engines(1)
    sender, names, joins = form(ray, FAST, members, num_engines=2)
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match=r"rank\(s\) \[2\] never joined") as err:
        sender.connect()
    elapsed = time.monotonic() - t0
    assert FAST.timeout_s - 0.5 < elapsed < FAST.timeout_s + MARGIN_S, elapsed
    assert names[1] in str(err.value)  # who did join
    with pytest.raises(Exception, match="WeightSyncError"):  # the one that joined is released, not left hanging
        ray.get(joins, timeout=FAST.timeout_s + 10)


def test_ray_engine_alive_but_not_receiving(ray_local, engines):
    ray = ray_local
    (a1, _), (a2, _) = members = engines(2)
    sender, names, joins = form(ray, FAST, members)
    try:
        sender.connect()
        ray.get(joins)
        r1 = a1.receive.remote()  # engine 2 never calls receive()
        t0 = time.monotonic()
        with pytest.raises(WeightSyncError, match="did not respond") as err:
            sender.broadcast(iter(sent(make_weights(0))), 1)
        elapsed = time.monotonic() - t0
        assert names[2] in str(err.value) and names[1] not in str(err.value)
        assert FAST.timeout_s - 0.5 < elapsed < FAST.timeout_s + MARGIN_S, elapsed
        assert ray.get(r1, timeout=30)[0] == -1
    finally:
        sender.close()


def test_ray_sender_iterable_fails(ray_local, engines):
    """The caller's own error propagates unchanged; engines are told promptly and the group is spent."""
    ray = ray_local
    members = engines(2)
    sender, names, joins = form(ray, FAST, members)

    def broken():
        yield from sent(make_weights(0))[:3]
        raise MemoryError("gather failed")

    try:
        sender.connect()
        ray.get(joins)
        recv = [a.receive.remote() for a, _ in members]
        with pytest.raises(MemoryError, match="gather failed"):
            sender.broadcast(broken(), 1)
        for v, msg, took in ray.get(recv, timeout=30):
            assert v == -1 and "gather failed" in msg[0] and took < FAST.timeout_s
    finally:
        sender.close()


@pytest.mark.slow
def test_ray_engine_killed_mid_broadcast_then_group_reforms(ray_local, engines):
    ray = ray_local
    (a1, p1), (a2, p2) = members = engines(2)
    sender, names, joins = form(ray, FAST, members)
    weights = make_weights(0)
    consumed = []

    def killing():  # SIGKILL engine 2 once a few buckets are on their way
        for i, item in enumerate(sent(weights)):
            if i == 2:
                kill(p2)
                with contextlib.suppress(psutil.NoSuchProcess):
                    psutil.Process(p2).wait(10)  # gone before the next bucket is sent
            consumed.append(item[0])
            yield item

    try:
        sender.connect()
        ray.get(joins)
        r1, _ = a1.receive.remote(), a2.receive.remote()
        t0 = time.monotonic()
        with pytest.raises(WeightSyncError) as err:
            sender.broadcast(killing(), 1)
        elapsed = time.monotonic() - t0
        print(f"\nkilled mid-broadcast: sender raised after {elapsed:.2f}s: {err.value}")
        assert names[2] in str(err.value) and "is gone" in str(err.value)
        assert elapsed < FAST.timeout_s + MARGIN_S, elapsed
        assert consumed == [n for n, _ in sent(weights)]  # drained, so ZeRO-3 peers would not hang
        v, msg, took = ray.get(r1, timeout=30)
        print(f"survivor's receive() raised after {took:.2f}s: {msg[0]}")
        assert v == -1 and took < FAST.timeout_s  # told by rank 0, before its own pending recv times out
    finally:
        sender.close()

    # a replacement joins a fresh group (new port) next to the survivor, which leaves the old one
    (a3, p3), = engines(1, seed0=300)
    survivors = [(a1, p1), (a3, p3)]
    sender, names, joins = form(ray, FAST, survivors)
    try:
        sender.connect()
        assert ray.get(joins)[0][1] < 1.0  # leaving the broken group did not wait for gloo's timeout
        recv = [a.receive.remote() for a, _ in survivors]
        stats = sender.broadcast(iter(sent(weights)), 2)
        assert [v for v, _, _ in ray.get(recv, timeout=60)] == [2, 2]
        for a, _ in survivors:
            assert_same(sent(weights), ray.get(a.state.remote()))
        assert stats["version"] == 2
    finally:
        sender.close()


def test_ray_learner_killed_mid_broadcast(ray_local, engines):
    """Rank 0 dies half-way: engines give up at once (store and sockets close), never hang."""
    ray = ray_local
    members = engines(2)
    learner = ray.remote(num_cpus=0, max_restarts=0, max_concurrency=2)(Learner).remote()
    try:
        port, pid = ray.get(learner.open.remote(2, asdict(FAST)), timeout=120)
        joins = [a.join.remote(port, r, 2, asdict(FAST), f"rollout-{r}") for r, (a, _) in enumerate(members, 1)]
        ray.get([learner.connect.remote()] + joins, timeout=60)
        recv = [a.receive.remote() for a, _ in members]
        learner.broadcast_slowly.remote(1, 0.3)
        wait_until(lambda: ray.get(learner.buckets_given.remote()) >= 3, 60, "a few buckets through")
        kill(pid)
        t0 = time.monotonic()
        results = ray.get(recv, timeout=FAST.timeout_s + 30)
        elapsed = time.monotonic() - t0
        print(f"\nlearner killed: engines raised {elapsed:.2f}s later: {results[0][1][0]}")
        assert [v for v, _, _ in results] == [-1, -1]
        assert elapsed < FAST.timeout_s + MARGIN_S, elapsed
    finally:
        ray.kill(learner)


def test_ray_engine_frozen_mid_broadcast(ray_local, engines):
    """SIGSTOP (a hung process) half-way: its heartbeat stops, so it is named well before the collective's timeout."""
    ray = ray_local
    (a1, p1), (a2, p2) = members = engines(2)
    sender, names, joins = form(ray, FAST, members)

    def freezing():
        for i, item in enumerate(sent(make_weights(0))):
            if i == 2:
                os.kill(p2, signal.SIGSTOP)
            yield item

    try:
        sender.connect()
        ray.get(joins)
        r1, _ = a1.receive.remote(), a2.receive.remote()
        t0 = time.monotonic()
        with pytest.raises(WeightSyncError, match="is gone") as err:
            sender.broadcast(freezing(), 1)
        elapsed = time.monotonic() - t0
        assert names[2] in str(err.value) and names[1] not in str(err.value)
        assert elapsed < FAST.timeout_s + MARGIN_S, elapsed
        assert ray.get(r1, timeout=30)[0] == -1
    finally:
        os.kill(p2, signal.SIGCONT)
        sender.close()
