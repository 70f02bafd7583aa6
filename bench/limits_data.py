"""Real-size data: the driver's peak RSS and its time to the first step against the number of test images.

    python bench/limits_data.py --out runs/bench-limits                 # 1k and 5k test images, ~10 min
    python bench/limits_data.py --sizes 1000 5000 20000 50000          # the issue's full range (long)
    python bench/limits_data.py --quick

Each size is an ImageFolder of synthetic 500x375 JPEGs (16 train images, N test images, 8 classes; made once
and cached, the sizes sharing files through hard links) trained on by `clsrl train` in a subprocess: the tiny
model with its processor at Qwen2-VL-2B's pixel settings (model.tiny.min/max_pixels 3136/12845056),
data.max_pixels=401408 (936 patches an image), data.eval_limit=null (the step-0 eval covers the whole test
split), two steps, no warm start. Measured from outside: the driver process's peak RSS (sampled every 0.1 s
with psutil), start-up = launch until the step-0 eval begins (step 0's row time minus its time/eval: data
scan, model build, Ray, actors; "data ready" is its first part, launch until the driver's `data:` line), time
to the first step = start-up plus step 1 (the eval excluded: it is the engines' work, reported as eval
images/s). The run is stopped once step 1 is logged. From --no-eval-from images on (default 20k: the whole
split's eval would take this machine hours), the run skips the step-0 eval (train.eval_at_start=false): the
driver still reads and scans every test image, and first step = launch until step 1 is logged.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import limits_common as lc
import psutil

CLASSES = ["apple", "boat", "cat", "dog", "house", "kite", "lamp", "tree"]
TRAIN_IMAGES = 16
QWEN2_VL_2B_PIXELS = (3136, 12845056)  # the checkpoint's processor min/max pixels
MAX_PIXELS = 401408  # the papers' data.max_pixels
TARGETS = {"rss_growth_mb": 200.0, "first_step_s_at_50k": 30.0}
# the smoke test: one engine and one learner rank (the driver, which is what is measured, is the same)
QUICK = ["cluster.rollout_workers=1", "cluster.learner_ranks=1"]


def _image(i: int, cls: int):
    """A 500x375 JPEG-able image: a per-image gradient with the class's coloured square (cheap to make)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:375, 0:500]
    base = ((x * (1 + i % 7) + y * (1 + i % 5)) % 256).astype(np.uint8)
    rgb = np.stack([base, base[::-1], np.roll(base, i % 97, axis=1)], axis=-1)
    c = np.array([(37 * cls) % 256, (91 * cls + 50) % 256, (151 * cls + 100) % 256], dtype=np.uint8)
    top, left = 40 + (i * 13) % 200, 40 + (i * 29) % 300
    rgb[top:top + 120, left:left + 150] = c
    return Image.fromarray(rgb, mode="RGB")


def image_pool(root: Path, n: int) -> list[Path]:
    """n test JPEGs (and the train ones) under root/pool, made once; cached across runs."""
    pool = root / "pool"
    pool.mkdir(parents=True, exist_ok=True)
    paths = [pool / f"{i:06d}_{CLASSES[i % len(CLASSES)]}.jpg" for i in range(n + TRAIN_IMAGES)]
    for i, p in enumerate(paths):
        if not p.exists():
            _image(i, i % len(CLASSES)).save(p, quality=85)
            if i % 1000 == 999:
                lc.progress(f"made {i + 1} of {len(paths)} images")
    return paths


def data_set(root: Path, n: int) -> Path:
    """An ImageFolder with TRAIN_IMAGES train and n test images, hard links into the pool."""
    folder = root / f"pets_{n}"
    done = folder / ".done"
    if done.exists():
        return folder
    pool = image_pool(root, n)
    for i, src in enumerate(pool):
        split = "train" if i >= n else "test"
        dst = folder / split / src.stem.split("_", 1)[1] / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            os.link(src, dst)
    done.write_text("ok\n")
    return folder


def _rss_kb(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_info().rss // 1024
    except psutil.NoSuchProcess:  # the run has ended
        return 0


def data_ready_s(run_dir: Path, launched: float) -> float | None:
    """Seconds from launch to the driver's "data: ..." line (data read and scanned, tiny model built)."""
    import datetime

    log = run_dir / "driver.log"
    for line in log.read_text().splitlines() if log.exists() else []:
        if " clsrl [" in line and "]: data: " in line:
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            return stamp - launched
    return None


def run_one(folder: Path, n: int, run_dir: Path, timeout_s: float, extra: list[str], eval_at_start: bool) -> dict:
    overrides = [f"train.eval_at_start={str(eval_at_start).lower()}",
                 f"data.root={folder}", f"data.max_pixels={MAX_PIXELS}", "data.eval_limit=null",
                 f"model.tiny.min_pixels={QWEN2_VL_2B_PIXELS[0]}", f"model.tiny.max_pixels={QWEN2_VL_2B_PIXELS[1]}",
                 "train.steps=2", "train.eval_every=0", "train.warm_start_steps=0", "train.prompts_per_step=4",
                 "train.save_every=0", "sampling.n=2", "learner.micro_batch_size=4", "rollout.eval_max_new_tokens=4",
                 "algorithm.dynamic_sampling=false", *extra]
    env = {**os.environ, "PYTHONPATH": str(lc.ROOT), "PYTHONUNBUFFERED": "1"}
    metrics = run_dir / "metrics.jsonl"
    start, launched = time.perf_counter(), time.time()
    proc = subprocess.Popen([sys.executable, "-m", "commands.cli", "train", *overrides, "--run-dir", str(run_dir)],
                            cwd=lc.ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, text=True)
    peak_kb, seen = 0, {}
    try:
        while proc.poll() is None and time.perf_counter() - start < timeout_s:
            peak_kb = max(peak_kb, _rss_kb(proc.pid))
            rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
            for r in rows:
                seen.setdefault(r["step"], (time.perf_counter() - start, r))
            if 1 in seen:
                break
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    if 1 not in seen:
        err = proc.stderr.read()[-2000:] if proc.stderr else ""
        return {"images": n, "failed": f"no step 1 within {timeout_s:.0f} s (rc {proc.returncode}): {err}",
                "driver_peak_rss_mb": peak_kb / 1024}
    t1, _ = seen[1]
    ready = data_ready_s(run_dir, launched)
    if not eval_at_start:
        return {"images": n, "driver_peak_rss_mb": peak_kb / 1024, "data_ready_s": ready, "startup_s": None,
                "eval_s": None, "eval_images_per_s": None, "step1_s": None, "first_step_s": t1}
    t0, row0 = seen[0]
    eval_s = row0["time/eval"]
    startup = t0 - eval_s
    return {"images": n, "driver_peak_rss_mb": peak_kb / 1024, "data_ready_s": ready,
            "startup_s": startup, "eval_s": eval_s,
            "eval_images_per_s": n / eval_s, "step1_s": t1 - t0, "first_step_s": startup + (t1 - t0),
            "eval_accuracy": row0.get("eval/accuracy")}


def main() -> None:
    ap = lc.arg_parser(__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per size")
    ap.add_argument("--no-eval-from", type=int, default=20000, help="sizes from this many images on skip the "
                    "step-0 eval (train.eval_at_start=false)")
    args = ap.parse_args()
    sizes = [20, 60] if args.quick else sorted(args.sizes)
    no_eval_from = 60 if args.quick else args.no_eval_from
    root = Path(os.environ["CLSRL_CACHE"]) / "bench_data_500x375"
    results = []
    for n in sizes:
        folder = data_set(root, n)
        evals = n < no_eval_from
        lc.progress(f"{n} test images: clsrl train ({'step-0 eval over all of them, then ' if evals else ''}"
                    "one GRPO step)")
        run_dir = args.out / "limits_data_runs" / f"n{n}"
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        results.append(run_one(folder, n, run_dir, args.timeout, QUICK if args.quick else [], evals))
        lc.progress(json.dumps(results[-1]))
    ok = [r for r in results if "failed" not in r]
    growth = ok[-1]["driver_peak_rss_mb"] - ok[0]["driver_peak_rss_mb"] if len(ok) > 1 else None
    report = {"quick": args.quick, "max_pixels": MAX_PIXELS, "processor_pixels": QWEN2_VL_2B_PIXELS, "results": results,
              "rss_growth_mb": growth, "rss_growth_between": [ok[0]["images"], ok[-1]["images"]] if ok else None,
              "targets": TARGETS}
    path = lc.write_report(args.out, "limits_data", report)
    cell = lambda r, key: "-" if r.get(key) is None else f"{r[key]:.1f}"  # noqa: E731
    keys = ["data_ready_s", "startup_s", "first_step_s", "eval_s", "eval_images_per_s"]
    rows = [[f"{r['images']:,}", f"{r['driver_peak_rss_mb']:.0f}",
             *([cell(r, k) for k in keys] if "failed" not in r else ["failed", "", "", "", ""])] for r in results]
    print(lc.md_table(["test images", "driver peak RSS (MB)", "data ready (s)", "start-up (s)", "first step (s)",
                       "eval (s)", "eval images/s"], rows))
    if growth is not None:
        print(f"\ndriver RSS growth {ok[0]['images']:,} -> {ok[-1]['images']:,} images: {growth:.0f} MB "
              f"(target < {TARGETS['rss_growth_mb']:.0f} MB from 1k to 50k)")
    print(f"\n{path}")


if __name__ == "__main__":
    main()
