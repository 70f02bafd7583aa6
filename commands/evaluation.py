"""`clsrl eval`: greedy answers on the test split of one or many data sets, spread over engine actors.

Each data set is scored by its task's `correct_reward` or one protocol for all (`eval_cls_rl`,
`eval_visual_rft`, see rewards/eval_protocols.py). Writes eval.json (per data set: accuracy, counts, every
raw answer) and eval.md (the table); with base_to_new, each data set is evaluated on its base and its new
classes and reported with their harmonic mean H, as CoOp-style papers do.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import ray
from ray.exceptions import RayActorError
from ray.util import ActorPool
from tqdm import tqdm

from actors.eval_worker import EvalWorker
from cluster.checkpoint import complete_tags
from cluster.placement import init_ray
from protocol.config import ExperimentConfig
from protocol.rollout import RolloutRequest
from tasks.data import RunData, load_run_data
from telemetry.logs import announce
from telemetry.tables import md_table

PROTOCOLS = {"cls_rl": "eval_cls_rl", "visual_rft": "eval_visual_rft"}


def resolve_model(path: str | Path) -> Path:
    """A Hugging Face model folder from a model folder, a checkpoint (step-N/hf) or a run dir (its newest
    one)."""
    p = Path(path)
    for candidate in (p, p / "hf"):
        if (candidate / "config.json").is_file():
            return candidate
    tags = complete_tags(p / "checkpoints")
    if tags:
        return p / "checkpoints" / tags[-1] / "hf"
    raise FileNotFoundError(f"{p} is not a model folder (config.json), a checkpoint (hf/config.json) or a "
                            "run directory with a finished checkpoint")


def harmonic_mean(base: float, new: float) -> float:
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


def _answer_all(workers: list, requests: list[RolloutRequest], chunk: int, max_new_tokens: int,
                desc: str) -> list[dict]:
    """Each idle worker takes the next chunk (fast engines do more); answers come back in request order."""
    chunks = [requests[i:i + chunk] for i in range(0, len(requests), chunk)]
    rows: list[dict] = []
    pool = ActorPool(workers)
    try:
        with tqdm(total=len(requests), desc=desc, unit="img") as bar:
            # unordered: the bar counts answers as they land, not behind the slowest chunk
            for part in pool.map_unordered(lambda w, c: w.answer.remote(c, max_new_tokens), chunks):
                rows += [dataclasses.asdict(answer) for answer in part]  # eval.json keeps them as objects
                bar.update(len(part))
    except RayActorError as err:  # Ray's message says neither which stage lost the actor nor how far it got
        why = "its engine failed to start, or its process was killed: out of memory?"
        raise RuntimeError(f"{desc}: an eval worker died with {len(rows)} of {len(requests)} answers in "
                           f"({why}): {err}") from err
    order = {r.prompt_id: i for i, r in enumerate(requests)}  # ids are unique: prefixed with the data set
    return sorted(rows, key=lambda r: order[r["prompt_id"]])


def _with_classes(cfg: ExperimentConfig, classes: str) -> list:
    return [dataclasses.replace(e, data=dataclasses.replace(e.data, classes=classes))
            for e in cfg.dataset_entries()]


def _scorers(tasks: dict, protocol: str | None) -> dict[str, str]:
    """Each data set's scoring reward: the one protocol, else its task's correct_reward."""
    if protocol is not None and protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)} (or none: each task's "
                         f"correct_reward), got {protocol!r}")
    return {name: PROTOCOLS[protocol] if protocol else t.correct_reward for name, t in tasks.items()}


@contextlib.contextmanager
def eval_workers(cfg: ExperimentConfig, data: RunData, protocol: str | None = None) -> Iterator[list]:
    """`cluster.rollout_workers` engine actors on Ray for data's model and data sets, killed on exit;
    run_eval(workers=...) reuses them for other checkpoints of that model (loaded into running engines)."""
    from cluster.job import local_runtime_env

    scorers = _scorers(data.tasks, protocol)
    announce(f"ray: {init_ray(cfg.cluster, local_runtime_env())}")
    Worker = ray.remote(num_cpus=cfg.cluster.cpus_per_engine,
                        num_gpus=cfg.cluster.gpus_per_engine)(EvalWorker)
    rollout = dataclasses.replace(cfg.rollout, colocate=False)  # nothing trains here: engines keep their GPUs
    seeds = [cfg.train.seed + i for i in range(cfg.cluster.rollout_workers)]
    workers = [Worker.remote(data.model_path, rollout, scorers, cfg.model.trust_remote_code, seed)
               for seed in seeds]
    try:
        yield workers
    finally:
        for w in workers:
            ray.kill(w)


def run_eval(cfg: ExperimentConfig, out_dir: str | Path, protocol: str | None = None,
             base_to_new: bool = False, max_new_tokens: int | None = None,
             workers: list | None = None) -> dict:
    """Evaluate cfg's model: on `workers` from eval_workers (made for the same data sets and protocol)
    when given, else on engines of its own."""
    _scorers({}, protocol)  # a bad protocol fails before any data is read
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    max_new_tokens = max_new_tokens or cfg.rollout.eval_max_new_tokens
    halves = ["base", "new"] if base_to_new else [None]
    loaded = {h: load_run_data(cfg, _with_classes(cfg, h) if h else None) for h in halves}
    first = loaded[halves[0]]
    scorers = _scorers(first.tasks, protocol)
    result: dict = {"model": first.model_path, "max_new_tokens": max_new_tokens, "datasets": {}}
    with contextlib.ExitStack() as own:
        if workers is None:
            workers = own.enter_context(eval_workers(cfg, first, protocol))
        else:
            ray.get([w.load.remote(first.model_path) for w in workers])
        t0 = time.perf_counter()
        for half in halves:
            # references only: each eval worker reads and encodes its chunk's images (bounded memory)
            requests = [RolloutRequest(e.id, e.inputs, e.solution, meta={"dataset": e.dataset},
                                       source=e.source) for e in loaded[half].test_examples]
            rows = _answer_all(workers, requests, cfg.rollout.prompts_per_call, max_new_tokens,
                               f"eval {half} classes" if half else "eval")
            for name in loaded[half].tasks:
                answers = [r for r in rows if r["dataset"] == name]
                key = f"{name}/{half}" if half else name
                result["datasets"][key] = {
                    "protocol": scorers[name], "images": len(answers),
                    "correct": int(sum(r["correct"] for r in answers)),
                    "accuracy": statistics.fmean(r["correct"] for r in answers),
                    "truncated": sum(r["truncated"] for r in answers), "answers": answers}
    accs = {k: v["accuracy"] for k, v in result["datasets"].items()}
    result["mean_accuracy"] = statistics.fmean(accs.values())
    if base_to_new:
        halves_of = {name: (accs[f"{name}/base"], accs[f"{name}/new"]) for name in first.tasks}
        result["base_to_new"] = {name: {"base": b, "new": n, "H": harmonic_mean(b, n)}
                                 for name, (b, n) in halves_of.items()}
    result["seconds"] = time.perf_counter() - t0
    (out_dir / "eval.json").write_text(json.dumps(result, indent=1))
    (out_dir / "eval.md").write_text(markdown_table(result))
    return result


def markdown_table(result: dict) -> str:
    """eval.md: accuracy per data set, then base, new and H per data set when base_to_new."""
    rows = [[name, r["protocol"], r["images"], f"{100 * r['accuracy']:.2f}", r["truncated"]]
            for name, r in result["datasets"].items()]
    rows.append(["**mean**", "", "", f"**{100 * result['mean_accuracy']:.2f}**", ""])
    header = ["data set", "protocol", "images", "accuracy (%)", "cut at the token limit"]
    parts = [f"Model: `{result['model']}`, greedy, at most {result['max_new_tokens']} new tokens.",
             md_table(header, rows, "llr")]
    if "base_to_new" in result:
        b2n = result["base_to_new"]
        base, new = (statistics.fmean(v[half] for v in b2n.values()) for half in ("base", "new"))
        rows = [[n, *(f"{100 * v[k]:.2f}" for k in ("base", "new", "H"))] for n, v in b2n.items()]
        rows.append(["**average**", *(f"**{100 * v:.2f}**" for v in (base, new, harmonic_mean(base, new)))])
        parts.append(md_table(["data set", "base (%)", "new (%)", "H (%)"], rows, "lr"))
    return "\n\n".join(parts) + "\n"
