"""stream.buffer against a real (private) Redis: delivery, redelivery, trimming, persistence, errors."""
from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import pytest
import redis
import torch
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from protocol.components import RedisConfig
from protocol.rollout import Completion, PromptInputs, RolloutGroup, RolloutRequest
from stream.buffer import BufferUnavailable, RolloutBuffer
from stream.codec import FORMAT_VERSION
from stream.server import PrivateRedis


def group(i: int, patches: int = 2) -> RolloutGroup:
    """A small group; patches=2 gives ~9 KB, above Redis' 4 KB node size, so MAXLEN ~ trims exactly."""
    # an image of the float32 patches' byte count (4704 bytes a patch)
    inputs = PromptInputs(input_ids=torch.arange(i, i + 20),
                          image=torch.full((28 * patches, 56, 3), i % 256, dtype=torch.uint8),
                          image_grid_thw=torch.tensor([[1, 2, 2]]))
    comps = [Completion([i, 1, 2], [-0.5, -0.25, -0.125], f"answer {i}", "stop") for _ in range(2)]
    return RolloutGroup(RolloutRequest(f"p{i}", inputs, solution="red", meta={"i": i}), comps, policy_version=i,
                        rewards=[1.0, 0.0])


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


def wait_until(cond, what: str, timeout_s: float = 10.0):
    """Poll `cond` until it is truthy (returned) or the deadline passes (an assertion naming `what`)."""
    deadline = time.monotonic() + timeout_s
    while not (got := cond()):
        assert time.monotonic() < deadline, f"waited {timeout_s} s for {what}"
        time.sleep(0.01)
    return got


def wait_idle(buf: RolloutBuffer, ms: int) -> None:
    """Until every entry pending in buf's group was delivered at least `ms` ago (what XAUTOCLAIM's min-idle reads)."""
    def idle() -> bool:
        pel = buf._r.xpending_range(buf.stream, buf.group, "-", "+", 1000)
        return bool(pel) and min(p["time_since_delivered"] for p in pel) >= ms
    wait_until(idle, f"pending entries idle for {ms} ms")


def ids(entries) -> list[str]:
    return [e for e, _ in entries]


def prompts(entries) -> list[str]:
    return [g.request.prompt_id for _, g in entries]


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


def test_out_of_memory_is_a_clear_error(tmp_path):
    with PrivateRedis(RedisConfig(maxmemory="2mb"), tmp_path) as srv:
        buf = RolloutBuffer(srv.url, "s", "g", "A")
        with pytest.raises(MemoryError, match="out of memory"):
            for i in range(200):
                buf.put(group(i, patches=8))  # ~38 KB each


def test_appendonly_survives_a_restart(tmp_path):
    cfg = RedisConfig(appendonly=True)
    with PrivateRedis(cfg, tmp_path) as srv:
        a = RolloutBuffer(srv.url, "s", "g", "A", claim_idle_ms=50)
        put = [a.put(group(i)) for i in range(5)]
        taken = a.take(3)
        a.ack([put[0]])
        old_pid = srv.proc.pid
    with PrivateRedis(cfg, tmp_path) as srv:  # same run dir, new port and password
        assert srv.proc.pid != old_pid
        b = RolloutBuffer(srv.url, "s", "g", "B", claim_idle_ms=50)
        assert b.depth() == 4 and b.pending() == 2
        pel = srv.client().xpending_range("s", "g", "-", "+", 10)
        assert [(p["message_id"].decode(), p["consumer"]) for p in pel] == [(put[1], b"A"), (put[2], b"A")]
        wait_idle(b, 50)
        got = b.take(10)
        assert ids(got) == put[1:] and prompts(got) == prompts(taken[1:]) + ["p3", "p4"]
        assert b.ack(ids(got)) == 4 and b.depth() == 0


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


# ------------------------------------------------------------------------- the server crashes and comes back


def test_pending_and_unread_entries_survive_a_sigkilled_server(tmp_path, caplog):
    """appendonly + appendfsync always: kill -9 the server mid-run, bring it back on the same URL; the buffer's
    calls made while it was down retry with backoff and succeed, nothing is lost and nothing is duplicated."""
    cfg = RedisConfig(appendonly=True, retry_attempts=10, retry_backoff_s=0.02, retry_backoff_max_s=0.5)
    assert cfg.appendfsync == "always"
    with PrivateRedis(cfg, tmp_path) as srv:
        producer = RolloutBuffer(srv.url, "s", "g", "P", cfg=cfg)
        learner = RolloutBuffer(srv.url, "s", "g", "A", claim_idle_ms=60_000, cfg=cfg)
        put = [producer.put(group(i)) for i in range(12)]
        taken = learner.take(5)
        assert learner.ack(ids(taken[:2])) == 2
        pending_ids = ids(taken[2:])  # taken, trained on, not yet acked when the server dies
        assert (learner.depth(), learner.pending()) == (10, 3)

        os.kill(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait()
        results, errors = {}, []

        def learner_and_producer_carry_on():
            try:
                results["pending"] = learner.pending()  # issued while the server is down: retried until it is back
                results["pel"] = [(p["message_id"].decode(), p["consumer"].decode())
                                  for p in learner._r.xpending_range("s", "g", "-", "+", 100)]
                results["acked"] = learner.ack(pending_ids)
                results["unread"] = learner.take(100)
                results["new"] = [producer.put(group(i)) for i in range(12, 14)]
                results["after"] = learner.take(100)
                results["acked_rest"] = learner.ack(ids(results["unread"]) + ids(results["after"]))
                results["end"] = (learner.depth(), learner.pending())
            except Exception as err:  # noqa: BLE001 - reported below
                errors.append(err)

        worker = threading.Thread(target=learner_and_producer_carry_on)
        worker.start()
        # restart once the worker's first call has failed and is backing off (well inside the ~3.1 s budget)
        wait_until(lambda: "retry 1/9" in caplog.text or not worker.is_alive(), "the first retry while down")
        srv.restart()  # from the main thread: the parent-death signal follows the starting thread
        worker.join(30)
        assert not worker.is_alive() and errors == []
        assert srv.restarts == 1 and "retry 1/9" in caplog.text  # the backoff path was taken, not luck

    assert results["pending"] == 3 and results["pel"] == [(e, "A") for e in pending_ids]
    assert results["acked"] == 3  # still pending after the crash: XACK counts only pending ids
    assert ids(results["unread"]) == put[5:] and prompts(results["unread"]) == [f"p{i}" for i in range(5, 12)]
    assert torch.equal(results["unread"][0][1].request.inputs.image, group(5).request.inputs.image)
    assert ids(results["after"]) == results["new"] and results["acked_rest"] == 9
    assert results["end"] == (0, 0)
    assert learner.lost == 0 and learner.corrupt == 0


def test_buffer_reconnects_after_a_restart_on_its_stale_connections(tmp_path):
    cfg = RedisConfig(appendonly=True, retry_attempts=5, retry_backoff_s=0.02)
    with PrivateRedis(cfg, tmp_path) as srv:
        buf = RolloutBuffer(srv.url, "s", "g", "A", cfg=cfg)
        put = [buf.put(group(i)) for i in range(3)]
        taken = buf.take(2)
        for kill in (True, False):
            srv.restart(kill=kill)
            assert (buf.depth(), buf.pending()) == (3, 2)
        assert buf.ack(ids(taken)) == 2 and ids(buf.take(5)) == put[2:]


def test_without_appendonly_a_restart_loses_the_stream_and_says_so(tmp_path, caplog):
    """What a user sees when the private server restarts without appendonly: the restart logs that the stream is
    gone; a learner's next take raises (NOGROUP, naming appendonly) instead of quietly waiting on an empty stream;
    ack of what it held returns 0 (none of it was pending any more); depth and pending read 0. Producers carry
    on (XADD recreates the stream, without the group); recovery is ensure_group(), which recreates the group at
    id 0 so the entries written since the restart are delivered. The entries from before are lost for good."""
    cfg = RedisConfig(appendonly=False, retry_attempts=5, retry_backoff_s=0.02)
    with PrivateRedis(cfg, tmp_path) as srv:
        producer = RolloutBuffer(srv.url, "s", "g", "P", cfg=cfg)
        learner = RolloutBuffer(srv.url, "s", "g", "A", cfg=cfg)
        for i in range(5):
            producer.put(group(i))
        taken = learner.take(3)
        srv.restart(kill=True)
        assert "without appendonly" in caplog.text
        new = [producer.put(group(i)) for i in range(5, 7)]
        with pytest.raises(RuntimeError, match=r"group 'g' is gone .*restarted without appendonly"):
            learner.take(10)
        assert learner.ack(ids(taken)) == 0 and learner.pending() == 0 and learner.depth() == 2
        learner.ensure_group()
        got = learner.take(10)
        assert ids(got) == new and prompts(got) == ["p5", "p6"] and learner.lost == 0  # the loss is not counted
