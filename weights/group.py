"""The stateless process group behind the learner -> rollout-engine weight broadcast.

Rank 0 is learner rank 0 (the source); ranks 1..K are the engines. The group is built from its own
`TCPStore` (hosted by rank 0) and a backend object (`ProcessGroupGloo` on CPU, `ProcessGroupNCCL` on GPU),
never through `torch.distributed.init_process_group`: the learners' default group is neither touched nor
required, and forming a fresh group (a new port, a replacement engine) costs one store and one backend.

Store keys (all small):
  meta              rank 0: {"world": K+1, "backend": ...}
  claim/{r}         counter; a second receiver claiming rank r is refused
  join/{r}          engine r's human-readable name, set once it has joined
  hb/{r}            heartbeat counter, bumped by a thread in engine r every heartbeat_s
  ready/{s}/{r}     engine r has entered receive() for the s-th broadcast of this group
  hdr/{s}/{i}       JSON header of bucket i of broadcast s (or {"end": ...} / {"abort": reason})
  ack/{s}/{r}       engine r received and verified broadcast s
  fail/{s}/{r}      engine r failed broadcast s (the reason); nfail/{s} counts them
  pg/...            the backend's own rendezvous

Wire format: a bucket is one flat run of a single dtype, broadcast as bytes; its header lists
[name, shape, offset, numel, order] per tensor (offsets in elements, contiguous; order = position in the
caller's iteration). The "end" header carries the totals (buckets, tensors, bytes) that engines check.
"""
from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterable
from datetime import timedelta

import torch
import torch.distributed as dist

from protocol.components import WEIGHT_SYNC_BACKENDS as BACKENDS
from protocol.components import WeightSyncConfig
from weights.network import bind_collectives, gloo_devices, route_source

MAX_INFLIGHT = 2  # buckets on the wire at once per side (memory: this many + one open bucket per dtype)
POLL_S = 0.01  # how often store keys are polled while waiting
HEALTH_EVERY_S = 0.2  # how often heartbeats and failure reports are read while waiting


class WeightSyncError(RuntimeError):
    """The weight broadcast cannot complete; the message names the engine(s) at fault.

    After it is raised the group is unusable on every side: close it and form a new one. `silent_ranks`: the
    group ranks whose heartbeat had stopped (dead or frozen), so the caller can replace those engines at once.
    """

    def __init__(self, message: str, silent_ranks: Iterable[int] = ()) -> None:
        super().__init__(message)
        self.silent_ranks = tuple(silent_ranks)

    def __reduce__(self):  # crosses Ray as the cause of a RayTaskError: keep the ranks
        return type(self), (str(self), self.silent_ranks)


# ---- the one place that knows about backends ----

def resolve_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown weight-sync backend {name!r}; expected one of {BACKENDS}")
    if name == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return name


def backend_device(backend: str) -> torch.device:
    """Where buckets live: the current CUDA device for NCCL, the CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def new_backend(host: str, port: int, rank: int, world: int, backend: str, timeout_s: float):
    """The collective backend, connected: returns once every rank has joined and one collective went through
    (or raises at the timeout).

    It gets its own store connection: a TCPStore client serialises its calls, so a backend thread waiting on
    a key (NCCL's lazy init, its watchdog) would otherwise stall our polling, and vice versa.
    """
    store = dist.PrefixStore("pg", open_store(host, port, False, timeout_s))
    if backend == "gloo":
        # bound to the address that reaches rank 0, not the hostname's (127.0.0.1 on many hosts)
        opts = dist.ProcessGroupGloo._Options()
        opts._devices = gloo_devices(host)
        opts._timeout = timedelta(seconds=timeout_s)
        return connected(dist.ProcessGroupGloo(store, rank, world, opts), backend, timeout_s)
    if backend == "nccl":
        bind_collectives(route_source(host))  # NCCL_SOCKET_IFNAME, unless the user set it
        nccl = getattr(dist, "ProcessGroupNCCL", None)
        if nccl is None or not torch.cuda.is_available():
            raise WeightSyncError("weight_sync.backend is nccl but this torch has no CUDA/NCCL")
        opts = nccl.Options()
        # We time every collective ourselves and abort() on our deadline; NCCL's own watchdog (which by
        # default tears the process down) is only a backstop, so it gets a longer fuse than ours.
        opts._timeout = timedelta(seconds=timeout_s + 60)
        return connected(nccl(store, rank, world, opts), backend, timeout_s)
    raise ValueError(f"unknown backend {backend!r}")


def connected(pg, backend: str, timeout_s: float):
    """One 1-element broadcast from rank 0 before the group counts as formed. NCCL builds its communicators
    lazily, inside the first collective: without this the rendezvous would happen in the first weight
    broadcast, outside the formation deadline, and an engine lost in between would hang rank 0 there."""
    probe = torch.zeros(1, device=backend_device(backend))
    try:
        wait_work(pg.broadcast(probe, 0), time.monotonic() + timeout_s)
    except Exception:
        abort_backend(pg)
        raise
    return pg


def abort_backend(pg) -> None:
    """Best effort: cancel pending collectives (NCCL: frees kernels waiting on a dead peer; gloo: no
    effect)."""
    if pg is None:
        return
    try:
        pg.abort()
    except Exception:  # noqa: BLE001 - not every backend/version supports it
        pass


def release_backend(box: list, failed: bool) -> None:
    """Drop the backend in `box` (emptied). After a failure a gloo op may still be pending, and the backend's
    destructor waits for it (up to the group timeout), so it is dropped on another thread instead of here.
    That thread is not a daemon: a process exiting meanwhile waits for it (at most the group timeout) rather
    than abort in the middle of the destructor (SIGABRT, "terminate called without an active exception")."""
    if not box or box[0] is None:
        box.clear()
        return
    if not failed:
        try:
            box[0].shutdown()  # NCCL: frees its communicators now, not whenever the object is collected
        except Exception:  # noqa: BLE001 - best effort; the object is dropped either way
            pass
        box.clear()
        return
    abort_backend(box[0])
    threading.Thread(target=box.clear, name="weight-sync-release", daemon=False).start()


# ---- the wire format: flat per-dtype buckets, described by a JSON header ----

class Bucket:
    """A flat run of one dtype: `buf` is uint8 storage; entries are [name, shape, offset, numel, order]."""

    __slots__ = ("dtype", "buf", "used", "entries", "borrowed")

    def __init__(self, dtype: torch.dtype, buf: torch.Tensor, borrowed: bool = False) -> None:
        self.dtype = dtype
        self.buf = buf
        self.borrowed = borrowed  # True: `buf` is the caller's own memory (a tensor larger than a bucket)
        self.used = 0  # elements of `dtype` filled so far
        self.entries = []

    @property
    def nbytes(self) -> int:
        return self.used * self.dtype.itemsize

    def header(self, version: int, index: int) -> dict:
        return {"v": version, "i": index, "dtype": str(self.dtype).removeprefix("torch."),
                "nbytes": self.nbytes, "t": self.entries}


class Packer:
    """Copies tensors into per-dtype buckets; hands back the buckets that are ready to send."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.capacity = capacity
        self.device = device
        self.open: dict[torch.dtype, Bucket] = {}
        self.free: list[torch.Tensor] = []

    def add(self, name: str, tensor: torch.Tensor, order: int) -> list[Bucket]:
        t = tensor.detach()
        entry = [name, list(t.shape), 0, t.numel(), order]
        if t.numel() * t.element_size() > self.capacity:  # its own bucket, sent from the caller's memory
            b = Bucket(t.dtype, t.to(self.device).contiguous().reshape(-1).view(torch.uint8), borrowed=True)
            b.used = t.numel()
            b.entries = [entry]
            return [b]
        ready = []
        b = self.open.get(t.dtype)
        if b is not None and (b.used + t.numel()) * t.element_size() > self.capacity:
            ready.append(self.open.pop(t.dtype))
            b = None
        if b is None:
            if self.free:
                buf = self.free.pop()
            else:
                buf = torch.empty(self.capacity, dtype=torch.uint8, device=self.device)
            b = self.open[t.dtype] = Bucket(t.dtype, buf)
        entry[2] = b.used
        b.buf.view(t.dtype)[b.used:b.used + t.numel()].view(t.shape).copy_(t)
        b.used += t.numel()
        b.entries.append(entry)
        return ready

    def flush(self) -> list[Bucket]:
        ready = [b for b in self.open.values() if b.entries]
        self.open.clear()
        return ready

    def release(self, b: Bucket) -> None:
        if not b.borrowed:
            self.free.append(b.buf)


def check_header(hdr: dict, index: int, version: int) -> tuple[torch.dtype, list]:
    """Check a bucket header against itself; returns (dtype, entries)."""
    if hdr.get("i") != index or hdr.get("v") != version:
        raise WeightSyncError(f"bucket header out of order: expected bucket {index} of version {version}, "
                              f"got {hdr.get('i')} of {hdr.get('v')}")
    dtype = getattr(torch, str(hdr.get("dtype")), None)
    if not isinstance(dtype, torch.dtype):
        raise WeightSyncError(f"bucket {index}: unknown dtype {hdr.get('dtype')!r}")
    nbytes = hdr["nbytes"]
    end = 0  # where the next entry must start, in elements
    if nbytes % dtype.itemsize:
        raise WeightSyncError(f"bucket {index}: {nbytes} bytes is not a whole number of {dtype}")
    for name, shape, offset, numel, _order in hdr["t"]:
        if offset != end or math.prod(shape) != numel:
            raise WeightSyncError(f"bucket {index}: bad layout for {name!r} (offset {offset}, "
                                  f"shape {shape}, numel {numel}, expected offset {end})")
        end += numel
    if end * dtype.itemsize != nbytes:
        raise WeightSyncError(
            f"bucket {index}: entries cover {end * dtype.itemsize} bytes, header says {nbytes}"
        )
    return dtype, hdr["t"]


# ---- store helpers ----

def open_store(host: str, port: int, is_master: bool, timeout_s: float) -> dist.TCPStore:
    """Rank 0 hosts (port 0 = pick a free one, see `.port`); others connect, retrying until the
    timeout."""
    return dist.TCPStore(host, port, None, is_master, timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def loads(raw: bytes):
    return json.loads(raw.decode())


def get_key(store: dist.Store, key: str, timeout_s: float) -> bytes:
    """`store.get` that gives up after `timeout_s` (and at once if the store host is gone)."""
    store.wait([key], timedelta(seconds=max(timeout_s, 0.001)))
    return store.get(key)


class Awaiting:
    """Ranks whose store key is not set yet, re-read on each call: a `wait_for` predicate (True when none
    is missing) whose `missing` names the stragglers once it gives up."""

    def __init__(self, store: dist.Store, keys: dict[int, str]) -> None:
        self.store = store
        self.keys = keys  # rank -> the key it sets
        self.missing = list(keys)

    def __call__(self) -> bool:
        self.missing = [r for r in self.missing if not self.store.check([self.keys[r]])]
        return not self.missing


class Watch:
    """Rank 0's view of engine health: registered names, heartbeats, failure reports; builds the errors."""

    def __init__(self, store: dist.Store, cfg: WeightSyncConfig) -> None:
        self.store = store
        self.cfg = cfg
        self.names: dict[int, str] = {}  # rank -> name registered at join
        self.seen: dict[int, tuple[bytes, float]] = {}  # rank -> (last heartbeat value, when it changed)

    def who(self, ranks: Iterable[int]) -> str:
        return ", ".join(f"rank {r} {self.names.get(r, '(never joined)')!r}" for r in sorted(ranks))

    def silent_for(self, rank: int) -> float:
        return time.monotonic() - self.seen[rank][1] if rank in self.seen else 0.0

    def findings(self, ranks: list[int], seq: int | None) -> tuple[dict[int, str], list[int]]:
        """(engines that reported a failure of broadcast `seq`, engines among `ranks` whose heartbeat
        stopped)."""
        failed = {}
        if seq is not None and int(self.store.add(f"nfail/{seq}", 0)) > 0:
            failed = {r: self.store.get(f"fail/{seq}/{r}").decode() for r in self.names
                      if self.store.check([f"fail/{seq}/{r}"])}
        known = list(self.names)
        now = time.monotonic()
        beats = self.store.multi_get([f"hb/{r}" for r in known]) if known else []
        for r, val in zip(known, beats):
            if r not in self.seen or self.seen[r][0] != val:
                self.seen[r] = (val, now)
        return failed, [r for r in ranks if self.silent_for(r) > self.cfg.stale_s]

    def error(self, during: str, failed: dict[int, str], dead: list[int]) -> WeightSyncError:
        if dead:
            silent = max(self.silent_for(r) for r in dead)
            return WeightSyncError(f"weight sync {during}: engine {self.who(dead)} is gone "
                                   f"(no heartbeat for {silent:.1f}s: dead or frozen)", dead)
        return WeightSyncError(f"weight sync {during}: " + "; ".join(
            f"engine {self.who([r])} failed: {msg}" for r, msg in failed.items()))

    def check(self, ranks: list[int], during: str, seq: int | None = None) -> None:
        """Raise naming engines among `ranks` whose heartbeat stopped, or any that reported a failure."""
        failed, dead = self.findings(ranks, seq)
        if failed or dead:
            raise self.error(during, failed, dead)

    def diagnose(
        self, seq: int | None, suspects: list[int], during: str, exc: BaseException
    ) -> WeightSyncError:
        """After a collective failed: watch heartbeats for a few beats to learn which engine died.

        A dead engine is named as soon as it is seen; failures that engines report are only named if
        nobody died in that window (a survivor's own error is usually a consequence of the death)."""
        found: list = [{}, []]

        def someone_dead() -> bool:
            found[:] = self.findings(suspects, seq)
            return bool(found[1])

        wait_for(someone_dead, time.monotonic() + self.cfg.stale_s + 2 * self.cfg.heartbeat_s, max_sleep=0.1)
        if found[0] or found[1]:
            return WeightSyncError(f"{self.error(during, *found)} [backend error: {exc}]", found[1])
        return WeightSyncError(f"weight sync {during} failed: {type(exc).__name__}: {exc}; no engine "
                               f"reported a failure or stopped its heartbeat; "
                               f"unconfirmed: {self.who(suspects)}")


class Heartbeat:
    """An engine-side thread bumping hb/{rank} on its own store connection until stopped or the store
    goes."""

    def __init__(self, host: str, port: int, rank: int, interval_s: float, timeout_s: float) -> None:
        self._stop = threading.Event()
        self._args = (host, port, f"hb/{rank}", interval_s, timeout_s)
        self._thread = threading.Thread(target=self._run, name=f"weight-sync-heartbeat-{rank}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        host, port, key, interval_s, timeout_s = self._args
        try:
            store = open_store(host, port, False, timeout_s)
            while not self._stop.wait(interval_s):
                store.add(key, 1)
        except Exception:  # noqa: BLE001 - the store is gone (rank 0 closed or died): stop beating
            return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)


def wait_for(done: Callable[[], bool], deadline: float, health: Callable[[], None] | None = None,
             max_sleep: float = POLL_S) -> bool:
    """Poll `done` until it holds (True) or `deadline` (monotonic) passes (False); `health` may raise."""
    next_health = 0.0
    sleep = 0.0
    while True:
        if done():
            return True
        now = time.monotonic()
        if health is not None and now >= next_health:
            health()
            next_health = now + HEALTH_EVERY_S
        if now >= deadline:
            return False
        time.sleep(sleep)
        sleep = min(max_sleep, sleep * 2 + 1e-4)


def wait_work(work, deadline: float, health: Callable[[], None] | None = None) -> None:
    """Wait for a collective without blocking past `deadline`; re-raises the backend's error."""
    if not wait_for(work.is_completed, deadline, health, max_sleep=0.002):
        raise TimeoutError("collective did not complete in time")
    work.wait()  # raises the stored error if it failed; on NCCL also orders the current stream after it
