"""Everything a run holds: the private Redis, Ray, the data, the placement group and the actors in it.

`Job` is a context manager: it starts what the config asks for, resumes from a checkpoint if told to, forms
the weight-sync group and sends the learners' weights to every engine, and tears it all down on exit (errors
included). The loop itself is in cluster/driver.py and talks to the job through a handful of methods.
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
import yaml

from actors.learner_actor import LearnerActor
from actors.reward_actor import RewardActor
from actors.rollout_worker import RolloutWorker
from cluster.checkpoint import (
    DriverState,
    prune_checkpoints,
    read_checkpoint,
    tag_for,
    write_driver_state,
)
from cluster.draws import DrawLedger
from cluster.learner_deaths import check_learners_alive, learner_results
from cluster.nodes import check_storage, form_learner_group, placement_nodes, redis_host
from cluster.placement import init_ray, release, reserve
from cluster.scheduler import RolloutScheduler
from cluster.staleness import StalenessManager
from cluster.weight_push import broadcast_weights, form_weight_group, share_colocated
from learner.allocator import allocator_env
from learner.deepspeed_setup import import_deepspeed
from learner.warm_start import format_warm_start
from protocol.config import ExperimentConfig
from protocol.overrides import to_dict
from protocol.results import EvalAnswer, LearnerStep, SFTStep, WeightUpdate
from protocol.rollout import RolloutRequest
from stream.buffer import RolloutBuffer
from stream.server import connect, redact_url
from tasks.data import load_run_data
from tasks.examples import RequestEncoder, format_target
from tasks.mixture import MixtureOrder
from telemetry.logs import announce, note_ray_logs, ray_log_to_driver

REPO_ROOT = Path(__file__).resolve().parent.parent


def local_runtime_env() -> dict:
    """What actors of a cluster we start need: the repo importable, the shared cache, few threads."""
    from vlm.cache import default_cache_dir

    cache = default_cache_dir()
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR", str(cache / "torch_extensions"))
    return {"env_vars": {"PYTHONPATH": str(REPO_ROOT), "CLSRL_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
                         "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                         "TORCH_EXTENSIONS_DIR": extensions}}


def _split(items: list, parts: int) -> list[list]:
    size = -(-len(items) // parts)
    return [items[i * size:(i + 1) * size] for i in range(parts)]


def recorded_config(cfg: ExperimentConfig) -> dict:
    """The config as a run writes it down (config.yaml, checkpoints): a password in a literal redis.url is
    replaced by *** (redis.url: env:NAME keeps it off the command line too)."""
    out = to_dict(cfg)
    if out["redis"].get("url"):
        out["redis"]["url"] = redact_url(out["redis"]["url"])
    return out


class Job:
    def __init__(self, cfg: ExperimentConfig, run_dir: str | Path, resume: str | bool | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir).resolve()  # absolute: actors may run in another working directory
        self.resume = resume
        self.ckpt_root = self.run_dir / "checkpoints"
        self.redis_server = None
        self.placement = None
        self.ray_desc = "existing"
        self.rollout_workers: list = []
        self.learners: list = []
        self.reward_actors: list = []
        self.absent: set[int] = set()  # engines left out of the weight group (their node is gone)
        self.draws: DrawLedger | None = None
        self.formed: dict[int, int] = {}  # engine -> pid, as the weight group was last formed

    # ---- setup ----

    def __enter__(self) -> Job:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(recorded_config(cfg), sort_keys=False))
        self.state = DriverState(step=0, policy_version=0, config=recorded_config(cfg))
        self.learner_env = allocator_env(cfg.learner.allocator)  # a missing allocator fails before Ray starts
        resume_tag = None
        if self.resume:
            wanted = None if self.resume is True else self.resume
            resume_tag, self.state = read_checkpoint(self.ckpt_root, wanted)
            self._warn_config_changes(self.state.config)
        # the data thread's saves (warm start, a first tiny-model build) import DeepSpeed, whose op builders
        # import setuptools' distutils shim under Python's import lock: beside Ray's forks, a deadlock
        import_deepspeed()
        # the data scan, model build and warm start run beside Ray's start-up (seconds at 50k test images)
        with ThreadPoolExecutor(1, thread_name_prefix="clsrl-data") as pool:
            data = pool.submit(self._load_data)
            self.ray_desc = init_ray(cfg.cluster, local_runtime_env(), log_to_driver=ray_log_to_driver())
            data.result()
        by_dataset: dict[str, list[str]] = {name: [] for name in self.tasks}
        for e in self.train_examples:
            by_dataset[e.dataset].append(e.id)
        self.order = MixtureOrder(by_dataset, self.weights, cfg.train.seed)
        if resume_tag:  # a data set added since the checkpoint starts fresh, a removed one is dropped
            self.order.load_state_dict(self.state.data_order["order"], allow_new=True, allow_removed=True)
        announce(f"ray: {self.ray_desc}")
        note_ray_logs(self.run_dir)  # quiet console: where the actors' output is
        # after Ray: a private server listens where every node's actors reach it (cluster/nodes.py)
        self.redis_url, self.redis_server = connect(cfg.redis, self.run_dir, host=redis_host(cfg.redis))
        self.buffer = RolloutBuffer.from_config(cfg.redis, self.redis_url, consumer="driver")
        left = self.buffer.reset()  # an earlier attempt's groups: its draws are in the checkpoint
        if left:
            announce(f"discarded {left} rollout groups left in stream {cfg.redis.stream!r} by an earlier "
                     f"attempt")
        self._released = 0
        group_name = f"clsrl-{self.run_dir.name}-{os.getpid()}"
        self.placement = reserve(cfg.cluster, name=group_name, colocate=cfg.rollout.colocate)
        self._check_storage()
        self._start_actors()
        if resume_tag:
            learner_results([a.load.remote(str(self.ckpt_root), resume_tag) for a in self.learners],
                            "loading the checkpoint", self.ckpt_root)
            epochs = ", ".join(f"{name} {e:.2f}" for name, e in self.order.epochs().items())
            announce(f"resumed from {self.ckpt_root / resume_tag}: step {self.state.step}, "
                     f"policy version {self.state.policy_version}, epochs done: {epochs}")
        if not cfg.rollout.colocate:  # colocated engines take IPC handles instead (_share_colocated)
            self.form_weight_group()
        self.broadcast(self.state.policy_version)  # engines start bit-equal to the learners (resumed or not)

    def _warn_config_changes(self, saved: dict) -> None:
        now = json.loads(json.dumps(recorded_config(self.cfg)))  # tuples -> lists, as the saved JSON has them
        changed = [f"{s}.{k}: {saved.get(s, {}).get(k)!r} -> {v!r}"
                   for s, sec in now.items() if isinstance(sec, dict)
                   for k, v in sec.items() if saved.get(s, {}).get(k) != v]
        if changed:
            announce("resuming with config changes:\n  " + "\n  ".join(changed))

    def _load_data(self) -> None:
        cfg = self.cfg
        data = load_run_data(cfg)
        self.tasks = data.tasks
        self.weights = data.weights
        self.train_examples = data.train_examples
        self.test_examples = data.test_examples
        self.examples = {e.id: e for e in self.train_examples + self.test_examples}
        self.model_path = data.model_path
        self.encode = RequestEncoder(data.model_path, cfg.model.trust_remote_code)
        if cfg.train.warm_start_steps:
            prompts = {name: t.prompt for name, t in self.tasks.items()}
            self.model_path = str(format_warm_start(
                data.model_path, self.run_dir / "warm_start", self.train_examples, prompts,
                cfg.train.warm_start_steps, cfg.train.warm_start_lr, cfg.train.prompts_per_step,
                cfg.train.seed, cfg.model.trust_remote_code))

    def _start_actors(self) -> None:
        cfg = self.cfg
        p = self.placement
        Reward = ray.remote(max_restarts=-1, max_task_retries=-1)(RewardActor)
        rewards = {name: t.rewards for name, t in self.tasks.items()}
        self.reward_actors = [Reward.options(**p.options("reward", i)).remote(terms_by_dataset=rewards)
                              for i in range(cfg.cluster.reward_actors)]
        if not cfg.rollout.colocate:
            self._start_rollout_workers()  # engines load beside the learners
        Learner = ray.remote(LearnerActor)
        n = cfg.cluster.learner_ranks
        extra = {"runtime_env": {"env_vars": self.learner_env}} if self.learner_env else {}
        self.learners = [Learner.options(**p.options("learner", r), **extra).remote(rank=r, world_size=n)
                         for r in range(n)]
        addr, port = form_learner_group(self.learners, cfg.cluster.rendezvous_timeout_s,
                                        cfg.learner.collective_timeout_s)
        starting = {
            a.setup.remote(
                master_addr=addr,
                master_port=port,
                model_path=self.model_path,
                cfg=cfg.learner,
                algo=cfg.algorithm,
                samples_per_rank=cfg.sequences_per_rank,
                total_steps=cfg.train.steps,
                redis_url=self.redis_url,
                redis_cfg=cfg.redis,
                trust_remote_code=cfg.model.trust_remote_code,
            ): f"learner rank {r}"
            for r, a in enumerate(self.learners)
        }
        starting.update({a.ping.remote(): f"reward actor {i}" for i, a in enumerate(self.reward_actors)})
        if cfg.rollout.colocate:
            # engines start once the learners hold their GPU memory: vLLM sizes its cache from the free
            # memory it measures at start, which a learner still loading would change under it
            self._await_started(starting)
            starting = {}
            self._start_rollout_workers()
        starting.update({w.info.remote(): f"rollout worker {i}" for i, w in enumerate(self.rollout_workers)})
        self._await_started(starting)

    def _await_started(self, starting: dict) -> None:
        timeout = self.cfg.cluster.ready_timeout_s
        ready, late = ray.wait(list(starting), num_returns=len(starting), timeout=timeout)
        ray.get(ready)  # an actor that failed to start raises here with its own traceback
        if late:
            raise TimeoutError(f"not started within cluster.ready_timeout_s={timeout:.0f}s: "
                               f"{', '.join(starting[r] for r in late)} (see the Ray logs under "
                               f"/tmp/ray/session_latest/logs)")

    def _start_rollout_workers(self) -> None:
        cfg, p = self.cfg, self.placement
        # no task retries: the scheduler re-issues a dead worker's prompts, the learners drop duplicates
        Rollout = ray.remote(max_restarts=-1, max_task_retries=0)(RolloutWorker)
        concurrency = 2 if cfg.rollout.partial_rollout else 1  # partial: receive_weights beside rollout()
        self.rollout_workers = [
            Rollout.options(max_concurrency=concurrency, **p.options("rollout", i)).remote(
                rank=i,
                model_path=self.model_path,
                sampling=cfg.sampling,
                rollout=cfg.rollout,
                redis_url=self.redis_url,
                redis_cfg=cfg.redis,
                reward_actors=self.reward_actors,
                correct_reward={name: t.correct_reward for name, t in self.tasks.items()},
                trust_remote_code=cfg.model.trust_remote_code,
                drop_equal_groups=cfg.algorithm.dynamic_sampling,
                seed=cfg.train.seed,
            )
            for i in range(cfg.cluster.rollout_workers)
        ]

    def _check_storage(self) -> None:
        """Every node hosting an actor reads the model, run dir and cache; learner nodes write the run dir.
        Paths the driver itself lacks (model.path as a hub id) are not checked."""
        from vlm.cache import default_cache_dir

        seen = {"model.path": self.model_path, "the run directory": str(self.run_dir),
                "the cache ($CLSRL_CACHE)": str(default_cache_dir())}
        readable = {label: path for label, path in seen.items() if Path(path).exists()}
        check_storage(placement_nodes(self.placement.group, self.placement.bundles), readable,
                      {"the run directory": str(self.run_dir)}, self.cfg.cluster.ready_timeout_s)

    def form_weight_group(self) -> None:
        form_weight_group(self.cfg, self.learners, self.rollout_workers)

    # ---- the calls the loop makes ----

    def request(self, prompt_id: str, draw: int | None = None) -> RolloutRequest:
        e = self.examples[prompt_id]
        return RolloutRequest(prompt_id, e.inputs, e.solution, meta={"draw": draw, "dataset": e.dataset},
                              source=e.source)

    def ledger(self) -> DrawLedger:
        """The draw bookkeeping, continued from the checkpoint when resuming."""
        cfg = self.cfg
        saved = self.state.data_order
        staleness = StalenessManager(cfg.train.prompts_per_step, cfg.rollout.max_staleness,
                                     started=self.state.step * cfg.train.prompts_per_step)
        reissue = [(d, pid) for d, pid in saved.get("reissue", []) if pid in self.examples]
        dropped = len(saved.get("reissue", [])) - len(reissue)
        if dropped:
            announce(f"{dropped} checkpointed prompts belong to data sets this run lacks: dropped")
        self.draws = DrawLedger(self.order, staleness, cfg.rollout.prompts_per_call,
                                len(self.rollout_workers), next_draw=saved.get("next_draw", 0),
                                reissue=reissue)
        return self.draws

    def scheduler(self, ledger: DrawLedger) -> RolloutScheduler:
        return RolloutScheduler(self.rollout_workers, ledger, self.request, self.cfg.train.seed)

    def sleep_engines(self) -> None:
        """Colocated: engines release their GPU memory (vLLM: weights, KV cache) until the next broadcast."""
        ray.get([w.sleep.remote() for w in self.rollout_workers])

    def start_train(self, version: int, forget_below: int) -> list:
        cfg = self.cfg
        return [a.train.remote(n_groups=cfg.train.prompts_per_step // len(self.learners), version=version,
                               max_staleness=cfg.rollout.max_staleness, max_len=cfg.sampling.max_new_tokens,
                               take_timeout_s=cfg.weight_sync.timeout_s * 10, forget_below=forget_below,
                               correct_reward={name: t.correct_reward for name, t in self.tasks.items()})
                for a in self.learners]

    def finish_train(self, refs: list) -> list[LearnerStep] | list[SFTStep]:
        return learner_results(refs, "the optimizer step", self.ckpt_root)

    def sft_step(self, prompt_ids: list[str]) -> list[SFTStep]:
        """train.mode sft: one supervised step on these prompts' answers, in the task's answer format."""
        examples = [self.examples[pid] for pid in prompt_ids]
        # the driver encodes this step's prompts only (its examples hold image references, not pixels)
        ready, skipped = self.encode([self.request(pid) for pid in prompt_ids])
        for _, message in skipped:
            announce(f"sft: skipped {message}")
        by_id = {r.prompt_id: r.inputs for r in ready}
        rows = [(by_id[e.id], format_target(self.tasks[e.dataset].prompt, e.solution)) for e in examples
                if e.id in by_id]
        shares = _split(rows, len(self.learners))
        return self.finish_train([a.sft_train.remote(rows=part) for a, part in zip(self.learners, shares)])

    def backlog(self) -> dict[str, float]:
        """The stream as the driver sees it after a step: groups waiting, and taken but not acked."""
        gauges = self.buffer.metrics()
        return {k: gauges[k] for k in ("buffer/depth", "buffer/pending") if k in gauges}

    def epochs_row(self) -> dict[str, float]:
        return {f"data/{name}/epoch": e for name, e in self.order.epochs().items()}

    def newly_released(self) -> int:
        """Groups the learners dropped as stale since the last call (their slots go to replacements)."""
        total = self.buffer.released()
        delta, self._released = total - self._released, total
        return delta

    def broadcast(self, version: int, rejoin: bool = False, attempts: int = 3) -> WeightUpdate:
        """The learners' weights into every engine (cluster/weight_push.py); engines then hold `version`."""
        try:
            if self.cfg.rollout.colocate:
                update = share_colocated(self.learners, self.rollout_workers, version)
            else:
                update, absent = broadcast_weights(self.cfg, self.learners, self.rollout_workers, version,
                                                   rejoin, attempts, self.absent, self.formed)
                self._left_out(absent)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError):
            check_learners_alive(self.learners, "the weight broadcast", self.ckpt_root)
            raise
        self.state.policy_version = version
        return update

    def _left_out(self, absent: set[int]) -> None:
        """Engines the broadcast left out get no work until a later broadcast takes them back."""
        back, self.absent = self.absent - absent, absent
        if back:
            announce(f"rollout worker(s) {sorted(back)} are back in the weight group")
        if self.draws is not None:
            self.draws.dead.update(absent)

    def evaluate(self) -> list[EvalAnswer]:
        reqs = [self.request(e.id) for e in self.test_examples]
        live = [w for i, w in enumerate(self.rollout_workers) if i not in self.absent]
        chunks = _split(reqs, len(live))
        results = ray.get([w.evaluate.remote(c, self.cfg.rollout.eval_max_new_tokens)
                           for w, c in zip(live, chunks) if c])
        return [r for part in results for r in part]

    def save(self, step: int, ledger: DrawLedger, score: float | None = None) -> Path:
        """Checkpoint learners + driver state (score: held-out accuracy at this step, for train.keep_best)."""
        tag = tag_for(step)
        start = time.perf_counter()
        learner_results([a.save.remote(str(self.ckpt_root), tag, {"step": step}) for a in self.learners],
                        "the checkpoint save", self.ckpt_root)
        self.state.step = step
        self.state.data_order = ledger.state_dict()
        self.state.score = score
        path = write_driver_state(self.ckpt_root, tag, self.state)
        announce(f"checkpoint {path.parent} ({time.perf_counter() - start:.1f}s)")
        prune_checkpoints(self.ckpt_root, self.cfg.train.keep_last, self.cfg.train.keep_best)
        return path.parent

    # ---- teardown ----

    def close(self) -> None:
        handles = self.learners + self.rollout_workers
        if handles:
            ray.wait([h.close.remote() for h in handles], num_returns=len(handles), timeout=30)
        for h in handles + self.reward_actors:
            ray.kill(h)
        self.learners = []
        self.rollout_workers = []
        self.reward_actors = []
        release(self.placement)
        self.placement = None
        if getattr(self, "buffer", None) is not None:
            self.buffer.close()
            self.buffer = None
        if self.redis_server is not None:
            self.redis_server.stop()
            self.redis_server = None
        if self.ray_desc != "existing":  # a local cluster we started ends with the run
            ray.shutdown()
            self.ray_desc = "existing"
