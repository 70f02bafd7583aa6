"""bench/limits_*.py and bench/scaling_model.py --quick run end to end and write complete, consistent results
(behaviour only: no timing thresholds)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, out: Path, *extra: str, timeout: int = 300) -> tuple[dict, list[str]]:
    """Run `bench/<script>.py --quick --out out`; returns (its JSON, its markdown table rows)."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / f"{script}.py"), "--quick", "--out", str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / f"{script}.json").read_text())
    assert report["benchmark"] == script and report["quick"] is True and report["machine"]["cpus"] >= 1
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    return report, rows


@pytest.mark.slow
def test_rollout_overhead_samples_the_same_tokens_through_the_actor(tmp_path):
    report, rows = run_bench("limits_rollout", tmp_path)
    [c] = report["configs"]
    assert c["identical_completions"] is True  # the stream holds exactly the tokens the bare engine sampled
    assert c["iterations"] == 2 and len(c["iterations_raw"]) == 2
    assert 0 < c["tokens_per_call"] <= c["prompts_per_call"] * c["n"] * c["max_new_tokens"]
    for it in c["iterations_raw"]:
        assert it["actor_s"] >= it["generate_s"] + it["reward_s"] + it["publish_s"] > 0  # parts of the call
        assert it["ratio"] == pytest.approx(it["bare_s"] / it["actor_s"])
    assert c["actor_tokens_per_s"] == pytest.approx(c["tokens_per_call"] / c["median_s"]["actor_s"])
    assert c["ratio"] == pytest.approx(c["actor_tokens_per_s"] / c["bare_tokens_per_s"])
    assert c["target"] == report["target"] == 0.9
    assert rows[0].startswith("| config |") and rows[1].split("|")[1].strip() == "demo"


@pytest.mark.slow
def test_weight_broadcast_is_bit_exact_for_one_and_two_engines(tmp_path):
    report, rows = run_bench("limits_weights", tmp_path)
    results = report["results"]
    assert [r["k"] for r in results] == [1, 2]
    for r in results:
        assert r["bit_exact"] is True and r["rounds"] == 2 and r["tensors"] > 0 and r["buckets"] >= 1
        assert r["bytes"] == results[0]["bytes"]  # the same model to one and to two engines
        assert r["plain_mib_per_s"] > 0 and r["clsrl_mib_per_s"] > 0 and r["ratio"] > 0
        assert r["clsrl_mib_per_s"] == pytest.approx(r["mib"] / r["median_s"]["clsrl"])
        assert r["ratio"] == pytest.approx(r["clsrl_mib_per_s"] / r["plain_mib_per_s"])
    proj = report["projection_2b_bf16"]
    assert proj["bytes"] == 4e9 and set(proj["this_machine_s"]) == {"K=1", "K=2"}
    assert all(s > 0 for s in proj["gpu_links_s"].values()) and proj["sources"]
    assert len(rows) == 3 + 7  # broadcast table (head + K=1, 2), projection (head, 2 here, 2 links, 2 links + packing)


@pytest.mark.slow
def test_buffer_reads_back_every_group_on_both_paths(tmp_path):
    report, rows = run_bench("limits_buffer", tmp_path)
    assert report["all_read"] is True and report["groups_per_round"] == 32 and report["rounds"] == 2
    assert report["group_bytes"] > 10_000  # real groups carry image patches
    for op in ("write", "read"):
        x = report[op]
        assert x["clsrl_groups_per_s"] > 0 and x["raw_groups_per_s"] > 0 and x["ratio"] > 0
        assert x["clsrl_mib_per_s"] == pytest.approx(x["clsrl_groups_per_s"] * report["group_bytes"] / 2**20)
        assert x["ratio"] == pytest.approx(x["clsrl_groups_per_s"] / x["raw_groups_per_s"])
    assert report["codec"]["encode_ms_per_group"] > 0 and report["codec"]["decode_ms_per_group"] > 0
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["put_many x16", "take(16) + ack"]


@pytest.mark.slow
def test_learner_trains_on_two_ranks_per_zero_stage(tmp_path):
    report, rows = run_bench("limits_learner", tmp_path, timeout=400)
    results = report["results"]
    assert [(r["size"], r["zero_stage"]) for r in results] == [("tiny", 1), ("tiny", 3)]
    for r in results:
        assert r["ranks"] == 2 and r["samples_per_step"] == 16 and r["loss_finite"] is True and r["grad_norm"] > 0
        assert r["peak_rss_mib"] >= r["rss_start_mib"] > 0 and r["samples_per_s"] > 0
        assert len(r["peak_rss_mib_per_rank"]) == 2
    z1, z3 = results
    assert z1["params"] == z3["params"] and z1["local_params"] == [z1["params"]] * 2
    # ZeRO-3: each rank holds only its partition of the weights (about half, padded), together all of them
    assert max(z3["local_params"]) < z1["params"] <= sum(z3["local_params"])
    assert z3["predicted_state_mib"] < z1["predicted_state_mib"]
    assert len(rows) == 3


@pytest.mark.slow
def test_scaling_model_reads_the_calibration_and_plots(tmp_path):
    run_bench("limits_buffer", tmp_path)  # one measured input; the others fall back to the defaults
    report, rows = run_bench("scaling_model", tmp_path, timeout=120)
    src = report["calibration_source"]
    assert src["group_bytes"] == "limits_buffer.json" and src["train_s_per_sample"].startswith("default")
    assert [s["scenario"] for s in report["scenarios"]] == ["cpu-tiny", "gpu-2b"]
    for s in report["scenarios"]:
        assert set(s["curves"]) == {"0", "1", "2", "4"}
        for curve in s["curves"].values():
            assert len(curve) == len(s["engines"]) and all(c["steps_per_hour"] > 0 for c in curve)
            for c, b in zip(curve, s["bound"]):
                assert c["steps_per_hour"] <= b * 1.05  # nothing beats full overlap without a barrier
        sync, async1 = s["curves"]["0"], s["curves"]["1"]
        assert all(a["steps_per_hour"] >= 0.99 * y["steps_per_hour"] for a, y in zip(async1, sync))
    assert (tmp_path / "scaling_model.png").stat().st_size > 1000
    assert len(rows) == 2 * (1 + len(report["scenarios"][0]["engines"]))


@pytest.mark.slow
def test_data_limits_measure_the_driver_through_a_whole_split_eval_and_one_without_it(tmp_path):
    """20 images: the step-0 eval covers the split; 60 (quick's --no-eval-from): train.eval_at_start=false, so
    the run has no step-0 row and its first step is timed from launch."""
    report, rows = run_bench("limits_data", tmp_path, timeout=1200)
    results = report["results"]
    assert [r["images"] for r in results] == [20, 60] and not any("failed" in r for r in results)
    evaluated, skipped = results
    assert 0 < evaluated["data_ready_s"] < evaluated["startup_s"] < evaluated["first_step_s"]
    assert evaluated["eval_images_per_s"] == pytest.approx(evaluated["images"] / evaluated["eval_s"])
    assert 0 < skipped["data_ready_s"] < skipped["first_step_s"] and skipped["eval_s"] is None
    steps = [json.loads(line)["step"]
             for line in (tmp_path / "limits_data_runs" / "n60" / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 1  # no step-0 eval row
    assert all(r["driver_peak_rss_mb"] > 100 for r in results)
    assert report["rss_growth_mb"] == pytest.approx(results[1]["driver_peak_rss_mb"] - results[0]["driver_peak_rss_mb"])
    assert report["max_pixels"] == 401408 and rows[0].startswith("| test images |") and len(rows) == 3
