"""Config loading: YAML onto dataclasses, dotted overrides, errors naming the key."""
from __future__ import annotations

import pytest

from protocol.config import ExperimentConfig
from protocol.overrides import ConfigError, load_config

DEMO = "configs/cpu_demo.yaml"


def test_demo_config_loads():
    cfg = load_config(ExperimentConfig, DEMO)
    assert cfg.sampling.n == 8 and cfg.task.rewards[0].name == "cls_equality" and cfg.algorithm.beta == 0.0


def test_overrides_are_typed():
    cfg = load_config(ExperimentConfig, DEMO, ["learner.lr=3e-5", "sampling.n=4", "data.root=/x", "algorithm.dual_clip=3"])
    assert cfg.learner.lr == 3e-5 and cfg.sampling.n == 4 and cfg.data.root == "/x" and cfg.algorithm.dual_clip == 3.0


@pytest.mark.parametrize("override, message", [
    ("train.stpes=3", "unknown config key 'train.stpes'; did you mean 'train.steps'?"),
    ("trian.steps=3", "did you mean 'train'?"),
    ("sampling.n=four", "config key 'sampling.n' must be int"),
    ("train.steps.x=1", "is a value, not a section"),
    ("steps", "must look like key.path=value"),
])
def test_override_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(ExperimentConfig, DEMO, [override])
    assert message in str(err.value)


def test_yaml_typo_and_validation(tmp_path):
    (tmp_path / "c.yaml").write_text("model:\n  tiny:\n    hiden_size: 64\n")
    with pytest.raises(ConfigError, match="'model.tiny.hiden_size'; did you mean 'model.tiny.hidden_size'"):
        load_config(ExperimentConfig, tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("sampling:\n  temperature: 0\n")
    with pytest.raises(ConfigError, match="sampling.temperature must be > 0"):
        load_config(ExperimentConfig, tmp_path / "d.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(ExperimentConfig, tmp_path / "missing.yaml")


def test_cross_section_rules_name_the_keys():
    with pytest.raises(ConfigError, match="train.prompts_per_step=15 must be a multiple of cluster.learner_ranks=2"):
        load_config(ExperimentConfig, DEMO, ["train.prompts_per_step=15"])
    with pytest.raises(ConfigError, match="learner.micro_batch_size=48"):
        load_config(ExperimentConfig, DEMO, ["learner.micro_batch_size=48"])
    with pytest.raises(ConfigError, match="algorithm.temperature"):
        load_config(ExperimentConfig, DEMO, ["sampling.temperature=0.7"])
