"""Rollout overhead: completion tokens/s through the RolloutWorker Ray actor over the bare engine in one process.

    python bench/limits_rollout.py --out runs/bench-limits          # ~1 min idle
    python bench/limits_rollout.py --quick

clsrl: the driver calls `RolloutWorker.rollout.remote(requests, seed)` on a real Ray actor, which generates with
its HF engine, has a real RewardActor score the groups and publishes them to a real (private) Redis stream;
the time is the driver's wall time around `ray.get`. Baseline: `vlm.generation.sample_completions` on the same
model, prompts, sampling settings and seed in this process, one thread like the actor. Both sample the same
tokens (checked: the groups read back from the stream equal the baseline's completions), so the ratio of
tokens/s is the ratio of times. Iterations alternate which side goes first; the tables use medians.
"""
from __future__ import annotations

import os
import random
import tempfile
from functools import partial
from pathlib import Path

import limits_common as lc

# (name, prompts per call, G, max_new_tokens): the cpu_demo chunk, and longer answers (think-style lengths)
CONFIGS = [("demo", 16, 8, 8), ("long", 16, 8, 32)]
QUICK_CONFIGS = [("demo", 4, 4, 8)]
TARGET = 0.9


def engine_seed(call_seed: int) -> int:
    """The seed RolloutWorker.rollout derives for its first chunk (actors/rollout_worker.py)."""
    return random.Random(f"{call_seed}:0").getrandbits(48)


def start_actors(model_dir: Path, dataset: str, sampling, prompts: int, redis_url: str, redis_cfg) -> tuple:
    import ray

    from actors.reward_actor import RewardActor
    from actors.rollout_worker import RolloutWorker
    from protocol.components import RewardTerm
    from protocol.config import RolloutConfig

    reward = ray.remote(RewardActor).options(num_cpus=0.5).remote({dataset: [RewardTerm("cls_equality")]})
    worker = ray.remote(RolloutWorker).options(num_cpus=1).remote(
        0, str(model_dir), sampling, RolloutConfig(dtype="fp32", prompts_per_call=prompts), redis_url, redis_cfg, [reward],
        {dataset: "cls_equality"})
    info, _ = ray.get([worker.info.remote(), reward.ping.remote()])
    match_niceness(info["pid"])
    return worker, reward


def match_niceness(pid: int) -> int:
    """Ray starts its workers at nice 15; on a shared machine the baseline must not get more CPU than the actor
    only because it runs at 0, so this process takes the actor's niceness (raising it is always allowed)."""
    nice = os.getpriority(os.PRIO_PROCESS, pid)
    if os.getpriority(os.PRIO_PROCESS, 0) < nice:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    return nice


def call_actor(worker, requests: list, seed: int) -> dict:
    import ray

    return ray.get(worker.rollout.remote(requests, seed=seed))


def pair(bare, actor, actor_first: bool) -> tuple[tuple, tuple]:
    """Both timed, in alternating order across iterations (drift on a shared machine hits both alike)."""
    if actor_first:
        a = lc.timed(actor)
        return lc.timed(bare), a
    b = lc.timed(bare)
    return b, lc.timed(actor)


def run_config(name: str, prompts: int, n: int, max_new: int, iters: int, model, tokenizer, model_dir: Path,
               dataset, redis_url: str, redis_cfg, buffer) -> dict:
    import ray

    from protocol.components import SamplingConfig
    from vlm.generation import sample_completions
    from vlm.processor import load_processor

    image_processor = load_processor(model_dir).image_processor
    sampling = SamplingConfig(n=n, max_new_tokens=max_new)
    examples = lc.shapes_prompts(model_dir, dataset, prompts)
    requests = lc.requests_for(examples)
    worker, reward = start_actors(model_dir, dataset.name, sampling, prompts, redis_url, redis_cfg)
    rows, same = [], True
    try:
        for i in range(iters + 1):  # iteration 0 warms both sides up and is not counted
            call_seed = 1000 + i
            bare = partial(sample_completions, model, tokenizer, [e.inputs for e in examples], sampling,
                           engine_seed(call_seed), image_processor)
            actor = partial(call_actor, worker, requests, call_seed)
            (t_bare, groups), (t_actor, summary) = pair(bare, actor, actor_first=bool(i % 2))
            published = buffer.take(prompts + 1)  # outside the timing: what the actor wrote, to check it
            same &= [[c.token_ids for c in g.completions] for _, g in published] == [[c.token_ids for c in g] for g in groups]
            buffer.reset()
            tokens = sum(len(c.token_ids) for g in groups for c in g)
            same &= tokens == sum(summary.lengths)
            if i == 0:
                continue
            times = summary.seconds
            rows.append({"tokens": tokens, "bare_s": t_bare, "actor_s": t_actor, "generate_s": times["generate"],
                         "reward_s": times["reward"], "publish_s": times["publish"],
                         "call_overhead_s": t_actor - sum(times.values()), "ratio": t_bare / t_actor})
            lc.progress(f"rollout {name} {i}/{iters}: bare {t_bare:.3f} s, actor {t_actor:.3f} s "
                        f"(generate {times['generate']:.3f}, reward {times['reward']:.3f}, publish {times['publish']:.3f})")
    finally:
        ray.get(worker.close.remote())
        ray.kill(worker)
        ray.kill(reward)
    return summarize(name, prompts, n, max_new, rows, same)


def summarize(name: str, prompts: int, n: int, max_new: int, rows: list[dict], same: bool) -> dict:
    med = {k: lc.stats([r[k] for r in rows])["median"] for k in rows[0]}
    bare_tps, actor_tps = med["tokens"] / med["bare_s"], med["tokens"] / med["actor_s"]
    return {"config": name, "prompts_per_call": prompts, "n": n, "max_new_tokens": max_new, "iterations": len(rows),
            "identical_completions": same, "tokens_per_call": med["tokens"],
            "bare_tokens_per_s": bare_tps, "actor_tokens_per_s": actor_tps,
            "ratio": actor_tps / bare_tps, "ratio_median_of_calls": lc.stats([r["ratio"] for r in rows])["median"],
            "target": TARGET,
            "median_s": {k: med[k] for k in ("bare_s", "actor_s", "generate_s", "reward_s", "publish_s", "call_overhead_s")},
            "generate_vs_bare": med["generate_s"] / med["bare_s"],  # the engine itself inside the actor
            "samples_per_s_actor": prompts * n / med["actor_s"], "iterations_raw": rows}


def table(results: list[dict]) -> str:
    rows = []
    for r in results:
        s = r["median_s"]
        rows.append([r["config"], f"{r['prompts_per_call']} x {r['n']}, {r['max_new_tokens']}", f"{r['tokens_per_call']:.0f}",
                     f"{r['bare_tokens_per_s']:,.0f}", f"{r['actor_tokens_per_s']:,.0f}", f"**{r['ratio']:.2f}**",
                     f"{s['generate_s'] * 1e3:.0f}", f"{s['reward_s'] * 1e3:.1f}", f"{s['publish_s'] * 1e3:.1f}",
                     f"{s['call_overhead_s'] * 1e3:.1f}", "yes" if r["identical_completions"] else "NO"])
    return lc.md_table(["config", "prompts x G, max_new_tokens", "tokens/call", "bare tokens/s", "clsrl tokens/s",
                        f"ratio (target >= {TARGET})", "generate ms", "reward ms", "publish ms", "Ray call + rest ms",
                        "same tokens"], rows)


def main(argv: list[str] | None = None) -> int:
    ap = lc.arg_parser(__doc__)
    ap.add_argument("--iters", type=int, default=8, help="measured calls per config (after one warm-up)")
    args = ap.parse_args(argv)
    configs, iters = (QUICK_CONFIGS, 2) if args.quick else (CONFIGS, args.iters)
    import ray
    import torch
    from transformers import AutoModelForImageTextToText

    from cluster.job import local_runtime_env
    from protocol.components import RedisConfig
    from stream.buffer import RolloutBuffer
    from stream.server import PrivateRedis
    from vlm.processor import load_processor

    torch.set_num_threads(1)  # like the actor (OMP_NUM_THREADS=1 in its runtime env)
    model_dir, dataset = lc.shapes_model()
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = load_processor(model_dir).tokenizer
    redis_cfg = RedisConfig()
    results = []
    with tempfile.TemporaryDirectory() as tmp, PrivateRedis(redis_cfg, tmp) as server:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env=local_runtime_env())
        try:
            with RolloutBuffer.from_config(redis_cfg, server.url, consumer="bench") as buffer:
                buffer.reset()
                for name, prompts, n, max_new in configs:
                    lc.progress(f"rollout config {name}: {prompts} prompts x {n}, max_new_tokens {max_new}")
                    results.append(run_config(name, prompts, n, max_new, iters, model, tokenizer, model_dir, dataset,
                                              server.url, redis_cfg, buffer))
        finally:
            ray.shutdown()
    path = lc.write_report(args.out, "limits_rollout", {"quick": args.quick, "target": TARGET, "configs": results,
                                                         "niceness": os.getpriority(os.PRIO_PROCESS, 0)})
    print("\n" + table(results) + f"\n\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
