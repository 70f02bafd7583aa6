"""The format-only warm start: a few supervised steps that teach a random model to answer with a class name.

Targets are *random* candidates from each prompt's list, so the model learns the answer format but not which
class is right; any accuracy gain after it comes from GRPO. Runs in the driver before the learner group starts
and writes the starting checkpoint every rank and engine loads.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch
from tqdm import tqdm

from learner.deepspeed_setup import import_deepspeed
from learner.objective import sft_objective
from tasks.examples import PromptExample, candidates_in, encode_source, format_target
from vlm.cache import build_once
from vlm.inputs import build_sequence_batch


def format_warm_start(model_path: str | Path, out_dir: str | Path, examples: list[PromptExample],
                      styles: dict[str, str], steps: int, lr: float, batch: int, seed: int,
                      trust_remote_code: bool = False) -> Path:
    """Train `steps` SFT steps from model_path and save model + processor to out_dir (once: reused on
    resume). `styles` maps each example's data set to its prompt style (the answer format taught)."""
    def build(out: Path) -> None:
        from transformers import AutoModelForImageTextToText

        from vlm.processor import load_processor, save_processor

        torch.manual_seed(seed)
        rng = random.Random(seed)
        processor = load_processor(model_path, trust_remote_code)
        model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32,
                                                            trust_remote_code=trust_remote_code)
        tok = processor.tokenizer
        eos = model.generation_config.eos_token_id
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        model.train()
        for _ in tqdm(range(steps), desc="warm start (answer format only)", leave=False):
            chunk = rng.sample(examples, min(batch, len(examples)))
            targets = [format_target(styles[e.dataset], rng.choice(candidates_in(e.text) or [e.solution]))
                       for e in chunk]
            rows = [tok.encode(t, add_special_tokens=False) + [eos] for t in targets]
            inputs = [e.inputs or encode_source(processor, e.source) for e in chunk]  # encoded as used
            loss = sft_objective(model, build_sequence_batch(inputs, rows,
                                                             model.generation_config.pad_token_id,
                                                             model.config.image_token_id,
                                                             processor.image_processor))
            opt.zero_grad()
            loss.backward()
            opt.step()
        import_deepspeed()  # save_pretrained imports DeepSpeed through accelerate: without MLflow, 1.7 s less
        model.save_pretrained(out)
        save_processor(processor, out)
        (out / "warm_start.done").write_text(f"{steps} steps, lr {lr}, seed {seed}\n")

    return build_once(Path(out_dir), "warm_start.done", build)
