"""Reward throughput and worst adversarial latency, one core.

    python bench/bench_rewards.py            # full run (~20 s)
    python bench/bench_rewards.py --quick    # smoke run (a second or two)

For each reward: completions/s on a realistic mixed batch (correct, wrong and malformed
answers, think/answer tags, detection lists of a few boxes, grounding pairs), and the
slowest single adversarial completion (megabyte inputs, repeated or unclosed tags).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rewards import available, get_reward  # noqa: E402
from telemetry.tables import md_table  # noqa: E402

LABELS = [
    "Boeing 737-800",
    "Boeing 737-400",
    "Airbus A320",
    "golden_retriever",
    "Abyssinian",
    "english setter",
    "pink primrose",
    "globe thistle",
    "AnnualCrop",
    "Herbaceous Vegetation",
    "apple pie",
    "baby back ribs",
    "banded",
    "blotchy",
    "Audi TT RS Coupe 2012",
]
THINK = [
    "The image shows {x}; the shape and colour are typical of it.",
    "Looking at the wings and the engines, this could be {x}. The livery suggests it.",
    "I compare the candidates from the list. The texture and the background point to {x}.",
]


def _think(rng: random.Random, x: str) -> str:
    return "<think>" + rng.choice(THINK).format(x=x) + "</think>"


def _cls_completion(rng: random.Random, label: str) -> str:
    other = rng.choice(LABELS)
    kind = rng.random()
    if kind < 0.4:  # correct, with some spelling noise
        ans = rng.choice([label, label.lower(), label.replace("_", " "), f" {label} "])
        return f"{_think(rng, ans)}\n<answer>{ans}</answer>"
    if kind < 0.7:  # wrong
        return f"{_think(rng, other)}\n<answer>{other}</answer>"
    if kind < 0.8:  # No-Thinking style
        return rng.choice([label, other]) + rng.choice(["", "\n"])
    if kind < 0.9:  # truncated
        return _think(rng, other)[: rng.randint(5, 60)]
    return rng.choice(["<answer></answer>", "I am not sure.", f"<answer>{label}</answer> maybe {other}"])


def _jitter(rng: random.Random, box: list[int], s: int = 15) -> list[int]:
    return [min(1000, max(0, v + rng.randint(-s, s))) for v in box]


def _rand_box(rng: random.Random) -> list[int]:
    x, y = rng.randint(0, 800), rng.randint(0, 800)
    return [x, y, x + rng.randint(20, 200), y + rng.randint(20, 200)]


def _det_completion(rng: random.Random, gts: list[list[int]]) -> str:
    kind = rng.random()
    head = _think(rng, "a few objects")
    if not gts and kind < 0.5:
        return f"{head}<answer>No Objects</answer>"
    preds = [{"Position": _jitter(rng, g), "Confidence": round(rng.uniform(0.3, 1.0), 2)} for g in gts]
    preds += [
        {"Position": _rand_box(rng), "Confidence": round(rng.uniform(0, 0.6), 2)} for _ in range(rng.randint(0, 2))
    ]
    body = repr(preds)
    if kind < 0.75:
        return f"{head}<answer>{body}</answer>"
    if kind < 0.9:  # truncated by the token limit
        return f"{head}<answer>{body[: rng.randint(1, len(body))]}"
    return f"{head}<answer>{rng.choice(['I see objects', body.replace('}', ''), '[[1, 2]]'])}</answer>"


def _grounding_completion(rng: random.Random, gt: list[int], square: bool) -> str:
    x1, y1, x2, y2 = _jitter(rng, gt, 40) if rng.random() < 0.7 else _rand_box(rng)
    ans = f"[{x1}, {y1}, {x2}, {y2}]" if square else f"({x1},{y1}),({x2},{y2})"
    kind = rng.random()
    if kind < 0.8:
        return f"{_think(rng, 'the object on the left')}\n<answer>{ans}</answer>"
    if kind < 0.9:
        return ans
    return f"{_think(rng, 'the object')}<answer>the object on the left</answer>"


def make_batch(name: str, n: int, seed: int = 0) -> tuple[list[str], list[Any], dict[str, Any]]:
    rng = random.Random(seed)
    comps: list[str] = []
    sols: list[Any] = []
    for _ in range(n):
        if name in ("det_iou", "det_confidence"):
            gts = [_rand_box(rng) for _ in range(rng.choice([0, 1, 1, 2, 3, 4]))]
            comps.append(_det_completion(rng, gts))
            sols.append(gts)
        elif name in ("grounding_giou", "rec_iou", "eval_grounding_iou50"):
            gt = _rand_box(rng)
            comps.append(_grounding_completion(rng, gt, square=name == "rec_iou"))
            sols.append(gt if name == "rec_iou" else [gt])
        elif name in ("format", "length"):
            if rng.random() < 0.5:
                comps.append(_cls_completion(rng, rng.choice(LABELS)))
            else:
                comps.append(_det_completion(rng, [_rand_box(rng)]))
            sols.append(None)
        else:
            label = rng.choice(LABELS)
            comps.append(_cls_completion(rng, label))
            sols.append(label)
    info = {"completion_lengths": [max(1, len(c) // 4) for c in comps]}
    return comps, sols, info


MB = 1_000_000
_PROSE = "the bird has a red crest and long tail feathers, so it could be a cardinal. "


def adversarial(scale: int) -> dict[str, str]:
    """The adversarial completions, `scale` characters long (roughly)."""
    return {
        "<answer> x20k": "<answer>" * 20_000,
        "( x1MB": "(" * scale,
        "1MB in <think>..</think>": "<think>" + _PROSE * (scale // len(_PROSE)) + "</think><answer>cat</answer>",
        "1MB in unclosed <think>": "<think>" + _PROSE * (scale // len(_PROSE)),
        "<think> x50k": "<think>" * 50_000,
        "</think> x50k": "<think>" + "</think> " * 50_000 + "</answer>",
        "[ x1MB": "[" * scale,
        "{ x1MB": "{" * scale,
        "'Position': [ repeated": "<answer>[{" + "'Position': [" * (scale // 13),
        "digits x1MB": "1" * scale,
        "[1, 2, 3, repeated": "[1, 2, 3," * (scale // 9),
        "(1,2),( repeated": "(1,2),(" * (scale // 7),
        "NUL/control/emoji 1MB": "\x00\x1b[0m\x7f\U0001f600" * (scale // 5),
        "valid det entries (64KB cap)": "<answer>[" + "{'Position': [1, 2, 30, 40], 'Confidence': 0.5}, " * 1300,
    }


def pin_one_core() -> str:
    try:
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return f"pinned to CPU {cpu}"
    except (AttributeError, OSError):
        return "not pinned"


def bench(quick: bool) -> list[dict[str, Any]]:
    n = 64 if quick else 4000
    min_time = 0.0 if quick else 0.6
    reps = 1 if quick else 3
    cases = adversarial(MB)
    rows = []
    variants = [(name, {}) for name in available()] + [("rec_iou", {"threshold": 0.5})]
    for name, params in variants:
        fn = get_reward(name, **params)
        label = name + "".join(f" ({k}={v})" for k, v in params.items())
        comps, sols, info = make_batch(name, n)
        fn(comps, sols, **info)  # warm-up
        done, t0 = 0, time.perf_counter()
        while True:
            fn(comps, sols, **info)
            done += n
            elapsed = time.perf_counter() - t0
            if elapsed >= min_time:
                break
        rate = done / elapsed
        sol = make_batch(name, 1)[1][0]
        if name in ("det_iou", "det_confidence", "grounding_giou", "eval_grounding_iou50"):
            sol = [[0, 0, 100, 100], [200, 200, 300, 300]]
        worst, worst_case = 0.0, ""
        for case, text in cases.items():
            best = min(_time_one(fn, text, sol) for _ in range(reps))
            if best > worst:
                worst, worst_case = best, case
        rows.append(
            {
                "reward": label,
                "rate": rate,
                "us": 1e6 / rate,
                "worst_ms": worst * 1e3,
                "worst_case": worst_case,
                "mean_len": sum(map(len, comps)) / len(comps),
            }
        )
    return rows


def _time_one(fn: Any, text: str, sol: Any) -> float:
    t0 = time.perf_counter()
    fn([text], [sol], completion_lengths=[len(text) // 4])
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny batches, one pass (smoke test)")
    args = ap.parse_args(argv)
    pinned = pin_one_core()
    print(
        f"# rewards benchmark ({'quick' if args.quick else 'full'}): Python "
        f"{platform.python_version()}, {platform.machine()}, {pinned}\n"
    )
    rows = bench(args.quick)
    print(md_table(
        ["reward", "completions/s", "µs/completion", "mean chars", "worst adversarial (ms)", "worst case"],
        [[r["reward"], f"{r['rate']:,.0f}", f"{r['us']:.2f}", f"{r['mean_len']:.0f}", f"{r['worst_ms']:.2f}",
          r["worst_case"]] for r in rows],
        "lrrrrl",
    ))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
