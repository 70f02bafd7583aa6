"""The in-process GRPO loop on the embedded default: one process, no Ray, no Redis.

It runs the same core the distributed runtime uses (prompt building, HF sampling, rewards, GRPO
advantages and loss) end to end, and shows learning on the bundled data in minutes on a CPU.
"""
from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from cluster.config import DemoConfig
from learner.grpo import equal_reward_groups, group_advantages
from learner.objective import grpo_objective, pad_rows, sft_objective
from rewards import CompositeReward, get_reward
from tasks.bundled import ensure_bundled
from tasks.examples import PromptExample, build_examples, candidates_in, format_target, tokenizer_corpus
from tasks.manifest import read_dataset
from tasks.sampling import k_shot
from vlm.generation import SamplingConfig, sample_completions
from vlm.inputs import build_sequence_batch, vision_token_ids
from vlm.logprobs import completion_logprobs
from vlm.processor import load_processor
from vlm.tiny import ensure_tiny_vlm


def load_policy(cfg: DemoConfig, datasets):
    from transformers import AutoModelForImageTextToText

    path = cfg.model.path or ensure_tiny_vlm(cfg.model.tiny, tokenizer_corpus(datasets))
    processor = load_processor(path, cfg.model.trust_remote_code)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32,
                                                        trust_remote_code=cfg.model.trust_remote_code)
    return model, processor


def evaluate(model, tokenizer, examples: list[PromptExample], correct, batch: int = 16) -> float:
    """Greedy accuracy: the share of test prompts whose answer the task's correctness reward scores 1."""
    model.eval()
    hits = 0.0
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        outs = sample_completions(model, tokenizer, [e.inputs for e in chunk],
                                  SamplingConfig(n=1, max_new_tokens=32, greedy=True))
        hits += sum(correct([o[0].text for o in outs], [e.solution for e in chunk]))
    return hits / max(len(examples), 1)


def sequence_batch(model, prompts, token_rows):
    return build_sequence_batch(prompts, token_rows, model.generation_config.pad_token_id, model.config.image_token_id)


def warm_start(model, tokenizer, examples, cfg: DemoConfig, rng: random.Random) -> None:
    """Teach the answer format with random candidates as targets, so any gain after it comes from GRPO."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.warm_start_lr)
    eos = model.generation_config.eos_token_id
    model.train()
    for _ in tqdm(range(cfg.train.warm_start_steps), desc="warm start (format only)", leave=False):
        chunk = rng.sample(examples, min(cfg.train.prompts_per_step, len(examples)))
        targets = [format_target(cfg.task.prompt, rng.choice(candidates_in(e.text) or [e.solution])) for e in chunk]
        rows = [tokenizer.encode(t, add_special_tokens=False) + [eos] for t in targets]
        loss = sft_objective(model, sequence_batch(model, [e.inputs for e in chunk], rows))
        opt.zero_grad()
        loss.backward()
        opt.step()


def grpo_step(model, ref_model, opt, tokenizer, chunk: list[PromptExample], reward: CompositeReward,
              cfg: DemoConfig, seed: int) -> dict:
    t0 = time.perf_counter()
    model.eval()
    groups = sample_completions(model, tokenizer, [e.inputs for e in chunk], cfg.sampling, seed=seed)
    comps = [c for g in groups for c in g]
    prompts = [e.inputs for e, g in zip(chunk, groups) for _ in g]
    solutions = [e.solution for e, g in zip(chunk, groups) for _ in g]
    t1 = time.perf_counter()
    totals, parts = reward([c.text for c in comps], solutions, completion_lengths=[len(c.token_ids) for c in comps])
    rewards = torch.tensor(totals)
    adv = group_advantages(rewards, cfg.sampling.n, scale=cfg.algorithm.advantage_scale, eps=cfg.algorithm.advantage_eps)
    keep = torch.ones(len(comps), dtype=torch.bool)
    if cfg.algorithm.dynamic_sampling:
        keep = ~equal_reward_groups(rewards, cfg.sampling.n).repeat_interleave(cfg.sampling.n)
    t2 = time.perf_counter()
    stats: dict = {}
    if keep.any():
        idx = keep.nonzero().flatten().tolist()
        batch = sequence_batch(model, [prompts[i] for i in idx], [comps[i].token_ids for i in idx])
        old = pad_rows([comps[i].logprobs for i in idx])
        blocked = vision_token_ids(model.config)
        ref = None
        if ref_model is not None:
            with torch.no_grad():
                ref = completion_logprobs(ref_model, batch, cfg.algorithm.temperature, blocked)[0]
        model.train()
        loss, stats = grpo_objective(model, batch, old, adv[keep], cfg.algorithm, blocked, ref_logprobs=ref,
                                     max_len=cfg.sampling.max_new_tokens)
        opt.zero_grad()
        loss.backward()
        stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip))
        opt.step()
        stats["loss"] = float(loss.detach())
    lengths = [len(c.token_ids) for c in comps]
    return {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            **{f"reward/{k}": sum(v) / len(v) for k, v in parts.items()},
            "length/mean": sum(lengths) / len(lengths), "length/max": max(lengths),
            "length/truncated": sum(c.finish_reason == "length" for c in comps) / len(comps),
            "kept_fraction": float(keep.float().mean()), **stats,
            "time/generate": t1 - t0, "time/reward": t2 - t1, "time/train": time.perf_counter() - t2}


def run_demo(cfg: DemoConfig, run_dir: Path) -> dict:
    """Warm start (optional), then GRPO; writes metrics.jsonl; returns the before/after accuracies."""
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.train.seed)
    rng = random.Random(cfg.train.seed)
    root = cfg.data.root or ensure_bundled(cfg.data.bundled or "shapes")
    dataset = read_dataset(root, name=cfg.data.name)
    train_samples = dataset.split("train")
    if cfg.data.k_shot:
        train_samples = k_shot(train_samples, cfg.data.k_shot, cfg.data.seed, dataset.classnames)
    test_samples = dataset.split("test")[: cfg.data.eval_limit or None]
    model, processor = load_policy(cfg, [dataset])
    tok = processor.tokenizer
    build = dict(style=cfg.task.prompt, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels,
                 seed=cfg.data.seed, skip_bad_images=cfg.data.skip_bad_images, thing=cfg.task.thing,
                 attribute=cfg.task.attribute)
    train, skipped = build_examples(processor, dataset, train_samples, **build)
    test, skipped_test = build_examples(processor, dataset, test_samples, **build)
    if skipped or skipped_test:
        print(f"skipped {len(skipped) + len(skipped_test)} unreadable images, first: {(skipped + skipped_test)[0]}")
    reward = CompositeReward(cfg.task.rewards)
    correct = get_reward(cfg.task.correct_reward)
    metrics = (run_dir / "metrics.jsonl").open("w")

    def log(row: dict) -> None:
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()

    zero_shot = evaluate(model, tok, test, correct)
    if cfg.train.warm_start_steps:
        warm_start(model, tok, train, cfg, rng)
    start = evaluate(model, tok, test, correct)
    log({"step": 0, "eval/accuracy": start, "eval/zero_shot_accuracy": zero_shot})
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if cfg.algorithm.beta > 0 else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    order: list[PromptExample] = []
    bar = tqdm(range(1, cfg.train.steps + 1), desc="GRPO")
    for step in bar:
        while len(order) < cfg.train.prompts_per_step:  # epoch-wise reshuffle, no prompt skipped
            epoch = train[:]
            rng.shuffle(epoch)
            order += epoch
        chunk, order = order[: cfg.train.prompts_per_step], order[cfg.train.prompts_per_step:]
        row = {"step": step, **grpo_step(model, ref_model, opt, tok, chunk, reward, cfg, seed=cfg.train.seed * 100003 + step)}
        if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
            row["eval/accuracy"] = evaluate(model, tok, test, correct)
        log(row)
        bar.set_postfix(reward=f"{row['reward/mean']:.2f}", acc=row.get("eval/accuracy", ""))
    metrics.close()
    return {"zero_shot": zero_shot, "grpo_start": start, "final": row.get("eval/accuracy", start)}
