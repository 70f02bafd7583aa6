"""The rollout buffer: a Redis stream from rollout actors (producers) to learners (one consumer group).

Delivery is at-least-once. A learner `take`s entries (XREADGROUP: they become *pending* on it) and `ack`s them
only after its optimizer step used them; entries a consumer took but never acked (it died) are re-claimed by
any other consumer after `claim_idle_ms` (XAUTOCLAIM), so a crash between read and ack loses nothing. The
client retries every command on connection errors (redis-py's Retry, see stream.server.make_client), so an
XADD whose reply was lost can be applied twice, and a consumer declared dead that comes back can still ack;
so a learner that must train on a prompt exactly once dedupes by (prompt_id, policy_version).

Ack deletes (`delete_on_ack=True`, the default): XACK and XDEL in one MULTI. Then the stream holds exactly
the unfinished work (unread + pending), so `depth()` is the backlog, memory is only spent on work still to
do, and MAXLEN trimming, which always removes the *oldest* entries, only ever hits an entry when the backlog
itself exceeds `maxlen`. With XACK alone, acked entries would stay until trimmed, the oldest entries of all
would be a dead consumer's pending ones, and trimming would delete those first even with a short backlog.
(XDEL is wrong if a second consumer group reads the same stream; there is one.)

The bound: XADD ... MAXLEN ~ maxlen deletes entries whether or not they were delivered or acked, so the
producers must never run more than `maxlen` entries ahead of the learners (the admission control in the
rollout driver enforces it). "~" trims whole radix-tree nodes, so the stream may exceed maxlen by up to one
node (100 entries or 4 KB by default; rollout groups carry images, far above 4 KB, so nodes hold one entry
and the cap is in practice exact). A pending entry trimmed away is counted in `lost` when re-claimed, never
raised.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis

from protocol.components import RedisConfig
from protocol.rollout import RolloutGroup
from stream.codec import FORMAT_VERSION, CodecError, decode_group, encode_group
from stream.server import make_client, redact_url

log = logging.getLogger(__name__)


class BufferUnavailable(ConnectionError):
    """Redis did not answer within the configured retries; the message names the server, not its password."""


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _fields(group: RolloutGroup) -> dict[str, Any]:
    """A stream entry; the small plain fields let `XRANGE` be read by a human."""
    return {"g": encode_group(group), "prompt_id": group.request.prompt_id,
            "policy_version": str(group.policy_version), "v": str(FORMAT_VERSION)}


def _describe(client: redis.Redis) -> str:
    kw = client.connection_pool.connection_kwargs
    if "path" in kw:
        return f"unix://{kw['path']}"
    return f"redis://{kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}"


class RolloutBuffer:
    """One per process or thread (the in-flight set and counters are not locked); Ray actors build their own
    from the URL rather than receiving one."""

    def __init__(self, client_or_url: redis.Redis | str, stream: str = "clsrl:rollouts",
                 group: str = "learners", consumer: str | None = None, maxlen: int = 10000, *,
                 claim_idle_ms: int = 300_000, delete_on_ack: bool = True,
                 cfg: RedisConfig | None = None) -> None:
        """`consumer` names this learner in the group (default host:pid); producers need none.

        Given a URL, the client is `make_client(url, cfg)`: timeouts and retries from `cfg`. A client passed
        in keeps its own settings (its retry policy included).
        """
        self.cfg = cfg or RedisConfig()
        if isinstance(client_or_url, str):
            self.where = redact_url(client_or_url)
            self._r = make_client(client_or_url, self.cfg, log)
            self._owns_client = True
        else:
            self.where = _describe(client_or_url)
            self._r = client_or_url
            self._owns_client = False
        timeout = self._r.connection_pool.connection_kwargs.get("socket_timeout")
        # a blocking read must end before the socket times out
        self._read_timeout_ms = float("inf") if timeout is None else timeout * 1000
        if maxlen < 1:
            raise ValueError(f"maxlen must be >= 1, got {maxlen}")
        self.stream, self.group, self.maxlen = stream, group, maxlen
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}"
        self.claim_idle_ms, self.delete_on_ack = claim_idle_ms, delete_on_ack
        self.lost = 0  # pending entries trimmed away before anyone acked them
        self.corrupt = 0  # entries that did not decode (acked and dropped, or they would come back forever)
        self._inflight: set[str] = set()  # taken by this object, not yet acked
        self._failures_seen = 0  # the client's failed attempts when this object last looked
        self._lost_replies = False  # entries Redis may have delivered to us whose reply never came
        self._group_ready = False

    @classmethod
    def from_config(cls, cfg: RedisConfig, url: str, consumer: str | None = None) -> RolloutBuffer:
        return cls(url, cfg.stream, cfg.group, consumer, cfg.stream_maxlen, claim_idle_ms=cfg.claim_idle_ms,
                   delete_on_ack=cfg.delete_on_ack, cfg=cfg)

    # ----------------------------------------------------------------------------------------- plumbing

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """fn(*args), its Redis errors named. The client has already retried connection errors and timeouts
        (with backoff, logging each retry), so one that reaches here is final."""
        t0 = time.monotonic()
        try:
            return fn(*args, **kwargs)
        except (redis.AuthenticationError, redis.exceptions.AuthorizationError) as err:  # never retried
            raise BufferUnavailable(f"Redis at {self.where} rejected our credentials ({what}): "
                                    f"{err}") from None
        except (redis.ConnectionError, redis.TimeoutError) as err:
            raise BufferUnavailable(f"Redis at {self.where} unreachable: {what} failed after "
                                    f"{time.monotonic() - t0:.1f} s of retries (redis.retry_attempts="
                                    f"{self.cfg.retry_attempts}); last error: {type(err).__name__}: "
                                    f"{err}") from None
        except redis.ResponseError as err:
            if isinstance(err, redis.exceptions.OutOfMemoryError) or str(err).startswith("OOM"):
                raise MemoryError(f"Redis at {self.where} is out of memory (maxmemory) on {what}: the "
                                  f"producers are too far ahead of the learners, or redis.maxmemory is too "
                                  f"small") from None
            if str(err).startswith("NOGROUP"):
                raise RuntimeError(f"Redis at {self.where}: stream '{self.stream}' or group '{self.group}' "
                                   f"is gone ({what}); was the server restarted without "
                                   f"appendonly?") from None
            raise

    def close(self) -> None:
        if self._owns_client:
            self._r.close()

    def __enter__(self) -> RolloutBuffer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------- producer

    def put(self, group: RolloutGroup) -> str:
        """Append one group; returns its entry id."""
        return _s(self._call("XADD", self._r.xadd, self.stream, _fields(group), maxlen=self.maxlen,
                             approximate=True))

    def put_many(self, groups: list[RolloutGroup]) -> list[str]:
        """Append groups in one MULTI: a producer killed mid-call publishes all of them or none."""
        if not groups:
            return []
        pipe = self._r.pipeline(transaction=True)  # a retry replays the whole MULTI
        for g in groups:
            pipe.xadd(self.stream, _fields(g), maxlen=self.maxlen, approximate=True)
        return [_s(eid) for eid in self._call(f"XADD x{len(groups)}", pipe.execute)]

    # ------------------------------------------------------- released slots (dropped groups), for admission

    @property
    def _released_key(self) -> str:
        return f"{self.stream}:released"

    def add_released(self, n: int) -> None:
        """Learners count groups they dropped (stale): the driver hands their slots to replacements."""
        if n:
            self._call("INCRBY", self._r.incrby, self._released_key, n)

    def released(self) -> int:
        return int(self._call("GET", self._r.get, self._released_key) or 0)

    def claim(self, draws: list[int]) -> list[bool]:
        """First claim of each draw wins, across all learner ranks (a re-issued request may be answered
        twice)."""
        if not draws:
            return []
        pipe = self._r.pipeline(transaction=True)
        for d in draws:
            pipe.zadd(f"{self.stream}:claimed", {str(d): d}, nx=True)
        return [bool(x) for x in self._call("ZADD NX", pipe.execute)]

    def forget_claims(self, below: int) -> None:
        """Draws under `below` can no longer arrive; their claims only cost memory."""
        self._call("ZREMRANGEBYSCORE", self._r.zremrangebyscore, f"{self.stream}:claimed", "-inf",
                   f"({below}")

    def reset(self) -> int:
        """Delete the stream (its group and pending list with it) and the counters; returns the entries
        dropped."""
        left = int(self._call("XLEN", self._r.xlen, self.stream))
        self._call("DEL", self._r.delete, self.stream, self._released_key, f"{self.stream}:claimed")
        self._group_ready = False
        self._inflight.clear()
        return left

    # ----------------------------------------------------------------------------------------- consumer

    def ensure_group(self) -> None:
        """Create the group at id 0 (with the stream), so entries written before any learner came are read."""
        try:
            self._call("XGROUP CREATE", self._r.xgroup_create, self.stream, self.group, id="0",
                       mkstream=True)
        except redis.ResponseError as err:
            if not str(err).startswith("BUSYGROUP"):
                raise
        self._group_ready = True

    def take(self, n: int, block_ms: int = 0) -> list[tuple[str, RolloutGroup]]:
        """Up to n entries for this consumer: dead consumers' stale ones first, then new ones.

        block_ms > 0 waits that long for new entries when there is nothing to hand out; 0 returns at once.
        """
        if n < 1:
            raise ValueError(f"take(n): n must be >= 1, got {n}")
        if block_ms < 0 or block_ms >= self._read_timeout_ms:
            raise ValueError(f"take(block_ms={block_ms}): must be in [0, {self._read_timeout_ms:.0f}) (the "
                             f"client's socket timeout), or the socket times out before Redis answers")
        if not self._group_ready:
            self.ensure_group()
        out = self._claim(n)
        self._lost_replies |= self._connection_failed()
        if self._lost_replies:
            out += self._recover_lost_replies(n - len(out))
        if len(out) < n:
            resp = self._call("XREADGROUP", self._r.xreadgroup, self.group, self.consumer,
                              {self.stream: ">"}, count=n - len(out),
                              block=block_ms if block_ms > 0 and not out else None)
            for _, entries in (resp.items() if isinstance(resp, dict) else resp or []):
                for eid, fields in entries:
                    self._accept(_s(eid), fields, out)
            self._lost_replies |= self._connection_failed()  # a retried read: the next take looks
        # Only what we hand out is in flight: if this call failed half-way, what it had claimed or read stays
        # pending on us and comes back (to us or another consumer) after claim_idle_ms instead of sticking.
        self._inflight.update(eid for eid, _ in out)
        return out

    def _accept(self, eid: str, fields: dict | None, out: list) -> None:
        data = (fields or {}).get(b"g")
        try:
            if data is None:
                raise CodecError("entry has no 'g' field")
            out.append((eid, decode_group(data)))
        except CodecError as err:
            self.corrupt += 1
            log.error("rollout buffer %s: dropping undecodable entry %s: %s", self.stream, eid, err)
            self._ack_ids([eid])

    def _claim(self, n: int) -> list[tuple[str, RolloutGroup]]:
        out: list[tuple[str, RolloutGroup]] = []
        cursor: Any = "0-0"
        for _ in range(1000):  # the cursor walks the pending list once; the bound guards against a bad server
            resp = self._call("XAUTOCLAIM", self._r.xautoclaim, self.stream, self.group, self.consumer,
                              self.claim_idle_ms, cursor, count=n - len(out))
            cursor, entries = resp[0], resp[1]
            trimmed_ids = resp[2] if len(resp) > 2 else []  # Redis >= 7: trimmed ids, already off the PEL
            nil = 0
            for eid, fields in entries:
                if eid is None:  # Redis 6.2 reports a trimmed entry as nil, without its id, and keeps it
                    nil += 1
                elif _s(eid) not in self._inflight:  # ours and still being trained on: not a dead consumer's
                    self._accept(_s(eid), fields, out)
            if trimmed_ids:
                self._count_lost(len(trimmed_ids))
            if nil:
                self._drop_trimmed_pending()
            if _s(cursor) == "0-0" or len(out) >= n:
                break
        return out

    def _connection_failed(self) -> bool:
        """Whether the client failed an attempt (and retried) since the last look."""
        failures = getattr(self._r.get_retry(), "failures", 0)
        failed, self._failures_seen = failures != self._failures_seen, failures
        return failed

    def _own_pending(self) -> list[tuple[str, dict | None]]:
        """Our pending entries that this object did not hand out (a history read: no fields where the data
        is gone)."""
        resp = self._call("XREADGROUP 0", self._r.xreadgroup, self.group, self.consumer, {self.stream: "0"})
        return [(_s(eid), fields) for _, entries in (resp.items() if isinstance(resp, dict) else resp or [])
                for eid, fields in entries if _s(eid) not in self._inflight]

    def _recover_lost_replies(self, n: int) -> list[tuple[str, RolloutGroup]]:
        """After a failed attempt: up to n entries Redis delivered to us whose reply was lost (the server
        died or the connection broke after it had recorded the delivery). They are pending on us, so a
        read of new entries never returns them, and XAUTOCLAIM would only after claim_idle_ms."""
        own = self._own_pending()
        self._drop_gone([eid for eid, fields in own if not fields])
        live = [(eid, fields) for eid, fields in own if fields]
        out: list[tuple[str, RolloutGroup]] = []
        for eid, fields in live[:max(n, 0)]:
            self._accept(eid, fields, out)
        self._lost_replies = len(live) > n
        return out

    def _drop_trimmed_pending(self) -> None:
        """Redis 6.2: find our pending entries whose data is gone (history reads return them empty) and ack
        them."""
        self._drop_gone([eid for eid, fields in self._own_pending() if not fields])

    def _drop_gone(self, gone: list[str]) -> None:
        if gone:
            self._ack_ids(gone)
            self._count_lost(len(gone))

    def _count_lost(self, k: int) -> None:
        self.lost += k
        log.error("rollout buffer %s: %d pending entries were trimmed before being acked (lost %d so far); "
                  "producers ran more than maxlen=%d ahead of the learners", self.stream, k, self.lost,
                  self.maxlen)

    def ack(self, entry_ids: Iterable[str]) -> int:
        """Mark entries done (after the optimizer step that used them); returns how many were pending."""
        ids = [_s(e) for e in entry_ids]
        if not ids:
            return 0
        acked = self._ack_ids(ids)
        self._inflight.difference_update(ids)
        return acked

    def _ack_ids(self, ids: list[str]) -> int:
        pipe = self._r.pipeline(transaction=True)  # XACK and XDEL are idempotent: a replayed MULTI is too
        pipe.xack(self.stream, self.group, *ids)
        if self.delete_on_ack:
            pipe.xdel(self.stream, *ids)
        return int(self._call("XACK", pipe.execute)[0])

    # ----------------------------------------------------------------------------------------- metrics

    def depth(self) -> int:
        """Entries in the stream: with delete_on_ack, the unread plus the pending ones."""
        return int(self._call("XLEN", self._r.xlen, self.stream))

    def pending(self) -> int:
        """Entries delivered to some consumer of the group and not yet acked."""
        try:
            return int(self._call("XPENDING", self._r.xpending, self.stream, self.group)["pending"])
        except RuntimeError:  # NOGROUP: no learner has created the group yet
            return 0

    def metrics(self) -> dict[str, int]:
        return {"buffer/depth": self.depth(), "buffer/pending": self.pending(), "buffer/lost": self.lost,
                "buffer/corrupt": self.corrupt}
