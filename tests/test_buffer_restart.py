"""stream.buffer when the private Redis server itself fails: out of memory, restarts with and without
appendonly, a SIGKILL mid-run (the delivery and client-error cases are in tests/test_buffer.py)."""
from __future__ import annotations

import os
import signal
import threading

import pytest
import torch

from protocol.components import RedisConfig
from stream.buffer import RolloutBuffer
from stream.server import PrivateRedis
from tests.buffer_kit import group, ids, prompts, wait_idle, wait_until


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


def test_entries_whose_read_reply_was_lost_come_back_on_the_next_take(tmp_path):
    """A read that Redis carried out but whose reply never arrived (the server died or the connection broke
    after it recorded the delivery) leaves its entries pending on this consumer, where reads of new entries
    never return them: once a call has failed and been retried, take hands them out at once, not after
    claim_idle_ms (the learner would wait minutes for groups it was already given)."""
    cfg = RedisConfig(retry_attempts=3, retry_backoff_s=0.01)
    with PrivateRedis(cfg, tmp_path) as srv:
        producer = RolloutBuffer(srv.url, "s", "g", "P", cfg=cfg)
        learner = RolloutBuffer(srv.url, "s", "g", "A", claim_idle_ms=60_000, cfg=cfg)
        learner.ensure_group()
        put = [producer.put(group(i)) for i in range(2)]
        admin = srv.client()
        admin.xreadgroup("g", "A", {"s": ">"}, count=2)  # what Redis recorded for the read whose reply is lost
        first: list = []
        reader = threading.Thread(target=lambda: first.extend(learner.take(2, block_ms=1500)))
        reader.start()
        wait_until(lambda: any(c["cmd"] == "xreadgroup" for c in admin.client_list()), "a blocked read")
        assert admin.client_kill_filter(_type="normal", skipme=True) >= 1  # it fails mid-call, is retried
        reader.join(20)
        assert not reader.is_alive() and first == []  # the retried read found nothing new
        got = learner.take(2)
        assert ids(got) == put and prompts(got) == ["p0", "p1"]
        assert learner.ack(ids(got)) == 2 and learner.pending() == 0


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
