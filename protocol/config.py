"""The experiment config: one dataclass per YAML section, keys mapping one-to-one (see configs/*.yaml)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from protocol.components import (
    GRPOConfig,
    LearnerConfig,
    RedisConfig,
    RewardTerm,
    SamplingConfig,
    TinyVLMSpec,
    WeightSyncConfig,
)
from protocol.overrides import check_fields

# Keys with a fixed set of values: the Literal is the one source of the choices (checked by
# protocol.overrides.check_fields); the tuples below are derived from them for the code that dispatches.
# data.format: auto (manifest or ImageFolder) | coop (CoOp's layout, data.coop names the set) | rft_parquet
# | coco (detection: root/annotations/instances_{train,val}2017.json) | grounding_jsonl | reasonseg
# | vqa_jsonl (tasks/vqa.py)
DataFormat = Literal["auto", "coop", "rft_parquet", "coco", "grounding_jsonl", "reasonseg", "vqa_jsonl"]
ClassSplit = Literal["all", "base", "new"]  # base-to-new runs keep one half of the classes (CoOp: 1st = base)
# task.prompt (tasks/prompts.py): classification, boxes (Visual-RFT detection, LISA-style grounding), VQA
ClassifyPrompt = Literal["cls_rl", "no_think", "visual_rft"]
BoxPrompt = Literal["detection", "grounding"]
VQAPrompt = Literal["vqa", "vqa_think"]  # one-answer VQA: direct, or think/answer
PromptStyle = Literal[ClassifyPrompt, BoxPrompt, VQAPrompt]
Engine = Literal["hf", "vllm"]  # hf = Hugging Face generate (CPU and GPU); vllm = vLLM (GPU)
Dtype = Literal["auto", "fp32", "bf16"]  # auto = bf16 on GPU, fp32 on CPU
PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]  # of Ray's placement group
TrainMode = Literal["grpo", "sft"]

DATA_FORMATS: tuple[str, ...] = get_args(DataFormat)
# formats that are not classification -> the task.prompt styles they take
TASK_FORMATS: dict[str, tuple[str, ...]] = {"coco": ("detection",), "grounding_jsonl": ("grounding",),
                                            "reasonseg": ("grounding",), "vqa_jsonl": get_args(VQAPrompt)}


@dataclass
class ModelConfig:
    path: str | None = None  # a Hugging Face checkpoint folder; null builds the tiny offline model
    tiny: TinyVLMSpec = field(default_factory=TinyVLMSpec)
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    bundled: str | None = "shapes"  # a data set made locally (tasks.bundled); ignored when root is set
    root: str | None = None  # a manifest folder or an ImageFolder tree (root/train/<class>/*.png); see format
    format: DataFormat = "auto"
    test_root: str | None = None  # vqa_jsonl: evaluate on another set (e.g. train on SAT, test on CVBench)
    coop: str | None = None  # format coop: which CoOp data set (oxford_flowers, dtd, eurosat, imagenet, ...)
    categories: list[str] = field(default_factory=list)  # format coco: the categories asked (empty = all)
    name: str | None = None  # the data set's name in prompts and metrics (default: folder name)
    k_shot: int | None = None  # k training images per class; null = all
    seed: int = 0
    min_pixels: int = 56 * 56
    max_pixels: int = 112 * 112
    skip_bad_images: bool = False  # skip (and count) unreadable images instead of stopping
    eval_limit: int | None = None  # evaluate on a seeded sample of this many test images (null = all)
    classes: ClassSplit = "all"

    def __post_init__(self) -> None:
        check_fields(self, "data.")
        bundled_for = {"coco": "shapes_boxes", "grounding_jsonl": "shapes_boxes",
                       "vqa_jsonl": "shapes_vqa"}.get(self.format)
        if self.format != "auto" and not self.root and not (bundled_for and self.bundled == bundled_for):
            raise ValueError(f"data.format {self.format} reads from data.root, which is not set"
                             + (f" (or use data.bundled: {bundled_for})" if bundled_for else ""))
        if self.format == "coop" and not self.coop:
            raise ValueError("data.format coop needs data.coop, the CoOp data set's name "
                             "(e.g. oxford_flowers)")


@dataclass
class TaskConfig:
    prompt: PromptStyle = "no_think"  # which styles fit which data.format: TASK_FORMATS (tasks/data.py)
    thing: str = "object"  # visual_rft prompt: "This is an image containing a(n) {thing}..."
    attribute: str = "category"
    rewards: list[RewardTerm] = field(default_factory=lambda: [RewardTerm("cls_equality")])
    correct_reward: str = "cls_equality"  # which reward decides eval accuracy (1 = correct)

    def __post_init__(self) -> None:
        check_fields(self, "task.")


@dataclass
class DatasetEntry:
    """One data set of a multi-data-set run (an item of the YAML `datasets` list)."""

    weight: float = 1.0  # share of each batch, relative to the other entries' weights
    data: DataConfig = field(default_factory=DataConfig)  # data.name: its name in prompts, metrics, ckpts
    task: TaskConfig = field(default_factory=TaskConfig)  # its prompt style, rewards and eval scoring

    def __post_init__(self) -> None:
        if not self.weight > 0 or self.weight == float("inf"):
            raise ValueError(f"datasets[].weight must be a finite number > 0, got {self.weight}")


@dataclass
class RolloutConfig:
    engine: Engine = "hf"  # vllm: actors/vllm_engine.py
    dtype: Dtype = "auto"
    prompts_per_call: int = 16  # prompts per engine.generate call (each sampled G times)
    eval_max_new_tokens: int = 32  # greedy eval answers are cut here
    max_staleness: int = 0  # versions a trained-on sample may lag; 0 = synchronous (cluster/staleness.py)
    # interrupt generation in flight for a weight update, continue it under the new weights (vlm/partial.py);
    # a completion then mixes versions, its staleness counts from the oldest. Needs max_staleness >= 1.
    partial_rollout: bool = False
    # vLLM only
    tensor_parallel_size: int = 1  # GPUs per engine (cluster.gpus_per_engine must cover them)
    # share of each GPU vLLM may take (weights + KV cache); null = 0.85, or 0.4 when colocated (the learner
    # rank shares the GPU and needs the rest)
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None  # null = the checkpoint's
    enforce_eager: bool = False  # true = no CUDA graphs (faster start, slower decode)
    # engine i shares learner rank i's GPU: it sleeps (vLLM: weights and KV cache released) while the learners
    # train, and takes the new weights through CUDA IPC handles instead of the broadcast (weights/ipc.py)
    colocate: bool = False
    # the image bounds vLLM's processor resizes within and profiles memory for; null = filled in from the
    # data sections (the smallest data.min_pixels, the largest data.max_pixels) when the config is built
    min_pixels: int | None = None
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        check_fields(self, "rollout.")
        if self.engine == "hf" and self.tensor_parallel_size != 1:
            raise ValueError("rollout.tensor_parallel_size > 1 needs rollout.engine: vllm")
        if self.engine == "vllm" and self.partial_rollout:
            raise ValueError("rollout.partial_rollout is implemented for the hf engine only; with vllm, keep "
                             "chunks short (rollout.prompts_per_call) so a weight update waits little")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"rollout.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"rollout.gpu_memory_utilization must be in (0, 1], "
                             f"got {self.gpu_memory_utilization}")
        if self.prompts_per_call < 1:
            raise ValueError(f"rollout.prompts_per_call must be >= 1, got {self.prompts_per_call}")
        if self.max_staleness < 0:
            raise ValueError(f"rollout.max_staleness must be >= 0, got {self.max_staleness}")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"rollout.min_pixels={self.min_pixels} must be <= rollout.max_pixels="
                             f"{self.max_pixels}")
        if self.partial_rollout and self.max_staleness < 1:
            raise ValueError("rollout.partial_rollout needs rollout.max_staleness >= 1: with 0 (synchronous) "
                             "no generation is ever in flight when weights arrive, so there is nothing to "
                             "interrupt")


@dataclass
class ClusterConfig:
    """The resource plan: one placement group holds a bundle per actor."""

    # a Ray cluster to join (auto: the one `ray start` runs here); null = $RAY_ADDRESS (ray job submit),
    # else a new local cluster of the run's own, whatever else runs on the machine
    address: str | None = None
    rollout_workers: int = 2
    cpus_per_engine: float = 1.0
    gpus_per_engine: float = 0.0
    learner_ranks: int = 2
    cpus_per_learner: float = 1.0
    gpus_per_learner: float = 0.0
    reward_actors: int = 1
    cpus_per_reward_actor: float = 0.5
    strategy: PlacementStrategy = "PACK"
    ready_timeout_s: float = 300.0  # waiting for the placement group (cluster autoscaling included)
    # the learners' process group must form within this (else an error naming ranks, nodes, addresses)
    rendezvous_timeout_s: float = 180.0
    # role -> extra Ray resources each of its bundles asks for, e.g. {rollout: {rollout_node: 1}} puts the
    # engines on nodes started with --resources '{"rollout_node": 8}' (docs/multinode.md)
    role_resources: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fields(self, "cluster.")
        for name in ("rollout_workers", "learner_ranks", "reward_actors"):
            if getattr(self, name) < 1:
                raise ValueError(f"cluster.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class TrainConfig:
    # sft: supervised fine-tuning on the answers, the papers' baseline (cluster/steps.py)
    mode: TrainMode = "grpo"
    steps: int = 30
    prompts_per_step: int = 8  # images per step; each sampled sampling.n times (GRPO) or trained once (SFT)
    warm_start_steps: int = 0  # supervised steps teaching the answer format (targets: random candidates)
    warm_start_lr: float = 1e-3
    eval_every: int = 10  # greedy held-out accuracy at step 0, every N steps and at the end (0 = start/end)
    # the step-0 eval; false starts training at once (a whole ImageNet-size test split is minutes of engine
    # time before step 1), as verl's val_before_train
    eval_at_start: bool = True
    save_every: int = 0  # checkpoint every N steps (0 = only at the end)
    keep_last: int = 0  # checkpoints kept: the newest K (0 = keep all) ...
    keep_best: int = 0  # ... plus the K with the best held-out accuracy at their step
    seed: int = 0
    # GRPO collapse warning (telemetry/collapse.py): entropy or gradient-free groups past their bound for this
    # many consecutive steps
    collapse_window: int = 10
    # metric trackers mirroring metrics.jsonl: tensorboard | wandb | mlflow (telemetry/metrics.py; wandb and
    # mlflow: pip install 'clsrl[tracking]')
    loggers: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=lambda: ["tensorboard"])

    def __post_init__(self) -> None:
        check_fields(self, "train.")
        if self.collapse_window < 1:
            raise ValueError(f"train.collapse_window must be >= 1 step, got {self.collapse_window}")
        if self.steps < 1 or self.prompts_per_step < 1:
            raise ValueError(f"train.steps and train.prompts_per_step must be >= 1, "
                             f"got {self.steps}, {self.prompts_per_step}")
        if min(self.eval_every, self.save_every, self.warm_start_steps, self.keep_last, self.keep_best) < 0:
            raise ValueError("train.eval_every, save_every, warm_start_steps, keep_last and keep_best "
                             "must be >= 0")
        if self.keep_best and not self.keep_last:
            raise ValueError("train.keep_best needs train.keep_last >= 1 "
                             "(keep_last: 0 keeps every checkpoint)")


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    datasets: list[DatasetEntry] = field(default_factory=list)  # several data sets; empty = data + task
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    algorithm: GRPOConfig = field(default_factory=GRPOConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        # The sections check their own choices when built; this walk also catches one changed since.
        check_fields(self)
        if self.datasets and (self.data != DataConfig() or self.task != TaskConfig()):
            raise ValueError("give the data either as `data` + `task` (one data set) or as a `datasets` list "
                             "(each entry with its own data, task and weight), not both")
        if self.algorithm.temperature != self.sampling.temperature:
            raise ValueError(f"algorithm.temperature={self.algorithm.temperature} must equal "
                             f"sampling.temperature={self.sampling.temperature}: the policy being trained is "
                             f"the tempered one that sampled")
        ranks, mb = self.cluster.learner_ranks, self.learner.micro_batch_size
        if self.train.prompts_per_step % ranks:
            raise ValueError(f"train.prompts_per_step={self.train.prompts_per_step} must be a multiple of "
                             f"cluster.learner_ranks={ranks} (each rank trains on whole groups)")
        per_rank = self.sequences_per_rank
        if per_rank % mb:
            per = "*sampling.n" if self.train.mode == "grpo" else " (SFT: one per prompt)"
            raise ValueError(f"each learner rank gets prompts_per_step/learner_ranks{per} = {per_rank} "
                             f"sequences per step, not a multiple of learner.micro_batch_size={mb}")
        r, c = self.rollout, self.cluster
        if r.tensor_parallel_size > 1 and c.gpus_per_engine < r.tensor_parallel_size:
            raise ValueError(f"rollout.tensor_parallel_size={r.tensor_parallel_size} needs "
                             f"cluster.gpus_per_engine >= it, got {c.gpus_per_engine}")
        if r.colocate and (r.max_staleness or c.rollout_workers != c.learner_ranks):
            raise ValueError("rollout.colocate: engines sleep while the learners train on the same GPUs, so "
                             "it needs rollout.max_staleness: 0 and one engine per learner rank "
                             "(cluster.rollout_workers == cluster.learner_ranks); got "
                             f"max_staleness={r.max_staleness}, {c.rollout_workers} engines, "
                             f"{c.learner_ranks} ranks")

        self._check_colocated()
        entries = self.dataset_entries()
        if r.min_pixels is None:
            r.min_pixels = min(e.data.min_pixels for e in entries)
        if r.max_pixels is None:
            r.max_pixels = max(e.data.max_pixels for e in entries)

    def _check_colocated(self) -> None:
        r, c = self.rollout, self.cluster
        if not r.colocate:
            return
        if c.gpus_per_engine + c.gpus_per_learner > 1:
            raise ValueError(f"rollout.colocate puts engine i and learner rank i on one GPU, so "
                             f"cluster.gpus_per_engine + cluster.gpus_per_learner must be <= 1 (e.g. 0.5 "
                             f"each), got {c.gpus_per_engine} + {c.gpus_per_learner}; Ray would give the two "
                             f"actors different GPUs and the IPC handles would map onto the wrong one")

    def dataset_entries(self) -> list[DatasetEntry]:
        return self.datasets or [DatasetEntry(1.0, self.data, self.task)]

    @property
    def sequences_per_rank(self) -> int:
        per_prompt = self.sampling.n if self.train.mode == "grpo" else 1
        return self.train.prompts_per_step // self.cluster.learner_ranks * per_prompt
