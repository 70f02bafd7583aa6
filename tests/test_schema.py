"""Config loading: YAML onto dataclasses, dotted overrides, errors naming the key."""
from __future__ import annotations

import dataclasses
import types
import typing

import pytest

from protocol.components import (
    ADV_SCALES,
    AGGREGATIONS,
    KL_ESTIMATORS,
    OFF_POLICY,
    WEIGHT_SYNC_BACKENDS,
    GRPOConfig,
    OffPolicy,
    WeightSyncBackend,
)
from protocol.config import (
    DATA_FORMATS,
    TASK_FORMATS,
    DataConfig,
    DataFormat,
    DatasetEntry,
    ExperimentConfig,
    PromptStyle,
    TrainConfig,
)
from protocol.overrides import ConfigError, check_fields, load_config, type_hints

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


# ------------------------------------------------------------------------------- choices: Literal-typed keys


def _literal_keys(cls=ExperimentConfig, prefix=""):
    """Every dotted key of the schema whose type is a Literal (through sections and Optional), with its choices."""
    out = {}
    for name, hint in type_hints(cls).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
            hint = args[0]
        if typing.get_origin(hint) is typing.Literal:
            out[prefix + name] = typing.get_args(hint)
        elif dataclasses.is_dataclass(hint):
            out.update(_literal_keys(hint, f"{prefix}{name}."))
    return out


def test_every_fixed_choice_key_is_a_literal():
    assert set(_literal_keys()) == {
        "model.tiny.kind", "data.format", "data.classes", "task.prompt", "algorithm.advantage_scale", "algorithm.kl",
        "algorithm.loss_agg", "algorithm.off_policy", "learner.lr_schedule", "learner.precision", "learner.allocator",
        "learner.attn_implementation", "learner.optimizer", "rollout.engine", "rollout.dtype", "cluster.strategy",
        "redis.appendfsync", "redis.listen", "weight_sync.backend", "train.mode"}


@pytest.mark.parametrize("key", sorted(_literal_keys()))
def test_a_bad_choice_is_refused_at_load_naming_key_choices_and_closest(key):
    choices = _literal_keys()[key]
    typo = choices[-1] + "x"  # one character off the last choice
    with pytest.raises(ConfigError) as err:
        load_config(ExperimentConfig, DEMO, [f"{key}={typo}"])
    listed = ", ".join(map(repr, choices))
    assert str(err.value) == f"config key '{key}' must be one of {listed}, got {typo!r}; did you mean {choices[-1]!r}?"


def test_yaml_typo_in_a_choice_names_the_full_key(tmp_path):
    (tmp_path / "c.yaml").write_text("algorithm:\n  loss_agg: token_mean\n")
    with pytest.raises(ConfigError, match=r"'algorithm.loss_agg' must be one of .*got 'token_mean'; "
                                          r"did you mean 'token-mean'\?"):
        load_config(ExperimentConfig, tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("datasets:\n  - data: {format: cocoo, root: /x}\n")
    with pytest.raises(ConfigError, match=r"'datasets\[0\].data.format' .*got 'cocoo'; did you mean 'coco'\?"):
        load_config(ExperimentConfig, tmp_path / "d.yaml")
    (tmp_path / "e.yaml").write_text("redis:\n  appendfsync: no\n")  # YAML 1.1: unquoted no is False
    with pytest.raises(ConfigError, match=r"'redis.appendfsync' .*got False.*quote the value"):
        load_config(ExperimentConfig, tmp_path / "e.yaml")
    (tmp_path / "e.yaml").write_text("redis:\n  appendfsync: 'no'\n")
    assert load_config(ExperimentConfig, tmp_path / "e.yaml").redis.appendfsync == "no"


def test_a_bad_choice_in_python_fails_at_construction():
    with pytest.raises(ConfigError, match=r"'algorithm.kl' must be one of 'k1', 'k2', 'k3', got 'k9'"):
        ExperimentConfig(algorithm=GRPOConfig(kl="k9"))
    with pytest.raises(ConfigError, match=r"'algorithm.advantage_scale' .*got 'groups'; did you mean 'group'\?"):
        GRPOConfig(advantage_scale="groups")
    with pytest.raises(ConfigError, match=r"'train.mode' .*got 'SFT'; did you mean 'sft'\?"):
        ExperimentConfig(train=TrainConfig(mode="SFT"))
    # a section changed after it was built is caught by the config that takes it, with the full key
    train, data = TrainConfig(), DataConfig()
    train.mode, data.classes = "sfy", "bas"
    with pytest.raises(ConfigError, match=r"'train.mode' .*did you mean 'sft'\?"):
        ExperimentConfig(train=train)
    with pytest.raises(ConfigError, match=r"'datasets\[1\].data.classes' .*did you mean 'base'\?"):
        ExperimentConfig(datasets=[DatasetEntry(), DatasetEntry(data=data)])


@dataclasses.dataclass
class Leaf:
    mode: typing.Literal["a", "b"] = "a"
    maybe: typing.Literal["x"] | None = None


@dataclasses.dataclass
class Root:
    leaves: list[Leaf] = dataclasses.field(default_factory=list)


def test_check_fields_walks_sections_lists_and_optionals():
    check_fields(Root([Leaf(), Leaf("b", "x")]))
    with pytest.raises(ConfigError, match=r"'root.leaves\[1\].maybe' must be one of 'x', got 'y'"):
        check_fields(Root([Leaf(), Leaf("b", "y")]), "root.")


def test_choice_constants_derive_from_the_literals():
    import learner.grpo as grpo
    import tasks.prompts as prompts
    import weights.group as group

    assert OFF_POLICY == typing.get_args(OffPolicy) == grpo.OFF_POLICY
    assert WEIGHT_SYNC_BACKENDS == typing.get_args(WeightSyncBackend) == group.BACKENDS
    # learner/grpo.py dispatches on its own tuples: they must list the same choices the config accepts
    assert (grpo.ADV_SCALES, grpo.KL_ESTIMATORS, grpo.AGGREGATIONS) == (ADV_SCALES, KL_ESTIMATORS, AGGREGATIONS)
    assert typing.get_args(PromptStyle) == prompts.PROMPT_STYLES + prompts.BOX_STYLES + prompts.VQA_STYLES
    assert DATA_FORMATS == typing.get_args(DataFormat)
    assert set(TASK_FORMATS) < set(DATA_FORMATS)
    assert all(set(styles) <= set(typing.get_args(PromptStyle)) for styles in TASK_FORMATS.values())


# ------------------------------------------------------------------------------------------- tuple-typed keys


def test_betas_from_yaml_become_a_tuple_of_floats(tmp_path):
    (tmp_path / "c.yaml").write_text("learner:\n  betas: [0.9, 0.95]\n")
    betas = load_config(ExperimentConfig, tmp_path / "c.yaml").learner.betas
    assert betas == (0.9, 0.95) and isinstance(betas, tuple)
    betas = load_config(ExperimentConfig, DEMO, ["learner.betas=[0.9, 1]"]).learner.betas
    assert betas == (0.9, 1.0) and all(type(b) is float for b in betas)


@pytest.mark.parametrize("value, message", [
    ("[0.9]", r"'learner.betas' must be a list of 2 \(float, float\), got \[0.9\]"),
    ("[0.9, 0.95, 0.99]", r"'learner.betas' must be a list of 2"),
    ("0.9", r"'learner.betas' must be a list of 2 \(float, float\), got 0.9"),
    ("[0.9, high]", r"'learner.betas\[1\]' must be float, got 'high'"),
])
def test_betas_of_the_wrong_shape_or_type_name_the_key(value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ExperimentConfig, DEMO, [f"learner.betas={value}"])
