"""The shipped configs: every one loads and validates, the paper configs hold the papers' values (methods.md),
they still validate on the tiny CPU plan, and the Ray runtime_env keeps weights and runs out of the upload."""
from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import yaml

import rewards
from protocol.config import ExperimentConfig
from protocol.overrides import ConfigError, load_config
from tasks.examples import format_target
from tasks.prompts import (
    BOX_STYLES,
    DIRECT_INSTRUCTION,
    PROMPT_STYLES,
    THINK_INSTRUCTION,
    VQA_STYLES,
    classification_prompt,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RUNTIME_ENV = CONFIGS / "runtime_env.yaml"
EXPERIMENT_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if p != RUNTIME_ENV)
TINY_CPU = ["model.path=null", "data.root=null", "data.format=auto", "data.bundled=shapes",
            "cluster.gpus_per_engine=0", "cluster.gpus_per_learner=0"]

# Shared by all three papers (methods.md, "Hyperparameters of the reference runs" and "Algorithm").
COMMON = {
    "sampling.temperature": 1.0,
    "algorithm.temperature": 1.0,
    "algorithm.beta": 0.04,
    "algorithm.kl": "k3",
    "algorithm.advantage_scale": "group",
    "algorithm.advantage_eps": 1e-4,  # TRL 0.14, which the reference runs used
    "algorithm.loss_agg": "seq-mean-token-mean",
    "algorithm.dynamic_sampling": False,
    "learner.lr": 1e-6,
    "learner.zero_stage": 3,
    "data.max_pixels": 401408,
    "train.prompts_per_step": 16,  # 1 prompt per GPU x grad accumulation 2 x 8 GPUs
    "train.warm_start_steps": 0,
}
# Per paper: (values, (epochs, k_shot x classes of the configured data set) for the steps arithmetic).
PAPERS = {
    "cls_rl.yaml": ({
        "task.prompt": "cls_rl", "sampling.n": 4, "sampling.max_new_tokens": 1024, "data.k_shot": 4,
        "task.rewards": [("format", 1.0), ("cls_accuracy", 1.0)],
    }, (50, 4 * 102)),  # CLS-RL: 50 epochs, 4-shot Flowers102
    "no_think.yaml": ({
        "task.prompt": "no_think", "sampling.n": 4, "sampling.max_new_tokens": 1024, "data.k_shot": 4,
        "task.rewards": [("cls_equality", 1.0)],
    }, (50, 4 * 102)),
    "visual_rft_cls.yaml": ({
        "task.prompt": "visual_rft", "sampling.n": 8, "sampling.max_new_tokens": 256, "data.k_shot": 1,
        "task.rewards": [("format", 1.0), ("cls_contains", 1.0)], "task.thing": "plant", "task.attribute": "species",
    }, (1, 1 * 102)),  # Visual-RFT: 1 epoch, one-shot Flower102 (Table 2)
}
for _k in (2, 4, 8, 16):  # Visual-RFT's other shot counts: one file each, 1 epoch of k shots
    PAPERS[f"visual_rft_cls_{_k}shot.yaml"] = ({**PAPERS["visual_rft_cls.yaml"][0], "data.k_shot": _k}, (1, _k * 102))
PAPERS["cls_rl_b2n.yaml"] = ({**PAPERS["cls_rl.yaml"][0], "data.classes": "base"}, (50, 4 * 51))  # base half
PAPERS["no_think_b2n.yaml"] = ({**PAPERS["no_think.yaml"][0], "data.classes": "base"}, (50, 4 * 51))


def _get(cfg, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    if dotted == "task.rewards":
        return [(t.name, t.weight) for t in value]
    return value


def _check_paper_values(name: str, cfg: ExperimentConfig) -> None:
    values, (epochs, images) = PAPERS[name]
    for key, want in {**COMMON, **values}.items():
        got = _get(cfg, key)
        assert got == want, f"{name}: {key} = {got!r}, methods.md says {want!r}"
    assert cfg.train.steps == math.ceil(epochs * images / cfg.train.prompts_per_step), name
    assert cfg.model.path and Path(cfg.model.path).name == "Qwen2-VL-2B-Instruct", name


def test_the_paper_configs_are_there():
    assert {p.name for p in EXPERIMENT_CONFIGS} >= set(PAPERS)


@pytest.mark.parametrize("path", EXPERIMENT_CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_its_rewards_resolve(path):
    cfg = load_config(ExperimentConfig, path)
    for entry in cfg.dataset_entries():
        assert entry.task.prompt in PROMPT_STYLES + BOX_STYLES + VQA_STYLES
        composite = rewards.CompositeReward(entry.task.rewards)  # unknown names or params raise here
        assert set(composite.names) <= set(rewards.available())
        assert entry.task.correct_reward in rewards.available()
        rewards.get_reward(entry.task.correct_reward)


def test_datasets_list_and_single_data_section_exclude_each_other():
    with pytest.raises(ConfigError, match="either as `data` \\+ `task`"):
        load_config(ExperimentConfig, CONFIGS / "cpu_multi.yaml", ["data.k_shot=4"])
    with pytest.raises(ConfigError, match=r"section 'datasets\[1\]'.*weight must be"):
        load_config(ExperimentConfig, CONFIGS / "cpu_multi.yaml", ["datasets=[{weight: 1}, {weight: -2}]"])
    with pytest.raises(ConfigError, match=r"unknown config key 'datasets\[0\].task.promt'"):
        load_config(ExperimentConfig, CONFIGS / "cpu_multi.yaml", ["datasets=[{task: {promt: cls_rl}}]"])
    with pytest.raises(ConfigError, match="keep_best needs train.keep_last"):
        load_config(ExperimentConfig, CONFIGS / "cpu_demo.yaml", ["train.keep_best=1"])


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_paper_hyperparameters_match_methods_md(name):
    _check_paper_values(name, load_config(ExperimentConfig, CONFIGS / name))


def test_the_check_itself_catches_a_wrong_value():
    cfg = load_config(ExperimentConfig, CONFIGS / "cls_rl.yaml", ["learner.lr=1e-5"])
    with pytest.raises(AssertionError, match="learner.lr"):
        _check_paper_values("cls_rl.yaml", cfg)
    cfg = load_config(ExperimentConfig, CONFIGS / "visual_rft_cls.yaml", ["train.steps=8"])
    with pytest.raises(AssertionError):
        _check_paper_values("visual_rft_cls.yaml", cfg)


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_paper_config_plans_one_8_gpu_node(name):
    cfg = load_config(ExperimentConfig, CONFIGS / name)
    c = cfg.cluster
    assert c.rollout_workers * c.gpus_per_engine + c.learner_ranks * c.gpus_per_learner == 8
    assert cfg.learner.precision == "auto" and cfg.rollout.dtype == "auto"
    assert cfg.sequences_per_rank % cfg.learner.micro_batch_size == 0


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_paper_config_validates_on_the_tiny_cpu_plan(name):
    cfg = load_config(ExperimentConfig, CONFIGS / name, TINY_CPU)
    assert cfg.model.path is None and cfg.data.root is None and cfg.data.bundled == "shapes"
    assert cfg.cluster.gpus_per_engine == 0 and cfg.cluster.gpus_per_learner == 0
    assert cfg.sampling.n == PAPERS[name][0]["sampling.n"]  # the paper's group size survives the overrides


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_prompt_style_and_rewards_agree(name):
    """A right answer in the prompt's own format earns every reward; a wrong one is not counted correct."""
    cfg = load_config(ExperimentConfig, CONFIGS / name)
    classnames = ["desert rose", "sunflower", "tiger lily"]
    prompt = classification_prompt(cfg.task.prompt, classnames, "desert rose", cfg.data.name or "", random.Random(0),
                                   thing=cfg.task.thing, attribute=cfg.task.attribute)
    names = [t.name for t in cfg.task.rewards]
    assert (THINK_INSTRUCTION in prompt) == ("format" in names)
    assert (DIRECT_INSTRUCTION in prompt) == (cfg.task.prompt == "no_think")
    composite = rewards.CompositeReward(cfg.task.rewards)
    correct = rewards.get_reward(cfg.task.correct_reward)
    right, wrong = format_target(cfg.task.prompt, "desert rose"), format_target(cfg.task.prompt, "sunflower")
    totals, _ = composite([right, wrong], ["desert rose", "desert rose"])
    assert totals[0] == pytest.approx(sum(t.weight for t in cfg.task.rewards))
    assert totals[1] < totals[0]
    assert correct([right, wrong], ["desert rose", "desert rose"]) == [1.0, 0.0]


@pytest.mark.parametrize("override, message", [
    ("train.prompts_per_step=18", "multiple of cluster.learner_ranks"),
    ("learner.micro_batch_size=3", "not a multiple of learner.micro_batch_size"),
    ("sampling.temperature=0.7", "must equal sampling.temperature"),
])
def test_broken_paper_configs_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ExperimentConfig, CONFIGS / "cls_rl.yaml", [override])


def test_unknown_reward_in_a_config_is_rejected(tmp_path):
    data = yaml.safe_load((CONFIGS / "cls_rl.yaml").read_text())
    data["task"]["rewards"].append({"name": "cls_acuracy"})
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(data))
    cfg = load_config(ExperimentConfig, tmp_path / "typo.yaml")
    with pytest.raises(rewards.UnknownRewardError):
        rewards.CompositeReward(cfg.task.rewards)


def test_runtime_env_is_a_valid_ray_runtime_env():
    from ray.runtime_env import RuntimeEnv

    data = yaml.safe_load(RUNTIME_ENV.read_text())  # what `ray job submit --runtime-env` does
    assert isinstance(data, dict) and set(data) <= RuntimeEnv.known_fields
    RuntimeEnv(**data)  # Ray's own validation of every field
    env = data["env_vars"]
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    assert env["HF_HUB_OFFLINE"] == "1" and env["TOKENIZERS_PARALLELISM"] == "false"


def test_runtime_env_excludes_runs_caches_and_weights():
    # The matcher Ray applies to the working dir before upload (ray is pinned to 2.60.* in pyproject.toml).
    from ray._private.runtime_env.packaging import _get_excludes

    excludes = yaml.safe_load(RUNTIME_ENV.read_text())["excludes"]
    assert "runs/" in excludes and ".cache/" in excludes
    root = CONFIGS.parent
    skipped = _get_excludes(root, excludes)
    for rel in ["runs/demo-1/metrics.jsonl", "runs/x/checkpoints/step-10/model.safetensors", ".cache/clsrl/tiny/a.json",
                ".venv/bin/python", "weights/model-00001-of-00002.safetensors", "pytorch_model.bin",
                "out/checkpoint-100/optimizer.pt", "runs/x/tensorboard/events.out.tfevents.1.host"]:
        assert skipped(root / rel), f"{rel} would be uploaded"
    for rel in ["protocol/config.py", "configs/cls_rl.yaml", "rewards/__init__.py", "pyproject.toml"]:
        assert not skipped(root / rel), f"{rel} would be left out"
