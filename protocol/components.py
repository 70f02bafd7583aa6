"""The config sections of the components (model spec, sampling, algorithm, learner, Redis, weight sync,
reward terms): plain dataclasses whose fields are the YAML keys, importable by every package."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from protocol.overrides import check_fields

# Keys with a fixed set of values: the Literal is the one source of the choices (checked by
# protocol.overrides.check_fields); the tuples are for code that dispatches on them (learner/, weights/).
TinyKind = Literal["qwen2_vl", "qwen2_5_vl"]
AdvantageScale = Literal["group", "batch", "none"]  # none = Dr. GRPO
KLEstimator = Literal["k1", "k2", "k3"]
LossAgg = Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"]
OffPolicy = Literal["ppo", "tis"]
LRSchedule = Literal["constant", "linear", "cosine"]
Precision = Literal["auto", "fp32", "bf16"]  # auto = bf16 on GPU, fp32 on CPU
Allocator = Literal["system", "jemalloc"]  # the learner ranks' malloc (learner/allocator.py)
AppendFsync = Literal["always", "everysec", "no"]
RedisListen = Literal["auto", "loopback", "cluster"]
# auto = flash-attention 2 on CUDA in bf16 when installed, else sdpa (learner/kernels.py)
AttnImplementation = Literal["auto", "sdpa", "eager", "flash_attention_2"]
# auto = DeepSpeed's FusedAdam on CUDA when prebuilt or nvcc is there, else torch's AdamW (fused on CUDA)
Optimizer = Literal["auto", "torch", "deepspeed"]
WeightSyncBackend = Literal["auto", "gloo", "nccl"]  # auto = nccl when CUDA is available, else gloo

ADV_SCALES: tuple[str, ...] = get_args(AdvantageScale)
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)
AGGREGATIONS: tuple[str, ...] = get_args(LossAgg)
OFF_POLICY: tuple[str, ...] = get_args(OffPolicy)  # learner/grpo.py policy_loss
WEIGHT_SYNC_BACKENDS: tuple[str, ...] = get_args(WeightSyncBackend)
STALE_BEATS = 5  # an engine whose heartbeat has not moved for this many intervals is reported dead


@dataclass
class SamplingConfig:
    """Maps onto the YAML `sampling` section."""

    n: int = 4  # completions per prompt (the GRPO group size G)
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    greedy: bool = False  # evaluation decodes greedily with n = 1

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError(f"sampling.n and sampling.max_new_tokens must be >= 1, "
                             f"got {self.n}, {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"sampling.temperature must be > 0, got {self.temperature} (use greedy: true)")


@dataclass
class TinyVLMSpec:
    """Shape of the tiny model; every field maps onto a YAML key under `model.tiny`."""

    kind: TinyKind = "qwen2_vl"
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vision_depth: int = 2
    vision_hidden_size: int = 64
    min_pixels: int = 56 * 56
    max_pixels: int = 112 * 112
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self, "model.tiny.")
        head_dim = self.hidden_size // self.num_attention_heads
        if head_dim % 8:  # mRoPE splits head_dim/2 into 3 sections
            raise ValueError(f"hidden_size/num_attention_heads must be a multiple of 8, got {head_dim}")


@dataclass
class GRPOConfig:
    """Maps onto the YAML `algorithm` section (defaults: the papers' GRPO)."""

    advantage_scale: AdvantageScale = "group"
    advantage_eps: float = 1e-6
    beta: float = 0.04  # KL coefficient; 0 skips the reference model entirely
    kl: KLEstimator = "k3"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    loss_agg: LossAgg = "seq-mean-token-mean"
    temperature: float = 1.0  # must equal sampling.temperature: the policy is the tempered distribution
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal
    # Off-policy correction for stale (up to max_staleness versions) or engine-mismatched samples; mu =
    # behaviour (engine) policy, prox = this step's own log-probs, r = pi / prox. "ppo": clip(pi / mu).
    # "tis": -min(exp(prox - mu), is_cap) * min(r A, clip(r) A): truncated IS (Yao et al. 2025), which is
    # decoupled PPO (Hilton et al. 2021, AReaL) with a truncated weight; one optimizer step per batch makes
    # r == 1, so the clip is inert and the gradient is -w A grad(logp). See learner.grpo.policy_loss.
    off_policy: OffPolicy = "ppo"
    is_cap: float = 2.0  # truncation C of the "tis" weight (Yao et al. use 2); > 0

    def __post_init__(self) -> None:
        check_fields(self, "algorithm.")
        if isinstance(self.is_cap, bool) or not isinstance(self.is_cap, int | float) or not self.is_cap > 0:
            raise ValueError(f"algorithm.is_cap must be a number > 0, got {self.is_cap!r}")


@dataclass
class LearnerConfig:
    """Maps onto the YAML `learner` section."""

    zero_stage: int = 2
    micro_batch_size: int = 8  # sequences (prompt + one completion) per forward/backward
    lr: float = 1e-6
    lr_schedule: LRSchedule = "constant"  # linear | cosine: decay to 0 over the run, after warmup
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)  # YAML: a list of two numbers
    grad_clip: float = 1.0
    gradient_checkpointing: bool = False
    freeze_vision: bool = False  # train the language model only; only trainable weights are then synced
    precision: Precision = "auto"
    attn_implementation: AttnImplementation = "auto"
    optimizer: Optimizer = "auto"
    collective_timeout_s: float = 600.0  # a dead rank fails the step with an error instead of a 30-min hang
    # jemalloc: less host memory held per rank (ZeRO-3 on CPU: -40% peak RSS) for a slower CPU step
    allocator: Allocator = "system"

    def __post_init__(self) -> None:
        check_fields(self, "learner.")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"learner.zero_stage must be 0-3, got {self.zero_stage}")


@dataclass
class RedisConfig:
    """Maps onto the YAML `redis` section."""

    # an existing server, redis://:password@host:port/db, or env:NAME to read that URL from the environment
    # variable NAME (no password on a command line); null = start a private one
    url: str | None = None
    # private server: where it listens. auto = loopback on a one-node Ray cluster, else the driver node's
    # cluster IP as well (every node's actors reach it); loopback | cluster force one
    listen: RedisListen = "auto"
    appendonly: bool = False  # private server: AOF; a restart on the same run dir keeps stream + pending list
    # Private server with appendonly: when the AOF is fsynced. "always" (the default) fsyncs before Redis
    # replies, so an XADD/XREADGROUP/XACK the client saw succeed is on disk even if the machine dies.
    # "everysec" (Redis' own default) survives a killed redis-server as well (the AOF write() precedes the
    # reply and the page cache outlives the process; 0 entries lost in our SIGKILL trials with any setting)
    # except when a slow disk makes Redis postpone that write, and it loses up to ~2 s of acknowledged entries
    # on a power loss or kernel crash, after which the driver's count of what is in the stream is wrong.
    # "always" costs one fsync per command: measured +0.5-2.5 ms per put (9-300 KB entries) and ~+5 ms per
    # take(20)+ack, i.e. still hundreds of puts/s, far above the rate rollout groups are generated at;
    # correctness of the pending list wins. "no": the OS decides.
    appendfsync: AppendFsync = "always"
    stream_maxlen: int = 10000  # approximate cap on stream entries (see stream/buffer.py on trimming)
    stream: str = "clsrl:rollouts"
    group: str = "learners"
    claim_idle_ms: int = 300_000  # pending this long = its consumer died; must exceed the longest take->ack
    delete_on_ack: bool = True  # XDEL acked entries, so the stream holds only unfinished work
    maxmemory: str | None = None  # private server only, e.g. "8gb": writes fail with OOM instead of swapping
    connect_timeout_s: float = 5.0
    socket_timeout_s: float = 30.0  # per command; take(block_ms=...) must block for less than this
    # Connection errors and timeouts are retried by redis-py itself (stream.server.make_client): a command
    # is tried up to retry_attempts times, waiting min(retry_backoff_max_s, retry_backoff_s * 2**k) before
    # retry k (redis-py's ExponentialBackoff).
    retry_attempts: int = 6
    retry_backoff_s: float = 0.1
    retry_backoff_max_s: float = 5.0
    start_timeout_s: float = 30.0  # private server: time to answer PING (loading a large AOF takes a while)

    def __post_init__(self) -> None:
        check_fields(self, "redis.")
        if self.stream_maxlen < 1:
            raise ValueError(f"redis.stream_maxlen must be >= 1, got {self.stream_maxlen}")
        if self.claim_idle_ms < 0:
            raise ValueError(f"redis.claim_idle_ms must be >= 0, got {self.claim_idle_ms}")
        if self.retry_attempts < 1:
            raise ValueError(f"redis.retry_attempts must be >= 1, got {self.retry_attempts}")
        for name in ("connect_timeout_s", "socket_timeout_s", "start_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"redis.{name} must be > 0, got {getattr(self, name)}")
        if not self.stream or not self.group:
            raise ValueError("redis.stream and redis.group must be non-empty")


@dataclass
class WeightSyncConfig:
    """YAML section `weight_sync`."""

    bucket_mb: float = 64  # flat buckets of at most this many MiB; a larger tensor is sent on its own
    timeout_s: float = 60  # every wait (join, start, each bucket, acks) gives up after this long
    backend: WeightSyncBackend = "auto"
    heartbeat_s: float = 1.0  # engines beat this often; silent for 5 beats while awaited = dead

    def __post_init__(self) -> None:
        check_fields(self, "weight_sync.")
        if self.bucket_mb <= 0:
            raise ValueError(f"weight_sync.bucket_mb must be > 0, got {self.bucket_mb}")
        if self.timeout_s <= 0:
            raise ValueError(f"weight_sync.timeout_s must be > 0, got {self.timeout_s}")
        if self.heartbeat_s <= 0:
            raise ValueError(f"weight_sync.heartbeat_s must be > 0, got {self.heartbeat_s}")

    @property
    def bucket_bytes(self) -> int:
        return max(16, int(self.bucket_mb * 2**20) // 16 * 16)  # a multiple of every element size

    @property
    def stale_s(self) -> float:
        return STALE_BEATS * self.heartbeat_s


@dataclass
class RewardTerm:
    name: str
    weight: float = 1.0
    params: dict = field(default_factory=dict)
