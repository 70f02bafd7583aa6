"""Weight broadcast to engines hosted as Ray actors: MiB/s of WeightSender -> 2 WeightReceivers per bucket size.

    python bench/weight_sync_ray.py                        # 50 MiB of float32, buckets of 64 and 8 MiB
    python bench/weight_sync_ray.py --mib 200 --engines 3 --buckets 64,16,4 --versions 5

Moved out of the test suite (it measured and asserted nothing there). The sender lives in this process; each
engine is a Ray actor that receives every version and copies it into its own tensors, as HFEngine does. A
local Ray cluster is started for the run. Each version's rate is the sender's own `mb_per_s` (per engine);
after the last version every engine's weights are checked bit for bit against what was sent (a SHA-256 per
tensor, weights/checksum.py). bench/limits_weights.py compares the same sender with a plain gloo broadcast.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read at `import ray`: loopback only

import ray  # noqa: E402
import torch  # noqa: E402

from protocol.components import WeightSyncConfig  # noqa: E402
from weights.checksum import checksums  # noqa: E402
from weights.sender import WeightSender  # noqa: E402

HOST = "127.0.0.1"


class Engine:
    """A stand-in rollout engine: name -> tensor, updated by copy like HFEngine.update_weights."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        torch.set_num_threads(1)
        self.model = {n: torch.zeros(shape) for n, shape in shapes.items()}
        self.rx = None

    def join(self, port: int, rank: int, num_engines: int, cfg: dict) -> None:
        from weights.receiver import WeightReceiver

        if self.rx is not None:
            self.rx.close()
        self.rx = WeightReceiver(HOST, port, rank, num_engines, WeightSyncConfig(**cfg), f"engine-{rank}")

    def receive(self) -> int:
        version, named = self.rx.receive()
        with torch.no_grad():
            for n, tensor in named:
                self.model[n].copy_(tensor)
        return version

    def checksums(self) -> dict[str, str]:
        return checksums(self.model.items())

    def close(self) -> None:
        if self.rx is not None:
            self.rx.close()
            self.rx = None


def run(mib: int, engines: int, buckets: list[float], versions: int) -> list[dict]:
    tensors = max(1, mib // 2)  # 1024 x 512 float32 = 2 MiB each
    big = [(f"layer{i}.weight", torch.randn(1024, 512)) for i in range(tensors)]
    actors = [ray.remote(num_cpus=0)(Engine).remote({n: tuple(t.shape) for n, t in big}) for _ in range(engines)]
    results = []
    try:
        for bucket_mb in buckets:
            cfg = WeightSyncConfig(bucket_mb=bucket_mb, timeout_s=60, heartbeat_s=1.0)
            sender = WeightSender(HOST, 0, engines, cfg, connect=False)
            try:
                joins = [a.join.remote(sender.port, r, engines, asdict(cfg)) for r, a in enumerate(actors, 1)]
                sender.connect()
                ray.get(joins)
                rates = []
                for version in range(1, versions + 1):
                    recv = [a.receive.remote() for a in actors]
                    stats = sender.broadcast(iter(big), version)
                    if ray.get(recv) != [version] * engines:
                        raise RuntimeError(f"engines did not all receive version {version}")
                    rates.append(stats["mb_per_s"])
                exact = all(c == checksums(big) for c in ray.get([a.checksums.remote() for a in actors]))
                results.append({"bucket_mb": bucket_mb, "mib_per_s": rates, "buckets": stats["buckets"],
                                "last_s": stats["seconds"], "bit_exact": exact})
                print(f"bucket_mb={bucket_mb:g}: {tensors * 2} MiB to {engines} engines: "
                      f"{[f'{r:.0f}' for r in rates]} MiB/s per engine ({stats['buckets']} buckets, "
                      f"{stats['seconds']:.3f}s last; bit-exact: {'yes' if exact else 'NO'})", flush=True)
            finally:
                ray.get([a.close.remote() for a in actors])
                sender.close()
    finally:
        for a in actors:
            ray.kill(a)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=50, help="MiB of float32 weights (2 MiB tensors)")
    ap.add_argument("--engines", type=int, default=2)
    ap.add_argument("--buckets", default="64,8", help="weight_sync.bucket_mb values, comma-separated")
    ap.add_argument("--versions", type=int, default=3, help="broadcasts per bucket size")
    args = ap.parse_args()
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        results = run(args.mib, args.engines, [float(b) for b in args.buckets.split(",")], args.versions)
    finally:
        ray.shutdown()
    return 0 if all(r["bit_exact"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
