"""The TRL side of bench/vs_trl.py: TRL's own GRPOTrainer (CPU, HF generate, no vLLM) on what a clsrl run trains.

    python bench/trl_side.py SPEC.json     # SPEC written by bench/vs_trl.py; writes SPEC's out_dir/trl.json

The spec holds the clsrl config overrides; everything TRL needs is derived from the same ExperimentConfig:
the model folder (the shared warm-start checkpoint), the prompts (clsrl's own encoded examples, turned back into
the exact resized image + question text, so TRL's processor rebuilds byte-identical tokens and patches), the
reward terms (clsrl's CompositeReward wrapped as a TRL reward function) and the GRPO settings (see trl_args).
It runs in its own process so that its torch thread count is its own (vs_trl.py gives it as many busy threads as
each clsrl mode has: 2 by default, one per core).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

T_PROCESS = time.perf_counter()  # start-up is counted from here (imports included, as for clsrl's Ray actors)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CLSRL_CACHE", str(ROOT / ".cache" / "clsrl"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from protocol.config import ExperimentConfig  # noqa: E402
from rewards import CompositeReward  # noqa: E402
from tasks.examples import PromptExample  # noqa: E402


def trl_args(cfg: ExperimentConfig, steps: int, out_dir: Path) -> GRPOConfig:
    """TRL settings matched to clsrl's GRPO: one optimizer step per generation batch of prompts_per_step x n
    samples (so TRL's ratio is 1, like synchronous clsrl), micro-batches of learner.micro_batch_size, the same
    optimizer (AdamW, constant lr, clip), loss aggregation, advantage scaling, clip range and KL coefficient."""
    algo, learner, sampling = cfg.algorithm, cfg.learner, cfg.sampling
    samples = cfg.train.prompts_per_step * sampling.n
    loss_type = {"seq-mean-token-mean": "grpo", "token-mean": "bnpo", "seq-mean-token-sum-norm": "dr_grpo"}[algo.loss_agg]
    if (algo.off_policy != "ppo" or algo.dual_clip is not None or algo.dynamic_sampling or (algo.beta and algo.kl != "k3")
            or learner.lr_schedule != "constant" or learner.warmup_steps):
        raise ValueError("trl_side matches only clsrl's plain GRPO: off_policy ppo, no dual clip, no dynamic sampling, "
                         "k3 KL, constant lr without warmup")
    return GRPOConfig(
        output_dir=str(out_dir), max_steps=steps, seed=cfg.train.seed, use_cpu=not torch.cuda.is_available(),
        bf16=False, gradient_checkpointing=cfg.learner.gradient_checkpointing, report_to=[], logging_steps=1,
        save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        per_device_train_batch_size=learner.micro_batch_size, gradient_accumulation_steps=samples // learner.micro_batch_size,
        num_generations=sampling.n, max_completion_length=sampling.max_new_tokens, temperature=sampling.temperature,
        top_p=sampling.top_p, top_k=sampling.top_k,
        learning_rate=learner.lr, lr_scheduler_type="constant",
        weight_decay=learner.weight_decay, adam_beta1=learner.betas[0], adam_beta2=learner.betas[1],
        max_grad_norm=learner.grad_clip,
        beta=algo.beta, epsilon=algo.clip_low, epsilon_high=algo.clip_high, loss_type=loss_type,
        scale_rewards=algo.advantage_scale, num_iterations=1)


def trl_dataset(examples: list[PromptExample], image_processor):
    """TRL's conversational multimodal format: the question as the user turn, the image in the `image` column
    (TRL puts it before the text, as clsrl's chat_messages does), the solution for the reward function. The
    images stay in memory as PIL objects (a plain `image` column would store PNG bytes and decode them on every
    access, and TRL's sampler fetches each row G x gradient_accumulation_steps times a step)."""
    from datasets import Dataset
    from PIL import Image

    images = [Image.fromarray(e.inputs.image.numpy(), mode="RGB") for e in examples]  # the resized 8-bit image
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": e.text}] for e in examples],
                                 "solution": [e.solution for e in examples], "row": list(range(len(examples)))})
    dataset.set_transform(lambda batch: {**batch, "image": [images[i] for i in batch["row"]]})
    return dataset


def check_same_prompts(processor, examples: list[PromptExample], dataset) -> None:
    """TRL must see the very tokens and pixels clsrl trains on; a template or resize difference stops the bench."""
    from trl.data_utils import prepare_multimodal_messages

    from vlm.inputs import image_patches

    for example, row in zip(examples, dataset, strict=True):
        messages = prepare_multimodal_messages(row["prompt"], images=[row["image"]])
        enc = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                            return_tensors="pt")
        if not torch.equal(enc["input_ids"][0], example.inputs.input_ids):
            raise RuntimeError(f"TRL's prompt tokens differ from clsrl's for {example.id}")
        if not torch.allclose(enc["pixel_values"], image_patches(processor.image_processor, example.inputs), atol=1e-6):
            raise RuntimeError(f"TRL's pixel values differ from clsrl's for {example.id}")


def reward_function(cfg: ExperimentConfig, log: list[list[float]]):
    """clsrl's configured reward terms as a TRL reward function; every call (one per generation batch, i.e. per
    step) is logged, so the reward curve counts exactly the samples scored."""
    composite = CompositeReward(cfg.task.rewards)

    def clsrl_reward(prompts, completions, completion_ids, solution, **_) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        totals, _ = composite(texts, solution, completion_lengths=[len(ids) for ids in completion_ids])
        log.append(totals)
        return totals

    return clsrl_reward


class StepClock(TrainerCallback):
    """Wall time of every optimizer step: from the end of the previous one (or the start of training), so a step
    includes everything TRL's loop does for it (batch loading, generation, scoring, forward/backward, logging)."""

    def __init__(self) -> None:
        self.begin: float | None = None
        self.ends: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        marks = [self.begin, *self.ends]
        return [b - a for a, b in zip(marks, marks[1:])]


class TimedGRPOTrainer(GRPOTrainer):
    """GRPOTrainer unchanged but for a stopwatch around generation + scoring (the rest of a step is training)."""

    generate_seconds: list[float]

    def _generate_and_score_completions(self, inputs):
        t0 = time.perf_counter()
        out = super()._generate_and_score_completions(inputs)
        self.generate_seconds.append(time.perf_counter() - t0)
        return out


def greedy_accuracy(model_dir: Path, cfg: ExperimentConfig, test_examples: list[PromptExample]) -> float:
    """clsrl's own eval on a TRL model folder: greedy answers from the same engine, scored by the task's correct_reward."""
    from actors.eval_worker import greedy_answers
    from actors.hf_engine import HFEngine
    from protocol.rollout import RolloutRequest
    from rewards import get_reward

    engine = HFEngine(model_dir)
    correct = {name: get_reward(t.correct_reward) for name, t in {e.dataset: cfg.task for e in test_examples}.items()}
    from tasks.examples import RequestEncoder

    requests = [RolloutRequest(e.id, e.inputs, e.solution, meta={"dataset": e.dataset}, source=e.source) for e in test_examples]
    rows = greedy_answers(engine, correct, requests, cfg.rollout.eval_max_new_tokens, cfg.rollout.prompts_per_call,
                          RequestEncoder(str(model_dir)))
    return statistics.fmean(r.correct for r in rows)


def run(spec: dict) -> dict:
    from transformers import AutoModelForImageTextToText

    from commands.cli import DEFAULT_CONFIG
    from protocol.overrides import load_config
    from tasks.data import load_run_data
    from vlm.inputs import vision_token_ids
    from vlm.processor import load_processor, save_processor

    torch.set_num_threads(spec["threads"])
    cfg = load_config(ExperimentConfig, DEFAULT_CONFIG, spec["overrides"])
    out_dir = Path(spec["out_dir"])
    data = load_run_data(cfg)
    processor = load_processor(data.model_path)
    processor.tokenizer.padding_side = "left"
    from tasks.examples import encode_source

    for e in data.train_examples:  # load_run_data only scanned them; TRL's side holds the training images
        e.inputs = encode_source(processor, e.source)
    dataset = trl_dataset(data.train_examples, processor.image_processor)
    t_check = time.perf_counter()
    check_same_prompts(processor, data.train_examples, dataset)
    check_s = time.perf_counter() - t_check  # the bench's own check, not TRL's start-up
    model = AutoModelForImageTextToText.from_pretrained(data.model_path, dtype=torch.float32)
    args = trl_args(cfg, spec["steps"], out_dir / "trl")
    # clsrl never samples a vision special token; TRL by default blocks only the image pad token
    args.generation_kwargs = {"suppress_tokens": vision_token_ids(model.config)}
    rewards: list[list[float]] = []
    clock = StepClock()
    trainer = TimedGRPOTrainer(model=model, reward_funcs=reward_function(cfg, rewards), args=args, train_dataset=dataset,
                               processing_class=processor, callbacks=[clock])
    trainer.generate_seconds = []
    trainer.train()
    t_done = time.perf_counter()
    final = out_dir / "trl" / "final"
    trainer.model.save_pretrained(final)
    save_processor(processor, final)
    steps = clock.step_seconds()
    return {"steps": len(steps), "step_seconds": steps, "generate_seconds": trainer.generate_seconds,
            "rewards": [statistics.fmean(r) for r in rewards], "samples_scored": [len(r) for r in rewards],
            "samples_per_step": len(rewards[0]),
            "startup_s": clock.begin - T_PROCESS - check_s,  # imports, data, model, trainer: up to the first step
            "train_s": t_done - clock.begin, "threads": torch.get_num_threads(),
            "grpo_start_accuracy": greedy_accuracy(Path(data.model_path), cfg, data.test_examples),
            "final_accuracy": greedy_accuracy(final, cfg, data.test_examples),
            "log_history": trainer.state.log_history}


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    result = run(spec)
    Path(spec["out_dir"], "trl.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
