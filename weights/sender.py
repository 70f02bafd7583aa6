"""Rank 0 of the weight-sync group (learner rank 0): hosts the store and broadcasts each new version.

    sender = WeightSender(host, port, num_engines, cfg)
    stats = sender.broadcast(((n, p) for n, p in model.named_parameters() if p.requires_grad), version)

How tensors are bucketed, checked and confirmed, and how failures are reported: `weights` (the package).
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator

import torch

from protocol.components import WeightSyncConfig
from weights.group import (
    MAX_INFLIGHT,
    Awaiting,
    Bucket,
    Packer,
    Watch,
    WeightSyncError,
    abort_backend,
    backend_device,
    dumps,
    new_backend,
    open_store,
    release_backend,
    resolve_backend,
    wait_for,
    wait_work,
)


def _drain(it: Iterator) -> None:
    """Consume what the caller still has to give, so learner ranks gathering in lockstep (ZeRO-3) finish."""
    try:
        for _ in it:
            pass
    except Exception:  # noqa: BLE001 - the original error is the one to report
        pass


class WeightSender:
    """Rank 0 of the weight-sync group (learner rank 0): hosts the store, broadcasts buckets."""

    def __init__(self, host: str, port: int, num_engines: int, cfg: WeightSyncConfig | None = None, *,
                 connect: bool = True) -> None:
        if num_engines < 1:
            raise ValueError(f"num_engines must be >= 1, got {num_engines}")
        self.cfg = cfg or WeightSyncConfig()
        self.backend = resolve_backend(self.cfg.backend)
        self.device = backend_device(self.backend)
        self.host = host
        self.num_engines = num_engines
        self.world = num_engines + 1
        self._store = open_store(host, port, True, self.cfg.timeout_s)
        self.port = self._store.port  # the real one when port=0
        self._store.set("meta", dumps({"world": self.world, "backend": self.backend}))
        self._watch = Watch(self._store, self.cfg)
        self._pg = None
        self._packer: Packer | None = None
        self._seq = 0
        self._next_hdr = 0
        self._broken: str | None = None
        if connect:
            self.connect()

    @property
    def engine_ranks(self) -> list[int]:
        return list(range(1, self.world))

    @property
    def names(self) -> dict[int, str]:
        """rank -> the name each engine registered when it joined."""
        return self._watch.names

    def connect(self) -> None:
        """Wait for every engine to join, then form the backend; names the ranks that never joined."""
        if self._pg is not None or self._store is None:
            raise WeightSyncError(
                f"weight-sync group {self.host}:{self.port} is already {self._broken or 'connected'}"
            )
        t = self.cfg.timeout_s
        deadline = time.monotonic() + t
        joins = {r: f"join/{r}" for r in self.engine_ranks}
        joined = Awaiting(self._store, joins)

        def health() -> None:
            present = [r for r in joins if r not in joined.missing]
            for r in present:
                if r not in self.names:
                    self.names[r] = self._store.get(joins[r]).decode()
            self._watch.check(present, "while the group was forming")

        try:
            ok = wait_for(joined, deadline, health)
            if not ok:
                health()
        except WeightSyncError:
            self.close()  # engines blocked in the rendezvous fail at once instead of at their timeout
            raise
        if not ok:
            self.close()
            present = self._watch.who(r for r in joins if r not in joined.missing) or "none"
            raise WeightSyncError(
                f"weight-sync group {self.host}:{self.port}: engine rank(s) {joined.missing} never joined "
                f"within {t:.0f}s (joined: {present})")
        self.names.update({r: self._store.get(k).decode() for r, k in joins.items()})
        try:
            self._pg = new_backend(self.host, self.port, 0, self.world, self.backend, t)
        except Exception as exc:
            err = self._watch.diagnose(None, self.engine_ranks, "forming the group", exc)
            self.close()
            raise err from exc

    # ---- failure detection ----

    def _await_all(self, seq: int, kind: str, during: str) -> None:
        waiting = Awaiting(self._store, {r: f"{kind}/{seq}/{r}" for r in self.engine_ranks})
        t = self.cfg.timeout_s
        def health() -> None:
            self._watch.check(waiting.missing, during, seq)

        if not wait_for(waiting, time.monotonic() + t, health):
            health()
            raise WeightSyncError(f"weight sync {during}: engine {self._watch.who(waiting.missing)} did not "
                                  f"respond within {t:.0f}s (alive but not in receive()? stuck?)")

    # ---- the broadcast ----

    def broadcast(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> dict:
        """Send `named_tensors` (consumed lazily) as `version` to every engine; returns transfer stats."""
        if self._broken or self._pg is None:
            raise WeightSyncError(
                f"weight-sync group is unusable ({self._broken or 'not connected'}); form a new one"
            )
        seq = self._seq
        self._seq += 1
        self._next_hdr = 0
        it = iter(named_tensors)
        t0 = time.perf_counter()
        try:
            self._await_all(seq, "ready", f"of version {version}, waiting for engines to start receiving")
            t1 = time.perf_counter()
            with torch.no_grad():
                nbytes, buckets, count = self._stream(it, seq, int(version))
            self._await_all(seq, "ack", f"of version {version}, waiting for engines to confirm")
        except BaseException as exc:
            self._broken = f"broadcast of version {version} failed: {exc}"
            try:  # wake engines waiting for the next header or for a bucket
                self._store.set(f"hdr/{seq}/{self._next_hdr}", dumps({"abort": self._broken}))
                self._store.set(f"abort/{seq}", self._broken.encode())
            except Exception:  # noqa: BLE001
                pass
            abort_backend(self._pg)
            if isinstance(exc, Exception):
                _drain(it)
            raise
        t2 = time.perf_counter()
        for key in ([f"hdr/{seq}/{i}" for i in range(self._next_hdr)]
                    + [f"{k}/{seq}/{r}" for k in ("ready", "ack") for r in self.engine_ranks]
                    + [f"nfail/{seq}"]):
            self._store.delete_key(key)
        # seconds: the whole call; wait_s: of it, waiting for engines to enter receive(); MiB/s over the rest
        return {"version": int(version), "bytes": nbytes, "tensors": count, "buckets": buckets,
                "engines": self.num_engines, "seconds": t2 - t0, "wait_s": t1 - t0,
                "mb_per_s": nbytes / 2**20 / max(t2 - t1, 1e-9)}

    def _stream(self, it: Iterator, seq: int, version: int) -> tuple[int, int, int]:
        # one packer for the group's life: its buckets are reused by every version (fresh 64 MiB host buffers
        # would be page-faulted in on each broadcast, which cost more than the transfer on CPU)
        if self._packer is None or self._packer.capacity != self.cfg.bucket_bytes:
            self._packer = Packer(self.cfg.bucket_bytes, self.device)
        packer = self._packer
        inflight: deque = deque()
        total = count = 0
        for item in it:
            name, tensor = item
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                raise TypeError(f"expected (name: str, tensor), got "
                                f"({type(name).__name__}, {type(tensor).__name__})")
            for b in packer.add(name, tensor, count):
                total += self._send(seq, version, b, inflight, packer)
            count += 1
        for b in packer.flush():
            total += self._send(seq, version, b, inflight, packer)
        while inflight:
            self._complete(inflight, packer, version)
        end = {"v": version, "end": True, "buckets": self._next_hdr, "tensors": count, "nbytes": total}
        self._store.set(f"hdr/{seq}/{self._next_hdr}", dumps(end))
        return total, self._next_hdr, count

    def _send(self, seq: int, version: int, b: Bucket, inflight: deque, packer: Packer) -> int:
        index = self._next_hdr
        nbytes = b.nbytes
        while len(inflight) >= MAX_INFLIGHT:
            self._complete(inflight, packer, version)
        self._store.set(f"hdr/{seq}/{index}", dumps(b.header(version, index)))
        self._next_hdr += 1
        if nbytes == 0:
            packer.release(b)
            return 0
        try:
            work = self._pg.broadcast(b.buf[:nbytes], 0)
        except Exception as exc:
            during = f"of version {version}, bucket {index}"
            raise self._watch.diagnose(seq, self.engine_ranks, during, exc) from exc
        inflight.append((work, b, index, seq))
        if b.borrowed:  # the caller may free or reuse that memory once we pull the next tensor
            while inflight:
                self._complete(inflight, packer, version)
        return nbytes

    def _complete(self, inflight: deque, packer: Packer, version: int) -> None:
        work, b, index, seq = inflight[0]
        during = f"of version {version}, bucket {index}"
        try:  # an engine dead or failed while a bucket is on its way means it cannot arrive: say so early
            wait_work(work, time.monotonic() + self.cfg.timeout_s,
                      lambda: self._watch.check(self.engine_ranks, during, seq))
        except WeightSyncError:
            raise
        except Exception as exc:
            raise self._watch.diagnose(seq, self.engine_ranks, during, exc) from exc
        inflight.popleft()
        packer.release(b)

    def close(self) -> None:
        """Tear the group down (engines blocked on it fail); safe to call twice."""
        failed = self._broken is not None
        self._broken = self._broken or "closed"
        box = [self._pg]
        self._pg = None
        release_backend(box, failed)
        self._watch.store = None
        self._store = None  # stops the store server: engines' store calls fail at once

    def __enter__(self) -> WeightSender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
