"""An engine's side of the weight-sync group: join as rank 1..K, receive whole versions.

    receiver = WeightReceiver(host, port, rank, num_engines, cfg, name)
    version, named = receiver.receive()
    engine.update_weights(named, version)

Each header is checked before its bucket is received and the totals before anything is returned, so a
failed transfer never half-updates an engine; the protocol is described in `weights` (the package).
"""
from __future__ import annotations

import os
import socket
import time
from collections import deque

import torch

from protocol.components import WeightSyncConfig
from weights.group import (
    MAX_INFLIGHT,
    Heartbeat,
    WeightSyncError,
    abort_backend,
    backend_device,
    check_header,
    get_key,
    loads,
    new_backend,
    open_store,
    release_backend,
    resolve_backend,
    wait_work,
)


class WeightReceiver:
    """Engine side: joins the group as `rank` (1..num_engines) and receives whole versions."""

    def __init__(self, host: str, port: int, rank: int, num_engines: int,
                 cfg: WeightSyncConfig | None = None, name: str | None = None) -> None:
        if not 1 <= rank <= num_engines:
            raise ValueError(f"engine rank must be in 1..{num_engines}, got {rank}")
        self.cfg = cfg or WeightSyncConfig()
        self.backend = resolve_backend(self.cfg.backend)
        self.device = backend_device(self.backend)
        self.rank = rank
        self.world = num_engines + 1
        self.name = name or f"engine-{rank} (pid {os.getpid()}, host {socket.gethostname()})"
        self._seq = 0
        self._broken: str | None = None
        self._pg = None
        self._hb: Heartbeat | None = None
        # receive buffers by size, reused by the next version
        self._buffers: dict[int, list[torch.Tensor]] = {}
        t = self.cfg.timeout_s
        try:
            self._store = open_store(host, port, False, t)
            meta = loads(get_key(self._store, "meta", t))
        except Exception as exc:
            raise WeightSyncError(
                f"{self.name}: no weight-sync group at {host}:{port} within {t:.0f}s: {exc}"
            ) from exc
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

        Waits up to `start_timeout_s` (default 2 x timeout_s) for rank 0 to begin, then `timeout_s` per
        step. Nothing is returned before every bucket has arrived, so a failed transfer never half-updates
        an engine. The tensors view receive buffers that the next receive() reuses: load them before
        calling it again.
        """
        if self._broken or self._pg is None:
            raise WeightSyncError(
                f"{self.name}: weight-sync group is unusable ({self._broken}); join a new one"
            )
        seq = self._seq
        self._seq += 1
        t = self.cfg.timeout_s

        def aborted() -> None:  # polled while a bucket is on its way: rank 0 gave up, so will we
            if self._store.check([f"abort/{seq}"]):
                raise WeightSyncError(f"{self.name}: rank 0 aborted the broadcast: "
                                      f"{self._store.get(f'abort/{seq}').decode()}")

        spare = self._buffers  # the last version's buffers (same sizes each version: same parameters)
        used: dict[int, list[torch.Tensor]] = {}
        self._buffers = used
        try:
            self._store.set(f"ready/{seq}/{self.rank}", b"1")
            got = []  # (order, name, tensor)
            inflight: deque = deque()
            version = None
            index = 0
            total = 0
            while True:
                wait_s = (start_timeout_s or 2 * t) if index == 0 else t
                hdr = loads(get_key(self._store, f"hdr/{seq}/{index}", wait_s))
                if "abort" in hdr:
                    raise WeightSyncError(f"{self.name}: rank 0 aborted the broadcast: {hdr['abort']}")
                version = hdr.get("v") if version is None else version
                if hdr.get("end"):
                    break
                dtype, entries = check_header(hdr, index, version)
                if hdr["nbytes"]:
                    pool = spare.get(hdr["nbytes"])
                    if pool:
                        buf = pool.pop()
                    else:
                        buf = torch.empty(hdr["nbytes"], dtype=torch.uint8, device=self.device)
                    used.setdefault(hdr["nbytes"], []).append(buf)
                    while len(inflight) >= MAX_INFLIGHT:
                        wait_work(inflight.popleft(), time.monotonic() + t, aborted)
                    inflight.append(self._pg.broadcast(buf, 0))
                    flat = buf.view(dtype)
                    got += [(order, name, flat[off:off + n].view(shape))
                            for name, shape, off, n, order in entries]
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
                raise WeightSyncError(f"{self.name}: version {version} incomplete: got {index} buckets, "
                                      f"{len(got)} tensors, {total} bytes; rank 0 sent {hdr}")
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
            raise WeightSyncError(
                f"{self.name}: receiving weights failed: {type(exc).__name__}: {exc}"
            ) from exc
        return version, [(name, tensor) for _, name, tensor in got]

    def close(self) -> None:
        """Leave the group; returns at once even when a failed transfer left a collective pending."""
        failed = self._broken is not None
        self._broken = self._broken or "closed"
        if self._hb is not None:
            self._hb.stop()
        box = [self._pg]
        self._pg = None
        release_backend(box, failed)
        self._hb = None
        self._store = None

    def __enter__(self) -> WeightReceiver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
