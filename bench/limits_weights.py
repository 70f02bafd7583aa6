"""Weight broadcast: MB/s of clsrl's WeightSender -> K WeightReceivers over a plain gloo broadcast of one flat tensor.

    python bench/limits_weights.py --out runs/bench-limits          # ~1 min idle
    python bench/limits_weights.py --quick

K + 1 processes (rank 0 = the learner's sender, ranks 1..K = engines) hold two groups side by side: clsrl's
stateless weight-sync group (weights/sender.py: per-dtype buckets, JSON headers through the store, acks)
and a default `torch.distributed` gloo group. Each round times both on the same processes, in alternating
order: clsrl's `broadcast` of every named parameter of a real model (its own `mb_per_s`: from the first bucket
to the last engine's ack, excluding the wait for engines to enter `receive`), and `dist.broadcast` of one flat
uint8 tensor of the same byte count followed by a barrier (so both end when every engine has the data). The
engines check what they received: the SHA-256 of every tensor of the last version (name, dtype, shape,
bytes; weights/checksum.py) must equal the sender's.
Engines only receive; copying into an engine's parameters (`update_weights`) is not part of either side.
Also projects the broadcast time of a 2B-parameter bf16 model on this link and on GPU links (cited below).
"""
from __future__ import annotations

import multiprocessing as mp
import socket
import time

import limits_common as lc

TARGET = 0.8
MiB = 2**20
PROJECT_PARAMS = 2e9  # "a 2B model"; Qwen2-VL-2B-Instruct has about 2.2e9
# GPU links, per GPU and direction. NCCL's broadcast is a pipelined ring, so its algorithm bandwidth equals its
# bus bandwidth (nccl-tests doc/PERFORMANCE.md: broadcast busbw = algbw), independent of the number of engines.
GPU_LINKS = {
    # NVIDIA H100 SXM datasheet: NVLink 4, 900 GB/s total per GPU = 450 GB/s each direction (engines in the node)
    "NVLink 4 (H100 SXM, 450 GB/s per direction)": 450e9,
    # NVIDIA ConnectX-7 / Quantum-2 NDR InfiniBand: 400 Gb/s per port = 50 GB/s (DGX H100: one port per GPU)
    "InfiniBand NDR (400 Gb/s per GPU)": 50e9,
}
HBM_BYTES_PER_S = 3.35e12  # NVIDIA H100 SXM datasheet: HBM3 3.35 TB/s (packing buckets is a device copy there)
LINK_EFFICIENCY = 0.8  # assumption: achievable fraction of the link (nccl-tests typically reach 75-90% of peak)


# (model size, weight_sync.bucket_mb): the default 64 MiB buckets, and smaller / larger ones on the big model
VARIANTS = [("tiny", 64), ("large", 64), ("large", 8), ("large", 256)]
QUICK_VARIANTS = [("tiny", 64)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def named_parameters(model_dir: str) -> list:
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    return [(n, p.detach()) for n, p in model.named_parameters()]


def checksum(named: list):
    """The 32-byte SHA-256 of every (name, tensor), as a uint8 tensor to all_gather."""
    import torch

    from weights.checksum import digest

    return torch.tensor(list(bytes.fromhex(digest(named))), dtype=torch.uint8)


def rank_main(rank: int, k: int, ports: tuple[int, int], variants: list[tuple[str, str, float]], rounds: int,
              results) -> None:
    """One process of the group: rank 0 sends, others receive; rank 0 puts its timings on `results`."""
    import torch
    import torch.distributed as dist

    from protocol.components import WeightSyncConfig
    from weights.receiver import WeightReceiver
    from weights.sender import WeightSender

    torch.set_num_threads(1)
    cfg = WeightSyncConfig(backend="gloo", timeout_s=120)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports[0]}", rank=rank, world_size=k + 1)
    side = (WeightSender("127.0.0.1", ports[1], k, cfg) if rank == 0
            else WeightReceiver("127.0.0.1", ports[1], rank, k, cfg, name=f"bench-engine-{rank}"))
    loaded: dict[str, list] = {}
    try:
        for name, model_dir, bucket_mb in variants:
            named = loaded.setdefault(name, named_parameters(model_dir)) if rank == 0 else []
            if rank == 0:  # only the sender packs; receivers allocate what each bucket header says
                side.cfg = WeightSyncConfig(backend="gloo", timeout_s=120, bucket_mb=bucket_mb)
            size = torch.tensor([sum(t.numel() * t.element_size() for _, t in named)])
            dist.broadcast(size, 0)
            flat = torch.zeros(int(size), dtype=torch.uint8)
            rows, received = [], None
            for r in range(rounds + 1):  # round 0 warms both paths up
                order = (plain_round, clsrl_round) if r % 2 == 0 else (clsrl_round, plain_round)
                out = {}
                for fn in order:
                    out.update(fn(side, named, flat, version=r + 1))
                received = out.pop("received", received)
                if r:
                    rows.append(out)
            sums = checksum(received) if rank else checksum(named)
            gathered = [torch.zeros_like(sums) for _ in range(k + 1)]
            dist.all_gather(gathered, sums)  # every engine got bit for bit what rank 0 sent
            if rank == 0:
                results.put({"model": name, "k": k, "bucket_mb": bucket_mb, "bytes": int(size), "tensors": len(named),
                             "rounds": rows, "bit_exact": len({bytes(g.tolist()) for g in gathered}) == 1,
                             "explain": copy_costs(named, side.cfg.bucket_bytes)})
    finally:
        side.close()
        dist.destroy_process_group()


def copy_costs(named: list, bucket_bytes: int) -> dict:
    """What the sender and each engine do besides the transfer, timed alone: packing every tensor into fresh
    buckets (a new Packer per broadcast, as WeightSender does), and allocating + first touching the buckets'
    memory (each engine does that per bucket per version before the data lands in it)."""
    import torch

    from weights.group import Packer

    t0 = time.perf_counter()
    packer, sizes = Packer(bucket_bytes, torch.device("cpu")), []
    for i, (name, t) in enumerate(named):
        sizes += [b.nbytes for b in packer.add(name, t, i)]  # not released: the sender keeps up to 3 on the wire
    sizes += [b.nbytes for b in packer.flush()]
    pack_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for n in sizes:
        torch.empty(n, dtype=torch.uint8).fill_(0)
    return {"pack_s": pack_s, "alloc_touch_s": time.perf_counter() - t0}


def plain_round(side, named: list, flat, version: int) -> dict:
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    dist.broadcast(flat, 0)
    dist.barrier()  # the root's broadcast may return before the engines have everything
    return {"plain_s": time.perf_counter() - t0}


def clsrl_round(side, named: list, flat, version: int) -> dict:
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    if hasattr(side, "broadcast"):
        stats = side.broadcast(named, version)
        return {"clsrl_wall_s": time.perf_counter() - t0, "clsrl_s": stats["seconds"] - stats["wait_s"],
                "buckets": stats["buckets"]}
    got_version, received = side.receive()
    if got_version != version:
        raise RuntimeError(f"engine got version {got_version}, expected {version}")
    return {"received": received}


def run_k(k: int, variants: list[tuple[str, str, float]], rounds: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    ports = (free_port(), free_port())
    procs = [ctx.Process(target=rank_main, args=(r, k, ports, variants, rounds, results), daemon=True) for r in range(k + 1)]
    for p in procs:
        p.start()
    out = [results.get(timeout=600) for _ in variants]
    for p in procs:
        p.join(timeout=60)
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"weight broadcast processes failed (exit codes {bad}) with K={k}")
    return out


def summarize(raw: dict) -> dict:
    plain = lc.stats([r["plain_s"] for r in raw["rounds"]])["median"]
    clsrl = lc.stats([r["clsrl_s"] for r in raw["rounds"]])["median"]
    mb = raw["bytes"] / MiB
    return {"model": raw["model"], "k": raw["k"], "bucket_mb": raw["bucket_mb"], "explain": raw["explain"],
            "bytes": raw["bytes"], "mib": mb, "tensors": raw["tensors"],
            "buckets": raw["rounds"][0]["buckets"], "bit_exact": raw["bit_exact"], "rounds": len(raw["rounds"]),
            "plain_mib_per_s": mb / plain, "clsrl_mib_per_s": mb / clsrl,
            "clsrl_wall_mib_per_s": mb / lc.stats([r["clsrl_wall_s"] for r in raw["rounds"]])["median"],
            "ratio": plain / clsrl,  # of the medians, as the table's rates
            "ratio_median_of_rounds": lc.stats([r["plain_s"] / r["clsrl_s"] for r in raw["rounds"]])["median"],
            "target": TARGET,
            "median_s": {"plain": plain, "clsrl": clsrl}, "rounds_raw": raw["rounds"]}


def projection(results: list[dict]) -> dict:
    """Seconds to broadcast a 2B bf16 model: bytes / measured MiB/s here, and bytes / (link x efficiency) on GPUs."""
    nbytes = PROJECT_PARAMS * 2
    biggest = max(r["bytes"] for r in results)
    default = [r for r in results if r["bytes"] == biggest and r["bucket_mb"] == 64]
    here = {f"K={r['k']}": nbytes / (r["clsrl_mib_per_s"] * MiB) for r in default}
    gpu = {name: nbytes / (bw * LINK_EFFICIENCY) for name, bw in GPU_LINKS.items()}
    pack = 2 * nbytes / HBM_BYTES_PER_S  # read + write once; an upper bound, the sender overlaps it with sending
    return {"params": PROJECT_PARAMS, "bytes": nbytes, "formula": "seconds = bytes / bandwidth",
            "this_machine_s": here, "gpu_links_s": gpu, "gpu_link_efficiency_assumed": LINK_EFFICIENCY,
            "gpu_links_plus_unoverlapped_pack_s": {n: s + pack for n, s in gpu.items()}, "gpu_pack_copy_s": pack,
            "sources": {"NVLink": "NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100): NVLink 900 GB/s",
                        "HBM": "NVIDIA H100 SXM datasheet: HBM3 3.35 TB/s",
                        "InfiniBand": "NVIDIA ConnectX-7 / Quantum-2 NDR: 400 Gb/s per port; DGX H100: 8 x 400 Gb/s",
                        "NCCL broadcast": "nccl-tests doc/PERFORMANCE.md: for broadcast, busbw = algbw"}}


def table(results: list[dict]) -> str:
    rows = [[r["model"], r["k"], f"{r['bucket_mb']:g}", f"{r['mib']:.1f}", f"{r['tensors']} / {r['buckets']}",
             f"{r['plain_mib_per_s']:,.0f}", f"{r['clsrl_mib_per_s']:,.0f}", f"**{r['ratio']:.2f}**",
             f"{r['median_s']['plain'] * 1e3:.1f}", f"{r['median_s']['clsrl'] * 1e3:.1f}",
             f"{r['explain']['pack_s'] * 1e3:.0f} / {r['explain']['alloc_touch_s'] * 1e3:.0f}",
             "yes" if r["bit_exact"] else "NO"] for r in results]
    return lc.md_table(["model", "K engines", "bucket_mb", "MiB", "tensors / buckets", "plain gloo MiB/s", "clsrl MiB/s",
                        f"ratio (target >= {TARGET})", "plain ms", "clsrl ms", "pack / alloc+touch ms", "bit-exact"],
                       rows, right_from=1)


def projection_table(p: dict) -> str:
    rows = [[f"this machine, gloo over loopback ({k})", f"{s:.1f}"] for k, s in p["this_machine_s"].items()]
    rows += [[f"{n}, x{p['gpu_link_efficiency_assumed']} efficiency", f"{s:.3f}"] for n, s in p["gpu_links_s"].items()]
    rows += [[f"{n}, plus packing at HBM speed (not overlapped)", f"{s:.3f}"]
             for n, s in p["gpu_links_plus_unoverlapped_pack_s"].items()]
    return lc.md_table([f"2B bf16 model ({p['bytes'] / 1e9:.0f} GB): link", "seconds"], rows)


def main(argv: list[str] | None = None) -> int:
    ap = lc.arg_parser(__doc__)
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds per model and K (after one warm-up)")
    args = ap.parse_args(argv)
    plan, rounds = (QUICK_VARIANTS, 2) if args.quick else (VARIANTS, args.rounds)
    dirs = {size: str(lc.shapes_model(size)[0]) for size, _ in plan}
    variants = [(size, dirs[size], bucket_mb) for size, bucket_mb in plan]
    results = []
    for k in (1, 2):
        lc.progress(f"weights: K={k}, (model, bucket_mb) {plan}, {rounds} rounds each")
        for raw in run_k(k, variants, rounds):
            results.append(summarize(raw))
            r = results[-1]
            lc.progress(f"  {r['model']} K={k} bucket_mb={r['bucket_mb']:g}: plain {r['plain_mib_per_s']:,.0f} MiB/s, "
                        f"clsrl {r['clsrl_mib_per_s']:,.0f} MiB/s, ratio {r['ratio']:.2f}")
    proj = projection(results)
    path = lc.write_report(args.out, "limits_weights", {"quick": args.quick, "target": TARGET, "results": results,
                                                         "projection_2b_bf16": proj})
    print("\n" + table(results) + "\n\n" + projection_table(proj) + f"\n\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
