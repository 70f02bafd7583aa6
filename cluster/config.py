"""The experiment config: one dataclass per YAML section, keys mapping one-to-one."""
from __future__ import annotations

from dataclasses import dataclass, field

from learner.objective import GRPOConfig
from rewards.composite import RewardTerm
from vlm.generation import SamplingConfig
from vlm.tiny import TinyVLMSpec


@dataclass
class ModelConfig:
    path: str | None = None  # a Hugging Face checkpoint folder; null builds the tiny offline model
    tiny: TinyVLMSpec = field(default_factory=TinyVLMSpec)
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    bundled: str | None = "shapes"  # a data set made locally (tasks.bundled); ignored when root is set
    root: str | None = None  # a manifest folder or an ImageFolder tree (root/train/<class>/*.png)
    name: str | None = None  # the data set's name in prompts and metrics (default: folder name)
    k_shot: int | None = None  # k training images per class; null = all
    seed: int = 0
    min_pixels: int = 56 * 56
    max_pixels: int = 112 * 112
    skip_bad_images: bool = False  # skip (and count) unreadable images instead of stopping
    eval_limit: int | None = None  # evaluate on at most this many test images (null = all)


@dataclass
class TaskConfig:
    prompt: str = "no_think"  # cls_rl | no_think | visual_rft
    thing: str = "object"  # visual_rft prompt: "This is an image containing a(n) {thing}..."
    attribute: str = "category"
    rewards: list[RewardTerm] = field(default_factory=lambda: [RewardTerm("cls_equality")])
    correct_reward: str = "cls_equality"  # which reward decides eval accuracy (1 = correct)


@dataclass
class TrainConfig:
    steps: int = 30
    prompts_per_step: int = 8
    lr: float = 2e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warm_start_steps: int = 0  # supervised steps teaching the answer format (targets: random candidates)
    warm_start_lr: float = 1e-3
    eval_every: int = 10
    seed: int = 0


@dataclass
class DemoConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    algorithm: GRPOConfig = field(default_factory=GRPOConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
