"""Everything a run holds: the private Redis, Ray, the data, the placement group and the actors in it.

`Job` is a context manager: it starts what the config asks for, resumes from a checkpoint if told to, forms the
weight-sync group and sends the learners' weights to every engine, and tears it all down on exit (errors
included). The loop itself is in cluster/driver.py and talks to the job through a handful of methods.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import ray
import yaml

from actors.learner_actor import LearnerActor
from actors.reward_actor import RewardActor
from actors.rollout_worker import RolloutWorker
from cluster.checkpoint import DriverState, complete_tags, prune_checkpoints, read_checkpoint, tag_for, write_driver_state
from cluster.placement import init_ray, release, reserve
from cluster.scheduler import RolloutScheduler
from cluster.staleness import StalenessManager
from learner.warm_start import format_warm_start
from protocol.config import ExperimentConfig
from protocol.overrides import to_dict
from protocol.rollout import RolloutRequest
from stream.buffer import RolloutBuffer
from stream.server import connect
from tasks.data import load_run_data
from tasks.examples import format_target
from tasks.mixture import MixtureOrder
from telemetry.logs import announce

REPO_ROOT = Path(__file__).resolve().parent.parent


def local_runtime_env() -> dict:
    """What actors of a cluster we start ourselves need: the repo importable, the shared cache, quiet threads."""
    from vlm.cache import default_cache_dir

    cache = default_cache_dir()
    return {"env_vars": {"PYTHONPATH": str(REPO_ROOT), "CLSRL_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
                         "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                         "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(cache / "torch_extensions"))}}


def _death(ref) -> ray.exceptions.RayActorError | None:
    """Why the (finished) call `ref` failed, if it failed because its actor died."""
    try:
        ray.get(ref, timeout=0)
    except ray.exceptions.RayActorError as err:
        return err
    except Exception:  # noqa: BLE001 - failed otherwise, or still running: not a death
        return None
    return None


def _split(items: list, parts: int) -> list[list]:
    size = -(-len(items) // parts)
    return [items[i * size:(i + 1) * size] for i in range(parts)]


class Job:
    def __init__(self, cfg: ExperimentConfig, run_dir: str | Path, resume: str | bool | None = None) -> None:
        self.cfg, self.run_dir, self.resume = cfg, Path(run_dir).resolve(), resume  # actors may run elsewhere
        self.ckpt_root = self.run_dir / "checkpoints"
        self.redis_server = self.placement = None
        self.ray_desc = "existing"
        self.rollout_workers: list = []
        self.learners: list = []
        self.reward_actors: list = []

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
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        self.state = DriverState(step=0, policy_version=0, config=to_dict(cfg))
        resume_tag = None
        if self.resume:
            resume_tag, self.state = read_checkpoint(self.ckpt_root, None if self.resume is True else self.resume)
            self._warn_config_changes(self.state.config)
        self._load_data()
        by_dataset: dict[str, list[str]] = {name: [] for name in self.tasks}
        for e in self.train_examples:
            by_dataset[e.dataset].append(e.id)
        self.order = MixtureOrder(by_dataset, self.weights, cfg.train.seed)
        if resume_tag:  # a data set added or removed since the checkpoint starts fresh / is dropped, with a warning
            self.order.load_state_dict(self.state.data_order["order"], allow_new=True, allow_removed=True)
        self.redis_url, self.redis_server = connect(cfg.redis, self.run_dir)
        self.buffer = RolloutBuffer.from_config(cfg.redis, self.redis_url, consumer="driver")
        left = self.buffer.reset()  # whatever an earlier attempt left is regenerated: its draws are in the checkpoint
        if left:
            announce(f"discarded {left} rollout groups left in stream {cfg.redis.stream!r} by an earlier attempt")
        self._released = 0
        self.ray_desc = init_ray(cfg.cluster, local_runtime_env())
        announce(f"ray: {self.ray_desc}")
        self.placement = reserve(cfg.cluster, name=f"clsrl-{self.run_dir.name}-{os.getpid()}", colocate=cfg.rollout.colocate)
        self._start_actors()
        if resume_tag:
            ray.get([a.load.remote(str(self.ckpt_root), resume_tag) for a in self.learners])
            epochs = ", ".join(f"{name} {e:.2f}" for name, e in self.order.epochs().items())
            announce(f"resumed from {self.ckpt_root / resume_tag}: step {self.state.step}, "
                     f"policy version {self.state.policy_version}, epochs done: {epochs}")
        if not cfg.rollout.colocate:  # colocated engines take IPC handles instead (_share_colocated)
            self.form_weight_group()
        self.broadcast(self.state.policy_version)  # engines start bit-equal to the learners (resumed or not)

    def _warn_config_changes(self, saved: dict) -> None:
        now = json.loads(json.dumps(to_dict(self.cfg)))  # tuples -> lists, as the saved JSON has them
        changed = [f"{s}.{k}: {saved.get(s, {}).get(k)!r} -> {v!r}" for s, sec in now.items() if isinstance(sec, dict)
                   for k, v in sec.items() if saved.get(s, {}).get(k) != v]
        if changed:
            announce("resuming with config changes:\n  " + "\n  ".join(changed))

    def _load_data(self) -> None:
        cfg = self.cfg
        data = load_run_data(cfg)
        self.tasks, self.weights = data.tasks, data.weights
        self.train_examples, self.test_examples = data.train_examples, data.test_examples
        self.examples = {e.id: e for e in self.train_examples + self.test_examples}
        self.model_path = data.model_path
        if cfg.train.warm_start_steps:
            self.model_path = str(format_warm_start(
                data.model_path, self.run_dir / "warm_start", self.train_examples,
                {name: t.prompt for name, t in self.tasks.items()}, cfg.train.warm_start_steps, cfg.train.warm_start_lr,
                cfg.train.prompts_per_step, cfg.train.seed, cfg.model.trust_remote_code))

    def _start_actors(self) -> None:
        cfg, p = self.cfg, self.placement
        Reward = ray.remote(max_restarts=-1, max_task_retries=-1)(RewardActor)
        self.reward_actors = [Reward.options(**p.options("reward", i)).remote({n: t.rewards for n, t in self.tasks.items()})
                              for i in range(cfg.cluster.reward_actors)]
        Rollout = ray.remote(max_restarts=-1, max_task_retries=0)(RolloutWorker)  # we re-issue, the learners dedupe
        correct = {n: t.correct_reward for n, t in self.tasks.items()}
        concurrency = 2 if cfg.rollout.partial_rollout else 1  # partial: receive_weights runs while rollout() samples
        self.rollout_workers = [Rollout.options(max_concurrency=concurrency, **p.options("rollout", i)).remote(
            i, self.model_path, cfg.sampling, cfg.rollout, self.redis_url, cfg.redis, self.reward_actors, correct,
            cfg.model.trust_remote_code, cfg.algorithm.dynamic_sampling, cfg.train.seed)
            for i in range(cfg.cluster.rollout_workers)]
        Learner = ray.remote(LearnerActor)
        n = cfg.cluster.learner_ranks
        self.learners = [Learner.options(**p.options("learner", r)).remote(r, n) for r in range(n)]
        addr, port = ray.get(self.learners[0].address.remote())
        starting = {a.setup.remote(addr, port, self.model_path, cfg.learner, cfg.algorithm, cfg.sequences_per_rank,
                                   cfg.train.steps, self.redis_url, cfg.redis, cfg.model.trust_remote_code): f"learner rank {r}"
                    for r, a in enumerate(self.learners)}
        starting.update({w.info.remote(): f"rollout worker {i}" for i, w in enumerate(self.rollout_workers)})
        starting.update({a.ping.remote(): f"reward actor {i}" for i, a in enumerate(self.reward_actors)})
        ready, late = ray.wait(list(starting), num_returns=len(starting), timeout=cfg.cluster.ready_timeout_s)
        ray.get(ready)  # an actor that failed to start raises here with its own traceback
        if late:
            raise TimeoutError(f"not started within cluster.ready_timeout_s={cfg.cluster.ready_timeout_s:.0f}s: "
                               f"{', '.join(starting[r] for r in late)} (see the Ray logs under /tmp/ray/session_latest/logs)")

    def form_weight_group(self) -> None:
        per = self.cfg.rollout.tensor_parallel_size  # every tensor-parallel worker of an engine is a rank of its own
        n = per * len(self.rollout_workers)
        host, port = ray.get(self.learners[0].open_weight_group.remote(n, self.cfg.weight_sync))
        ray.get([self.learners[0].connect_weight_group.remote()] + [
            w.join_weight_group.remote(host, port, 1 + i * per, n, self.cfg.weight_sync)
            for i, w in enumerate(self.rollout_workers)])

    # ---- the calls the loop makes ----

    def request(self, prompt_id: str, draw: int | None = None) -> RolloutRequest:
        e = self.examples[prompt_id]
        return RolloutRequest(prompt_id, e.inputs, e.solution, meta={"draw": draw, "dataset": e.dataset})

    def scheduler(self) -> RolloutScheduler:
        cfg, saved = self.cfg, self.state.data_order
        staleness = StalenessManager(cfg.train.prompts_per_step, cfg.rollout.max_staleness,
                                     started=self.state.step * cfg.train.prompts_per_step)
        reissue = [(d, pid) for d, pid in saved.get("reissue", []) if pid in self.examples]
        if len(reissue) < len(saved.get("reissue", [])):
            announce(f"{len(saved['reissue']) - len(reissue)} checkpointed prompts belong to data sets this run lacks: dropped")
        return RolloutScheduler(self.rollout_workers, self.order, self.request, staleness, cfg.rollout.prompts_per_call,
                                cfg.train.seed, next_draw=saved.get("next_draw", 0), reissue=reissue)

    def sleep_engines(self) -> None:
        """Colocated: engines release their GPU memory (vLLM: weights and KV cache) until the next broadcast."""
        ray.get([w.sleep.remote() for w in self.rollout_workers])

    def start_train(self, version: int, forget_below: int) -> list:
        per_rank = self.cfg.train.prompts_per_step // len(self.learners)
        return [a.train.remote(per_rank, version, self.cfg.rollout.max_staleness, self.cfg.sampling.max_new_tokens,
                               self.cfg.weight_sync.timeout_s * 10, forget_below) for a in self.learners]

    def finish_train(self, refs: list) -> list[dict]:
        try:
            return ray.get(refs)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError):
            # A dead rank's survivors fail too (their collective lost a peer) and may be the error ray.get raises:
            # look at every rank to tell "a rank died" from a plain error.
            deaths = {r: death for r, ref in enumerate(refs) if (death := _death(ref)) is not None}
            if not deaths:
                raise
            why = next(iter(deaths.values()))
            tags = complete_tags(self.ckpt_root)
            then = (f"its last finished checkpoint is {self.ckpt_root / tags[-1]}: continue with --resume" if tags else
                    f"no checkpoint was finished yet under {self.ckpt_root} (train.save_every): start the run again")
            raise RuntimeError(f"learner rank {', '.join(map(str, deaths))} died during the optimizer step "
                               f"({type(why).__name__}: {str(why).splitlines()[0][:300]}). The run stops; {then}") from None

    def sft_step(self, prompt_ids: list[str]) -> list[dict]:
        """train.mode sft: one supervised step on these prompts' answers, in the task's answer format."""
        rows = [(e.inputs, format_target(self.tasks[e.dataset].prompt, e.solution)) for e in map(self.examples.get, prompt_ids)]
        return self.finish_train([a.sft_train.remote(part) for a, part in zip(self.learners, _split(rows, len(self.learners)))])

    def newly_released(self) -> int:
        """Groups the learners dropped as stale since the last call (their slots go to replacements)."""
        total = self.buffer.released()
        delta, self._released = total - self._released, total
        return delta

    def broadcast(self, version: int, rejoin: bool = False, attempts: int = 3) -> dict:
        """Send the learners' weights to every engine; on a failure, restart the engines that do not answer,
        re-form the group and try again."""
        if self.cfg.rollout.colocate:
            return self._share_colocated(version)
        for attempt in range(1, attempts + 1):
            try:
                if rejoin:
                    self._await_engines()
                    self.form_weight_group()
                sending = [a.broadcast.remote(version) for a in self.learners]
                receiving = [w.receive_weights.remote() for w in self.rollout_workers]
                stats = ray.get(sending)[0]  # first: rank 0's error names the engine that failed, within the timeout
                ray.get(receiving)
                self.state.policy_version = version
                return stats
            except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as err:
                if attempt == attempts:
                    raise
                announce(f"weight broadcast of version {version} failed (attempt {attempt}/{attempts}): "
                         f"{str(err).splitlines()[-1][:500]}\nrestarting the engines that do not answer and re-forming "
                         f"the group", "clsrl.job", logging.WARNING)
                rejoin = True
        raise AssertionError("unreachable")

    def _share_colocated(self, version: int) -> dict:
        """Colocated: learner rank i hands engine i (same GPU) IPC handles to its tensors; the engine wakes, maps
        and loads them. No retries: a colocated engine that dies takes its GPU's learner rank with it."""
        t0 = time.perf_counter()
        shared = ray.get([a.share_weights.remote() for a in self.learners])
        try:
            loaded = ray.get([w.load_ipc.remote(s["handles"], version) for w, s in zip(self.rollout_workers, shared)])
        finally:
            ray.get([a.release_shared.remote() for a in self.learners])
        self.state.policy_version = version
        seconds = time.perf_counter() - t0
        return {"version": version, "tensors": loaded[0]["tensors"], "engines": len(loaded), "bytes": shared[0]["bytes"],
                "seconds": seconds, "mb_per_s": shared[0]["bytes"] / 2**20 / max(seconds, 1e-9)}

    def _await_engines(self) -> None:
        """Every rollout worker answers (Ray restarts dead ones); a stuck one is killed so Ray restarts it."""
        timeout = self.cfg.weight_sync.timeout_s
        probes = {w.info.remote(): i for i, w in enumerate(self.rollout_workers)}
        _, stuck = ray.wait(list(probes), num_returns=len(probes), timeout=timeout)
        for ref in stuck:
            announce(f"rollout worker {probes[ref]} did not answer within weight_sync.timeout_s: killing it so Ray "
                     f"restarts it", "clsrl.job", logging.WARNING)
            ray.kill(self.rollout_workers[probes[ref]], no_restart=False)
        # While Ray restarts an actor, calls to it fail at once (ActorUnavailableError): ask again until it is back.
        deadline = time.monotonic() + self.cfg.cluster.ready_timeout_s
        for i, w in enumerate(self.rollout_workers):
            while True:
                try:
                    ray.get(w.info.remote(), timeout=max(deadline - time.monotonic(), 0.001))
                    break
                except ray.exceptions.ActorUnavailableError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"rollout worker {i} was not restarted within cluster.ready_timeout_s="
                                           f"{self.cfg.cluster.ready_timeout_s:.0f}s") from None
                    time.sleep(0.2)

    def evaluate(self) -> list[dict]:
        reqs = [self.request(e.id) for e in self.test_examples]
        chunks = _split(reqs, len(self.rollout_workers))
        results = ray.get([w.evaluate.remote(c, self.cfg.rollout.eval_max_new_tokens)
                           for w, c in zip(self.rollout_workers, chunks) if c])
        return [r for part in results for r in part]

    def save(self, step: int, scheduler: RolloutScheduler, score: float | None = None) -> Path:
        """Checkpoint learners + driver state (score: held-out accuracy at this step, for train.keep_best)."""
        tag = tag_for(step)
        t0 = time.perf_counter()
        ray.get([a.save.remote(str(self.ckpt_root), tag, {"step": step}) for a in self.learners])
        self.state.step, self.state.data_order, self.state.score = step, scheduler.state_dict(), score
        path = write_driver_state(self.ckpt_root, tag, self.state)
        announce(f"checkpoint {path.parent} ({time.perf_counter() - t0:.1f}s)")
        prune_checkpoints(self.ckpt_root, self.cfg.train.keep_last, self.cfg.train.keep_best)
        return path.parent

    # ---- teardown ----

    def close(self) -> None:
        handles = self.learners + self.rollout_workers
        if handles:
            ray.wait([h.close.remote() for h in handles], num_returns=len(handles), timeout=30)
        for h in handles + self.reward_actors:
            ray.kill(h)
        self.learners, self.rollout_workers, self.reward_actors = [], [], []
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
