"""Learner rank 0 -> rollout engines: broadcast new weights after each step, with a timeout on every wait.

    sender = WeightSender(host, port, num_engines, cfg)                      # learner rank 0
    stats = sender.broadcast(((n, p) for n, p in model.named_parameters() if p.requires_grad), version)
    receiver = WeightReceiver(host, port, rank, num_engines, cfg, name)      # engine `rank` in 1..num_engines
    version, named = receiver.receive(); engine.update_weights(named, version)

Parameters are consumed lazily, one at a time, and copied into flat per-dtype buckets of at most
`bucket_mb` (a larger tensor is sent on its own, straight from the caller's memory) before the next one is
pulled, so a ZeRO-3 caller may gather each parameter just before yielding it and release it after. A JSON
header per bucket (version, names, shapes, dtype, offsets) goes through the group's store ahead of the data,
so engines need no prior knowledge and check what arrives. Each engine confirms a version with an ack key;
an engine that is dead (its heartbeat stopped), stuck (never starts or never confirms) or failed is named in
a `WeightSyncError` raised within about `timeout_s` (plus a few heartbeats to tell who died). After an error
the group is unusable: close both sides and form a new one (a new port; a replacement engine may join).
The group itself lives in `weights.group`.
"""
from __future__ import annotations

import os
import socket
import time
from collections import deque
from collections.abc import Iterable, Iterator

import torch

from protocol.components import WeightSyncConfig
from weights.group import (
    Bucket,
    Heartbeat,
    Packer,
    Watch,
    WeightSyncError,
    abort_backend,
    backend_device,
    check_header,
    dumps,
    get_key,
    loads,
    new_backend,
    open_store,
    pending,
    release_backend,
    resolve_backend,
    wait_for,
    wait_work,
)

__all__ = ["WeightSyncConfig", "WeightSyncError", "WeightSender", "WeightReceiver"]

MAX_INFLIGHT = 2  # buckets on the wire at once per side (memory: this many + one open bucket per dtype)


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
        self.host, self.num_engines, self.world = host, num_engines, num_engines + 1
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
            raise WeightSyncError(f"weight-sync group {self.host}:{self.port} is already {self._broken or 'connected'}")
        t = self.cfg.timeout_s
        deadline = time.monotonic() + t
        joins = {r: f"join/{r}" for r in self.engine_ranks}
        missing = list(joins)

        def all_joined() -> bool:
            nonlocal missing
            missing = pending(self._store, {r: joins[r] for r in missing})
            return not missing

        def health() -> None:
            joined = [r for r in joins if r not in missing]
            for r in joined:
                if r not in self.names:
                    self.names[r] = self._store.get(joins[r]).decode()
            self._watch.check(joined, "while the group was forming")

        try:
            ok = wait_for(all_joined, deadline, health)
            if not ok:
                health()
        except WeightSyncError:
            self.close()  # engines blocked in the rendezvous fail at once instead of at their timeout
            raise
        if not ok:
            self.close()
            raise WeightSyncError(
                f"weight-sync group {self.host}:{self.port}: engine rank(s) {missing} never joined within {t:.0f}s "
                f"(joined: {self._watch.who(r for r in joins if r not in missing) or 'none'})")
        self.names.update({r: self._store.get(k).decode() for r, k in joins.items()})
        try:
            self._pg = new_backend(self.host, self.port, 0, self.world, self.backend, t)
        except Exception as exc:
            err = self._watch.diagnose(None, self.engine_ranks, "forming the group", exc)
            self.close()
            raise err from exc

    # ---- failure detection ----

    def _await_all(self, seq: int, kind: str, during: str) -> None:
        keys = {r: f"{kind}/{seq}/{r}" for r in self.engine_ranks}
        missing = list(keys)

        def done() -> bool:
            nonlocal missing
            missing = pending(self._store, {r: keys[r] for r in missing})
            return not missing

        t = self.cfg.timeout_s
        if not wait_for(done, time.monotonic() + t, lambda: self._watch.check(missing, during, seq)):
            self._watch.check(missing, during, seq)
            raise WeightSyncError(f"weight sync {during}: engine {self._watch.who(missing)} did not respond within {t:.0f}s "
                                  f"(alive but not in receive()? stuck?)")

    # ---- the broadcast ----

    def broadcast(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> dict:
        """Send `named_tensors` (consumed lazily) as `version` to every engine; returns transfer stats."""
        if self._broken or self._pg is None:
            raise WeightSyncError(f"weight-sync group is unusable ({self._broken or 'not connected'}); form a new one")
        seq, self._seq, self._next_hdr = self._seq, self._seq + 1, 0
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
                    + [f"{k}/{seq}/{r}" for k in ("ready", "ack") for r in self.engine_ranks] + [f"nfail/{seq}"]):
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
                raise TypeError(f"expected (name: str, tensor), got ({type(name).__name__}, {type(tensor).__name__})")
            for b in packer.add(name, tensor, count):
                total += self._send(seq, version, b, inflight, packer)
            count += 1
        for b in packer.flush():
            total += self._send(seq, version, b, inflight, packer)
        while inflight:
            self._complete(inflight, packer, version)
        self._store.set(f"hdr/{seq}/{self._next_hdr}",
                        dumps({"v": version, "end": True, "buckets": self._next_hdr, "tensors": count, "nbytes": total}))
        return total, self._next_hdr, count

    def _send(self, seq: int, version: int, b: Bucket, inflight: deque, packer: Packer) -> int:
        index, nbytes = self._next_hdr, b.nbytes
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
            raise self._watch.diagnose(seq, self.engine_ranks, f"of version {version}, bucket {index}", exc) from exc
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
        box, self._pg = [self._pg], None
        release_backend(box, failed)
        self._watch.store = None
        self._store = None  # stops the store server: engines' store calls fail at once

    def __enter__(self) -> WeightSender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class WeightReceiver:
    """Engine side: joins the group as `rank` (1..num_engines) and receives whole versions."""

    def __init__(self, host: str, port: int, rank: int, num_engines: int, cfg: WeightSyncConfig | None = None,
                 name: str | None = None) -> None:
        if not 1 <= rank <= num_engines:
            raise ValueError(f"engine rank must be in 1..{num_engines}, got {rank}")
        self.cfg = cfg or WeightSyncConfig()
        self.backend = resolve_backend(self.cfg.backend)
        self.device = backend_device(self.backend)
        self.rank, self.world = rank, num_engines + 1
        self.name = name or f"engine-{rank} (pid {os.getpid()}, host {socket.gethostname()})"
        self._seq, self._broken, self._pg, self._hb = 0, None, None, None
        self._buffers: dict[int, list[torch.Tensor]] = {}  # receive buffers by size, reused by the next version
        t = self.cfg.timeout_s
        try:
            self._store = open_store(host, port, False, t)
            meta = loads(get_key(self._store, "meta", t))
        except Exception as exc:
            raise WeightSyncError(f"{self.name}: no weight-sync group at {host}:{port} within {t:.0f}s: {exc}") from exc
        if meta != {"world": self.world, "backend": self.backend}:
            raise WeightSyncError(f"{self.name}: group at {host}:{port} is {meta}, this engine expects "
                                  f"world {self.world} on {self.backend}")
        if int(self._store.add(f"claim/{rank}", 1)) != 1:
            raise WeightSyncError(f"{self.name}: rank {rank} of {host}:{port} is already taken")
        self._store.add(f"hb/{rank}", 1)
        self._hb = Heartbeat(host, port, rank, self.cfg.heartbeat_s, t)
        self._store.set(f"join/{rank}", self.name)
        try:
            self._pg = new_backend(host, port, rank, self.world, self.backend, t)
        except Exception as exc:
            self.close()
            raise WeightSyncError(f"{self.name}: forming the weight-sync group at {host}:{port} failed "
                                  f"(rank 0 gone or another engine missing): {exc}") from exc

    def receive(self, start_timeout_s: float | None = None) -> tuple[int, list[tuple[str, torch.Tensor]]]:
        """Block until a whole version has arrived and checked out; returns (version, [(name, tensor)]).

        Waits up to `start_timeout_s` (default 2 x timeout_s) for rank 0 to begin, then `timeout_s` per step.
        Nothing is returned before every bucket has arrived, so a failed transfer never half-updates an engine.
        The tensors view receive buffers that the next receive() reuses: load them before calling it again.
        """
        if self._broken or self._pg is None:
            raise WeightSyncError(f"{self.name}: weight-sync group is unusable ({self._broken}); join a new one")
        seq, self._seq = self._seq, self._seq + 1
        t = self.cfg.timeout_s

        def aborted() -> None:  # polled while a bucket is on its way: rank 0 gave up, so will we
            if self._store.check([f"abort/{seq}"]):
                raise WeightSyncError(f"{self.name}: rank 0 aborted the broadcast: "
                                      f"{self._store.get(f'abort/{seq}').decode()}")

        spare, used = self._buffers, {}  # the last version's buffers (same sizes each version: same parameters)
        self._buffers = used
        try:
            self._store.set(f"ready/{seq}/{self.rank}", b"1")
            got, inflight, version, index, total = [], deque(), None, 0, 0
            while True:
                hdr = loads(get_key(self._store, f"hdr/{seq}/{index}",
                                    (start_timeout_s or 2 * t) if index == 0 else t))
                if "abort" in hdr:
                    raise WeightSyncError(f"{self.name}: rank 0 aborted the broadcast: {hdr['abort']}")
                version = hdr.get("v") if version is None else version
                if hdr.get("end"):
                    break
                dtype, entries = check_header(hdr, index, version)
                if hdr["nbytes"]:
                    pool = spare.get(hdr["nbytes"])
                    buf = pool.pop() if pool else torch.empty(hdr["nbytes"], dtype=torch.uint8, device=self.device)
                    used.setdefault(hdr["nbytes"], []).append(buf)
                    while len(inflight) >= MAX_INFLIGHT:
                        wait_work(inflight.popleft(), time.monotonic() + t, aborted)
                    inflight.append(self._pg.broadcast(buf, 0))
                    flat = buf.view(dtype)
                    got += [(order, name, flat[off:off + n].view(shape)) for name, shape, off, n, order in entries]
                else:
                    got += [(order, name, torch.empty(shape, dtype=dtype, device=self.device))
                            for name, shape, _, _, order in entries]
                total += hdr["nbytes"]
                index += 1
            while inflight:
                wait_work(inflight.popleft(), time.monotonic() + t, aborted)
            got.sort(key=lambda x: x[0])
            if (hdr.get("v") != version or hdr["buckets"] != index or hdr["nbytes"] != total
                    or [o for o, _, _ in got] != list(range(hdr["tensors"]))):
                raise WeightSyncError(f"{self.name}: version {version} incomplete: got {index} buckets, {len(got)} "
                                      f"tensors, {total} bytes; rank 0 sent {hdr}")
            self._store.set(f"ack/{seq}/{self.rank}", str(version).encode())
        except Exception as exc:
            self._broken = str(exc)
            abort_backend(self._pg)  # on NCCL, frees a kernel still waiting for a rank 0 that is gone
            try:
                self._store.set(f"fail/{seq}/{self.rank}", f"{type(exc).__name__}: {exc}".encode())
                self._store.add(f"nfail/{seq}", 1)
            except Exception:  # noqa: BLE001 - rank 0 may be gone: that is what we report anyway
                pass
            if isinstance(exc, WeightSyncError):
                raise
            raise WeightSyncError(f"{self.name}: receiving weights failed: {type(exc).__name__}: {exc}") from exc
        return version, [(name, tensor) for _, name, tensor in got]

    def close(self) -> None:
        """Leave the group; returns at once even when a failed transfer left a collective pending."""
        failed = self._broken is not None
        self._broken = self._broken or "closed"
        if self._hb is not None:
            self._hb.stop()
        box, self._pg = [self._pg], None
        release_backend(box, failed)
        self._hb, self._store = None, None

    def __enter__(self) -> WeightReceiver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
