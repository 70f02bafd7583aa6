"""One learner rank: a DeepSpeed engine (ZeRO 1/2/3) over the policy, plus the frozen reference model.

A plain class, so it can be tested in-process; the driver hosts one per rank as a Ray actor. All ranks
take part in every call (ZeRO collectives), each with its own share of the rollout groups.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import torch

from learner.deepspeed_setup import import_deepspeed
from learner.kernels import adam_params, attention
from learner.objective import grpo_objective, pad_rows, sft_objective
from learner.zero_buckets import model_hidden_size, zero_buckets
from protocol.components import GRPOConfig, LearnerConfig
from vlm.inputs import build_sequence_batch, vision_token_ids
from vlm.logprobs import completion_logprobs
from vlm.processor import load_processor, save_processor


def lr_lambda(cfg: LearnerConfig, total_steps: int):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return 1.0 - progress if cfg.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def deepspeed_config(cfg: LearnerConfig, grad_accum: int, world_size: int, bf16: bool, cuda: bool,
                     hidden_size: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": cfg.micro_batch_size * grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "optimizer": {"type": "AdamW", "params": {
            "lr": cfg.lr, "betas": list(cfg.betas), "weight_decay": cfg.weight_decay,
            **adam_params(cfg, cuda)}},
        "zero_optimization": {"stage": cfg.zero_stage, **zero_buckets(hidden_size, cfg.zero_stage)},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class LearnerWorker:
    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, model_path: str,
                 cfg: LearnerConfig, algo: GRPOConfig, samples_per_rank: int, total_steps: int,
                 trust_remote_code: bool = False) -> None:
        deepspeed = import_deepspeed()
        from transformers import AutoModelForImageTextToText

        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        cuda = torch.cuda.is_available()
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo",
                                   timeout=timedelta(seconds=cfg.collective_timeout_s))
        self.rank = rank
        self.cfg = cfg
        self.algo = algo
        self.model_path = model_path
        self.trust_remote_code = trust_remote_code
        processor = load_processor(model_path, trust_remote_code)
        self.tokenizer = processor.tokenizer  # tokenizes sft_step's targets
        self.image_processor = processor.image_processor  # rebuilds the patches from the groups' images
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
        if samples_per_rank % cfg.micro_batch_size:
            raise ValueError(f"each learner rank gets {samples_per_rank} sequences per step, not a multiple "
                             f"of learner.micro_batch_size={cfg.micro_batch_size}")
        self.grad_accum = samples_per_rank // cfg.micro_batch_size
        ds_config = deepspeed_config(cfg, self.grad_accum, world_size, self.bf16, cuda,
                                     model_hidden_size(model_path, trust_remote_code))
        self.attn = attention(cfg, cuda, self.bf16)
        # ZeRO-3: while this object lives, transformers builds models under deepspeed.zero.Init, so a rank
        # materialises only its shard of each parameter, never the whole fp32 model (nor the reference)
        self._zero3_init = None
        if cfg.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            self._zero3_init = HfDeepSpeedConfig(ds_config)
        model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32,
                                                            attn_implementation=self.attn,
                                                            trust_remote_code=trust_remote_code)
        if cfg.freeze_vision:
            model.model.visual.requires_grad_(False)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.blocked = vision_token_ids(model.config)
        self.pad_id = model.generation_config.pad_token_id
        self.image_id = model.config.image_token_id
        self.ref = None
        if algo.beta > 0:  # the frozen reference exists only when the KL term does
            ref = AutoModelForImageTextToText.from_pretrained(
                model_path, dtype=torch.bfloat16 if self.bf16 else torch.float32,
                attn_implementation=self.attn, trust_remote_code=trust_remote_code)
            ref.requires_grad_(False).eval()
            if cfg.zero_stage == 3:  # sharded like the policy: a ZeRO-3 engine with no optimizer
                unused = ("optimizer", "gradient_clipping")
                inference = {k: v for k, v in ds_config.items() if k not in unused}
                self.ref, *_ = deepspeed.initialize(model=ref, config=inference)
                self.ref.eval()
            else:
                self.ref = ref.to("cuda" if cuda else "cpu")
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.engine, *_ = deepspeed.initialize(
            model=model, model_parameters=trainable, config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps)))

    def _micro_batches(self, groups) -> Iterator[tuple]:
        rows = []
        for g, adv in groups:
            rows += [(g.request.inputs, c, float(a)) for c, a in zip(g.completions, adv)]
        for i in range(0, len(rows), self.cfg.micro_batch_size):
            chunk = rows[i:i + self.cfg.micro_batch_size]
            batch = build_sequence_batch([r[0] for r in chunk], [r[1].token_ids for r in chunk],
                                         self.pad_id, self.image_id, self.image_processor)
            yield batch, pad_rows([r[1].logprobs for r in chunk]), torch.tensor([r[2] for r in chunk])

    def _to_device(self, batch) -> None:
        for k, v in vars(batch).items():
            setattr(batch, k, v.to(self.engine.device))
        if self.bf16:
            batch.pixel_values = batch.pixel_values.to(torch.bfloat16)

    def train_step(self, groups: list, max_len: int | None = None) -> dict:
        """One optimizer step on this rank's share: `groups` are (RolloutGroup, advantages) pairs."""
        device = self.engine.device
        sums: dict[str, float] = {}
        self.engine.train()
        count = 0
        for batch, old, adv in self._micro_batches(groups):
            self._to_device(batch)
            ref = None
            if self.ref is not None:
                with torch.no_grad():
                    ref = completion_logprobs(self.ref, batch, self.algo.temperature, self.blocked)[0]
            loss, stats = grpo_objective(self.engine, batch, old.to(device), adv.to(device), self.algo,
                                         self.blocked, ref_logprobs=ref, max_len=max_len)
            self.engine.backward(loss)
            self.engine.step()
            count += 1
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        self._check_accumulated(count, "micro-batches")
        return {**{k: v / count for k, v in sums.items()}, **self._optimizer_stats()}

    def _check_accumulated(self, count: int, what: str) -> None:
        # a step over fewer or more micro-batches than DeepSpeed accumulates would misplace the boundary
        if count != self.grad_accum:
            raise RuntimeError(f"learner rank {self.rank} ran {count} {what}, expected {self.grad_accum}")

    def _optimizer_stats(self) -> dict:
        return {"grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                "lr": float(self.engine.get_lr()[0])}

    def sft_step(self, rows: list[tuple]) -> dict:
        """One optimizer step of supervised fine-tuning: `rows` are (PromptInputs, target text) pairs, the
        target tokenized here and closed with the end-of-turn token, loss the token-mean cross-entropy."""
        eos = self.engine.module.generation_config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        losses = []
        self.engine.train()
        for i in range(0, len(rows), self.cfg.micro_batch_size):
            chunk = rows[i:i + self.cfg.micro_batch_size]
            targets = [self.tokenizer.encode(text, add_special_tokens=False) + [eos] for _, text in chunk]
            batch = build_sequence_batch([inputs for inputs, _ in chunk], targets, self.pad_id, self.image_id,
                                         self.image_processor)
            self._to_device(batch)
            loss = sft_objective(self.engine, batch)
            self.engine.backward(loss)
            self.engine.step()
            losses.append(float(loss))
        self._check_accumulated(len(losses), "SFT micro-batches")
        return {"sft_loss": sum(losses) / len(losses), **self._optimizer_stats()}

    def sync_parameters(self, trainable_only: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """Parameters by name, each gathered whole under ZeRO-3 (all ranks must iterate together)."""
        import deepspeed

        for name, param in self.engine.module.named_parameters():
            if trainable_only and not param.requires_grad:
                continue
            if self.cfg.zero_stage == 3:
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    yield name, param.data.detach().clone()
            else:
                yield name, param.data.detach()

    def save_checkpoint(self, ckpt_dir: str, tag: str, client_state: dict, export_hf: bool = True) -> None:
        """DeepSpeed state for resume, plus (rank 0) a save_pretrained export transformers and vLLM load."""
        self.engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state)
        if export_hf:
            state = None
            if self.cfg.zero_stage == 3:  # every rank takes part in each gather; only rank 0 keeps the copy
                state = {n: t.cpu() for n, t in self.sync_parameters(trainable_only=False) if self.rank == 0}
            if self.rank == 0:
                export = Path(ckpt_dir) / tag / "hf"
                if state is None:
                    self.engine.module.save_pretrained(export)
                else:
                    self.engine.module.save_pretrained(export, state_dict=state)
                # the processor too, so the export loads on its own
                save_processor(load_processor(self.model_path, self.trust_remote_code), export)

    def load_checkpoint(self, ckpt_dir: str, tag: str) -> dict:
        _, client_state = self.engine.load_checkpoint(ckpt_dir, tag=tag)
        return client_state or {}

    def kernels(self) -> dict[str, str]:
        """The attention kernel the policy runs and the optimizer DeepSpeed built (learner/kernels.py)."""
        return {"attention": self.engine.module.config._attn_implementation,
                "optimizer": type(self.engine.basic_optimizer).__qualname__}

    def held_parameters(self) -> dict[str, int]:
        """Parameter elements this rank holds (its ZeRO-3 shards, else whole tensors), policy and reference,
        against the models' sizes: what the ZeRO-3 tests check."""
        def held(model) -> tuple[int, int]:
            params = list(model.parameters())
            local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
            return local, sum(getattr(p, "ds_numel", p.numel()) for p in params)

        out = dict(zip(("policy", "policy_total"), held(self.engine.module)))
        if self.ref is not None:
            out.update(zip(("reference", "reference_total"), held(getattr(self.ref, "module", self.ref))))
        return out

    def parameter_checksums(self) -> dict[str, str]:
        """A SHA-256 per parameter (weights/checksum.py), for checking that ranks and engines hold the same
        weights bit for bit."""
        from weights.checksum import checksums

        return checksums(self.sync_parameters(trainable_only=False))

    def close(self) -> None:
        torch.distributed.destroy_process_group()
