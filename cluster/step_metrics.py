"""Every metric of a step, built in one place from what the actors returned (protocol/results.py)."""
from __future__ import annotations

import statistics

from protocol.results import EvalAnswer, LearnerStep, RolloutSummary, SFTStep
from telemetry.collapse import answer_diversity


def rollout_metrics(parts: list[RolloutSummary]) -> dict[str, float]:
    """Over the rollout calls that finished during this step (none when rollout ran far enough ahead)."""
    rewards = [r for p in parts for d in p.datasets.values() for r in d.rewards]
    if not rewards:
        return {}
    lengths = [n for p in parts for n in p.lengths]
    spans = [s for p in parts for s in p.version_spans]  # > 0: continued under newer weights
    filtered = sum(len(p.filtered) for p in parts)
    row = {
        "reward/mean": statistics.fmean(rewards),
        "reward/std": statistics.pstdev(rewards),
        "length/mean": statistics.fmean(lengths),
        "length/max": max(lengths),
        "length/truncated": sum(p.truncated for p in parts) / len(lengths),
        "dropped/filtered": filtered,
        # share of sampled groups dynamic sampling dropped (all rewards equal: no gradient)
        "groups/filtered": filtered / max(1, filtered + sum(len(p.published) for p in parts)),
        "rollout/partial_frac": sum(s > 0 for s in spans) / len(spans),
        "rollout/span_max": max(spans),
    }
    per_dataset = [(name, d) for p in parts for name, d in p.datasets.items()]
    for comp in sorted({c for _, d in per_dataset for c in d.components}):  # data sets' components may differ
        values = [v for _, d in per_dataset for v in d.components.get(comp, [])]
        row[f"reward/{comp}"] = statistics.fmean(values)
    names = sorted({name for name, _ in per_dataset})
    for name in names if len(names) > 1 else []:
        mine = [d for n, d in per_dataset if n == name]
        row[f"reward/{name}/mean"] = statistics.fmean(r for d in mine for r in d.rewards)
        for comp in mine[0].components:
            row[f"reward/{name}/{comp}"] = statistics.fmean(v for d in mine for v in d.components[comp])
    for stage in parts[0].seconds:  # summed over calls and workers: busy seconds, not wall time
        row[f"time/{stage}"] = sum(p.seconds[stage] for p in parts)
    return row


def learner_metrics(ranks: list[LearnerStep]) -> dict[str, float]:
    """Means over ranks of what each rank measured; counts summed; staleness over every trained group."""
    row = {k: statistics.fmean(r.stats[k] for r in ranks) for k in ranks[0].stats}
    lags = [s for r in ranks for s in r.staleness]
    row.update({
        "time/take": statistics.fmean(r.take_seconds for r in ranks),
        "time/train_step": statistics.fmean(r.step_seconds for r in ranks),
        "groups/equal_rewards": statistics.fmean(r.equal_rewards for r in ranks),
        "groups/one_answer": statistics.fmean(r.one_answer for r in ranks),
        "groups/one_wrong_answer": statistics.fmean(r.one_wrong_answer for r in ranks),
        "staleness/mean": statistics.fmean(lags),
        "staleness/max": max(lags),
        "dropped/stale": sum(len(r.stale_draws) for r in ranks),
        "dropped/duplicate": sum(r.duplicates for r in ranks),
        "buffer/lost": sum(r.buffer.get("buffer/lost", 0) for r in ranks),
        "buffer/corrupt": sum(r.buffer.get("buffer/corrupt", 0) for r in ranks),
    })
    return row


def sft_metrics(ranks: list[SFTStep]) -> dict[str, float]:
    row = {k: statistics.fmean(r.stats[k] for r in ranks) for k in ranks[0].stats}
    row["time/train_step"] = statistics.fmean(r.step_seconds for r in ranks)
    return row


def eval_metrics(answers: list[EvalAnswer]) -> dict[str, float]:
    """Greedy held-out accuracy per data set; eval/accuracy is their unweighted mean (each data set counts
    once), with per-data-set rows only when there are several. eval/answer_diversity: distinct answers over
    classes, averaged the same way (a collapsed policy gives one answer to everything)."""
    by_dataset: dict[str, list[EvalAnswer]] = {}
    for a in answers:
        by_dataset.setdefault(a.dataset, []).append(a)
    accuracy = {name: statistics.fmean(a.correct for a in v) for name, v in by_dataset.items()}
    diversity = [answer_diversity([a.text for a in v], [a.solution for a in v]) for v in by_dataset.values()]
    row = {"eval/accuracy": statistics.fmean(accuracy.values()),
           "eval/answer_diversity": statistics.fmean(diversity)}
    if len(accuracy) > 1:
        row.update({f"eval/{name}/accuracy": acc for name, acc in accuracy.items()})
    return row
