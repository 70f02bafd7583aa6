"""Shared pieces of the bench/limits_*.py benchmarks: environment, CLI, the tiny model's prompts, reports.

Each limits benchmark measures one clsrl stage against its physical baseline (the same work done the plainest
way on the same machine) and writes OUT/<name>.json plus a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("CLSRL_CACHE", str(ROOT / ".cache" / "clsrl"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed's CPU build compiles its shared-memory op once per directory: the one clsrl's actors use
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.environ["CLSRL_CACHE"], "torch_extensions"))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read at `import ray`: loopback-only local cluster

from telemetry import tables  # noqa: E402

DEFAULT_OUT = ROOT / "runs" / "bench-limits"


def arg_parser(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few iterations on small inputs (the smoke test)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the results JSON")
    return ap


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "loadavg": [round(x, 2) for x in os.getloadavg()],
            "date": time.strftime("%Y-%m-%d %H:%M")}


def stats(values: Sequence[float]) -> dict:
    """Median is what the tables use: robust to the spikes of a shared machine."""
    vals = list(values)
    return {"median": statistics.median(vals), "mean": statistics.fmean(vals), "min": min(vals), "max": max(vals),
            "n": len(vals)}


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]], right_from: int = 1) -> str:
    """The limits tables: label columns, then numbers (right-aligned) from column `right_from` on."""
    return tables.md_table(headers, rows, "l" * right_from + "r")


def write_report(out_dir: Path, name: str, report: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    report = {"benchmark": name, "machine": machine(), **report}
    path.write_text(json.dumps(report, indent=1))
    return path


def load_report(out_dir: Path, name: str) -> dict | None:
    path = Path(out_dir) / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


# Model sizes of the same tiny Qwen2-VL family (vlm/tiny.py), ~0.7M (configs/cpu_demo.yaml's) to ~46M parameters.
SIZES: dict[str, dict] = {
    "tiny": {},
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, vision_hidden_size=128),
    "medium": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                   vision_depth=4, vision_hidden_size=192),
    "large": dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=10,
                  vision_depth=4, vision_hidden_size=320),
    # where ZeRO's model state, not the process's fixed ~130 MiB or the activations, sets a rank's memory
    "xlarge": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=16,
                   num_key_value_heads=4, vision_depth=4, vision_hidden_size=512),
}


def tiny_spec(size: str = "tiny"):
    """The default tiny Qwen2-VL (configs/cpu_demo.yaml's model), or a larger one of the same family."""
    from protocol.components import TinyVLMSpec

    return TinyVLMSpec(**SIZES[size])


def shapes_model(size: str = "tiny") -> tuple[Path, object]:
    """(model dir, the `shapes` data set): the tiny model built for the bundled data's vocabulary, cached."""
    from tasks.bundled import ensure_bundled
    from tasks.examples import tokenizer_corpus
    from tasks.manifest import read_dataset
    from vlm.tiny import ensure_tiny_vlm

    dataset = read_dataset(ensure_bundled("shapes"))
    return ensure_tiny_vlm(tiny_spec(size), tokenizer_corpus([dataset])), dataset


def shapes_prompts(model_dir: Path, dataset, n: int) -> list:
    """n training prompts of `shapes` encoded as the driver encodes them (no_think style, default pixels)."""
    from tasks.examples import build_examples
    from vlm.processor import load_processor

    processor = load_processor(model_dir)
    train = dataset.split("train")
    samples = [train[i % len(train)] for i in range(n)]
    examples, _ = build_examples(processor, dataset, samples, "no_think", 56 * 56, 112 * 112, seed=0)
    for i, e in enumerate(examples):
        e.id = f"{dataset.name}/{e.id}#{i}"  # unique even when the set is shorter than n
    return examples


def requests_for(examples: list) -> list:
    """RolloutRequests as cluster.job.Job.request builds them."""
    from protocol.rollout import RolloutRequest

    return [RolloutRequest(e.id, e.inputs, e.solution, meta={"draw": i, "dataset": e.dataset})
            for i, e in enumerate(examples)]


def make_groups(count: int, n: int = 8) -> list:
    """`count` scored groups of G=n completions from the tiny model on `shapes` prompts."""
    import torch
    from transformers import AutoModelForImageTextToText

    from protocol.components import SamplingConfig
    from protocol.rollout import RolloutGroup
    from vlm.generation import sample_completions
    from vlm.processor import load_processor

    model_dir, dataset = shapes_model()
    examples = shapes_prompts(model_dir, dataset, count)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = load_processor(model_dir)
    outs = sample_completions(model, processor.tokenizer, [e.inputs for e in examples],
                              SamplingConfig(n=n, max_new_tokens=8), seed=0, image_processor=processor.image_processor)
    groups = []
    for req, comps in zip(requests_for(examples), outs):
        groups.append(RolloutGroup(req, comps, policy_version=3, rewards=[float(c.text.strip() == req.solution) for c in comps]))
    return groups
