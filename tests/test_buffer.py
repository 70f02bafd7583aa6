"""stream.buffer against a real (private) Redis: delivery, redelivery, trimming, client errors (the server's own
failures and restarts are in tests/test_buffer_restart.py)."""
from __future__ import annotations

import time
import uuid

import pytest
import redis
import torch
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from protocol.components import RedisConfig
from stream.buffer import BufferUnavailable, RolloutBuffer
from stream.codec import FORMAT_VERSION
from stream.server import PrivateRedis
from tests.buffer_kit import group, ids, prompts, wait_idle


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with PrivateRedis(RedisConfig(), tmp_path_factory.mktemp("run")) as srv:
        yield srv


@pytest.fixture
def make(server):
    """make(consumer, **kw) -> a RolloutBuffer on this test's own stream."""
    stream = f"test:{uuid.uuid4().hex}"
    made = []

    def _make(consumer="A", **kw):
        kw.setdefault("maxlen", 1000)
        buf = RolloutBuffer(server.url, stream, "learners", consumer, **kw)
        made.append(buf)
        return buf

    yield _make
    for b in made:
        b.close()


def test_put_take_ack_round_trip(make):
    buf = make()
    buf.ensure_group()
    buf.ensure_group()  # idempotent
    put = [buf.put(group(i)) for i in range(3)]
    assert buf.depth() == 3 and buf.pending() == 0
    got = buf.take(5)
    assert ids(got) == put and prompts(got) == ["p0", "p1", "p2"]
    assert torch.equal(got[1][1].request.inputs.image, group(1).request.inputs.image)
    assert got[2][1].policy_version == 2 and got[2][1].completions[0].text == "answer 2"
    assert buf.pending() == 3
    assert buf.ack(put) == 3
    assert buf.pending() == 0 and buf.depth() == 0  # delete_on_ack: the stream holds only unfinished work
    assert buf.take(5) == []


def test_plain_fields_for_inspection(make, server):
    buf = make()
    eid = buf.put(group(4))
    [(_, fields)] = server.client().xrange(buf.stream, eid, eid)
    assert fields[b"prompt_id"] == b"p4" and fields[b"policy_version"] == b"4" and fields[b"v"] == str(FORMAT_VERSION).encode()


def test_entries_written_before_the_group_exists_are_delivered(make):
    producer = make(consumer=None)
    for i in range(2):
        producer.put(group(i))
    assert producer.pending() == 0  # no group yet: 0, not an error
    assert prompts(make("L").take(10)) == ["p0", "p1"]


def test_redelivery_after_a_consumer_dies(make):
    a, b = make("A", claim_idle_ms=400), make("B", claim_idle_ms=400)
    put = [a.put(group(i)) for i in range(4)]
    taken = a.take(3)  # A "dies" before acking
    assert ids(taken) == put[:3]
    assert ids(b.take(1)) == [put[3]]  # too fresh to claim: B gets new work instead
    b.ack([put[3]])
    wait_idle(b, 400)
    again = b.take(10)
    assert ids(again) == put[:3] and prompts(again) == prompts(taken)
    assert b.ack(put) == 3
    assert a.pending() == 0 and a.depth() == 0
    # acked entries are never handed out again, even to a consumer that counts everything pending as stale
    assert a.take(10) == [] and b.take(10) == [] and make("C", claim_idle_ms=0).take(10) == []


def test_live_consumer_keeps_its_entries(make):
    a, b = make("A", claim_idle_ms=60_000), make("B", claim_idle_ms=60_000)
    for i in range(3):
        a.put(group(i))
    a.take(3)
    assert b.take(10) == []  # A's entries are not stale yet


def test_own_inflight_entries_are_not_handed_out_twice(make):
    a = make("A", claim_idle_ms=0)  # everything pending counts as stale at once
    for i in range(4):
        a.put(group(i))
    first = a.take(2)
    second = a.take(10)
    assert set(ids(first)).isdisjoint(ids(second)) and len(first) + len(second) == 4
    # a restarted learner under the same name (empty in-flight set) does get its old entries back
    assert sorted(ids(make("A", claim_idle_ms=0).take(10))) == sorted(ids(first) + ids(second))


def test_two_consumers_share_work_without_duplicates(make):
    a, b = make("A"), make("B")
    put = [a.put(group(i, patches=1)) for i in range(20)]
    seen = []
    for buf, n in [(a, 5), (b, 5), (a, 3), (b, 10), (a, 10)]:
        got = buf.take(n)
        seen += ids(got)
        buf.ack(ids(got))
    assert sorted(seen) == sorted(put) and len(seen) == len(set(seen)) == 20
    assert a.pending() == 0 and a.depth() == 0


def test_maxlen_bounds_the_stream(make):
    buf = make(maxlen=10)
    for i in range(30):
        buf.put(group(i))
    assert buf.depth() == 10  # entries over 4 KB: one per radix node, so "~" trims exactly
    assert prompts(buf.take(100)) == [f"p{i}" for i in range(20, 30)]
    tiny = make(consumer="T", maxlen=10)
    tiny.stream += ":tiny"
    for _ in range(300):
        tiny._r.xadd(tiny.stream, {"g": b"x"}, maxlen=10, approximate=True)
    assert 10 <= tiny.depth() <= 10 + 100  # small entries: bounded by maxlen plus one node (100 entries)


def test_trimmed_pending_entries_count_as_lost(make):
    a = make("A", maxlen=5, claim_idle_ms=50)
    b = make("B", maxlen=5, claim_idle_ms=50)
    for i in range(3):
        a.put(group(i))
    a.take(3)  # A dies holding p0..p2
    for i in range(3, 8):
        a.put(group(i))  # the producer runs maxlen ahead: p0..p2 are trimmed while pending
    wait_idle(b, 50)
    got = b.take(10)
    assert prompts(got) == [f"p{i}" for i in range(3, 8)]
    assert b.lost == 3 and b.pending() == 5  # the lost ids left the pending list
    b.ack(ids(got))
    assert b.take(10) == [] and b.lost == 3 and b.pending() == 0  # counted once, not again on the next claim


def test_undecodable_entry_is_dropped_and_counted(make):
    buf = make()
    buf.put(group(0))
    buf._r.xadd(buf.stream, {"g": b"\xc1garbage"})
    buf._r.xadd(buf.stream, {"other": b"1"})
    buf.put(group(1))
    assert prompts(buf.take(10)) == ["p0", "p1"]
    assert buf.corrupt == 2 and buf.pending() == 2 and buf.depth() == 2


def test_ack_without_delete_keeps_entries_until_trimmed(make):
    buf = make(delete_on_ack=False)
    put = [buf.put(group(i)) for i in range(3)]
    buf.ack(ids(buf.take(3)))
    assert buf.pending() == 0 and buf.depth() == 3 and buf.take(3) == []
    assert buf.ack(put) == 0  # acking twice is harmless


def test_blocking_take_waits_then_returns_empty(make):
    buf = make()
    t0 = time.monotonic()
    assert buf.take(1, block_ms=200) == []
    assert 0.15 < time.monotonic() - t0 < 2.0
    with pytest.raises(ValueError, match="block_ms"):
        buf.take(1, block_ms=10**9)
    with pytest.raises(ValueError, match="n must be >= 1"):
        buf.take(0)


def test_unreachable_server_raises_naming_the_url_without_password(caplog):
    cfg = RedisConfig(retry_attempts=3, retry_backoff_s=0.01, connect_timeout_s=0.5)
    buf = RolloutBuffer("redis://:hunter2@127.0.0.1:1/0", "s", "g", "A", cfg=cfg)
    t0 = time.monotonic()
    with pytest.raises(BufferUnavailable, match=r"redis://:\*\*\*@127.0.0.1:1/0 unreachable: XADD failed after "
                                                r".* \(redis.retry_attempts=3\); last error: ConnectionError") as err:
        buf.put(group(0))
    assert "hunter2" not in str(err.value) and "hunter2" not in caplog.text and time.monotonic() - t0 < 5
    retries = [r.getMessage() for r in caplog.records if r.name == "stream.buffer"]
    assert len(retries) == 2 and "retry 2/2 in 0.04 s" in retries[-1]  # 3 tries; waits 0.02, 0.04 s


def test_the_client_retries_with_redis_py_retry_and_the_configured_backoff(server):
    cfg = RedisConfig(retry_attempts=4, retry_backoff_s=0.05, retry_backoff_max_s=0.3)
    with RolloutBuffer(server.url, "s", "g", "A", cfg=cfg) as buf:
        retry = buf._r.connection_pool.connection_kwargs["retry"]
        assert isinstance(retry, Retry) and retry.get_retries() == 3  # 4 tries
        assert retry._backoff == ExponentialBackoff(cap=0.3, base=0.05)
        assert [retry._backoff.compute(k) for k in (1, 2, 3)] == [0.1, 0.2, 0.3]
        assert {redis.ConnectionError, redis.TimeoutError} <= set(retry._supported_errors)
        assert not retry.is_retryable(redis.AuthenticationError("wrong password"))
        conn = buf._r.connection_pool.get_connection()
        try:
            assert conn.retry == retry  # what each connection retries with
        finally:
            buf._r.connection_pool.release(conn)


def test_fault_injected_socket_errors_are_retried_by_the_client_and_the_entry_goes_in_once(make, monkeypatch, caplog):
    """Fault injection under the client API (the socket write raises twice, then the real write runs): redis-py
    retries, nothing of ours above it, and the entry is written once. The real outage (SIGKILL, restart) is
    test_pending_and_unread_entries_survive_a_sigkilled_server; this one pins the retry count and the log."""
    buf = make(cfg=RedisConfig(retry_attempts=4, retry_backoff_s=0.01))
    cls = buf._r.connection_pool.connection_class
    real, calls = cls.send_packed_command, []

    def flaky(conn, command, *a, **kw):
        if b"XADD" in b"".join(command if isinstance(command, list) else [command]):
            calls.append(1)
            if len(calls) <= 2:
                raise redis.ConnectionError("connection reset by peer")
        return real(conn, command, *a, **kw)

    monkeypatch.setattr(cls, "send_packed_command", flaky)
    buf._r.xadd(buf.stream, {"x": "1"})  # the bare client call: no retry loop of ours around it
    assert len(calls) == 3 and buf.depth() == 1
    retries = [r.getMessage() for r in caplog.records if r.name == "stream.buffer"]
    assert len(retries) == 2 and "connection reset by peer" in retries[0] and "retry 2/3" in retries[1]
    calls.clear()
    buf.put(group(0))
    assert len(calls) == 3 and buf.depth() == 2  # the entry went in once


def test_wrong_password_fails_fast(server):
    url = server.url.replace(server.password, "wrong")
    buf = RolloutBuffer(url, "s", "g", "A")
    t0 = time.monotonic()
    with pytest.raises(BufferUnavailable, match="rejected our credentials") as err:
        buf.depth()
    assert "wrong" not in str(err.value) and time.monotonic() - t0 < 2


def test_fault_injected_between_claim_and_read_loses_nothing(make, monkeypatch):
    """Fault injection: a connection error on XREADGROUP right after XAUTOCLAIM succeeded. A killed server
    (test_pending_and_unread_entries_survive_a_sigkilled_server) cannot be timed to land between the two calls
    of one take(), so the error is raised from the client's xreadgroup; everything else is the real server."""
    a = make("A", claim_idle_ms=400, cfg=RedisConfig(retry_attempts=1))
    put = [a.put(group(i)) for i in range(3)]
    make("dead", claim_idle_ms=400).take(2)
    wait_idle(a, 400)
    real = a._r.xreadgroup
    monkeypatch.setattr(a._r, "xreadgroup", lambda *args, **kw: (_ for _ in ()).throw(redis.ConnectionError("reset")))
    with pytest.raises(BufferUnavailable):
        a.take(3)  # XAUTOCLAIM got p0, p1; then XREADGROUP failed
    monkeypatch.setattr(a._r, "xreadgroup", real)
    assert ids(a.take(3)) == [put[2]]
    a.ack([put[2]])
    wait_idle(a, 400)
    assert ids(a.take(3)) == put[:2]  # back after claim_idle_ms, not stuck as "in flight"
