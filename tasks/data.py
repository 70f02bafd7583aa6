"""A run's data: every data set of the config read, cut to its classes and shots, and turned into prompts.

Shared by training (cluster/job.py) and evaluation (commands/evaluation.py). Prompt ids are
"<data set>/<sample id>", unique run-wide. Images are only scanned here (file there, header readable: a bad
one is named before step 1); the workers that use a prompt read and encode its image (tasks/examples.py).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from protocol.config import TASK_FORMATS, DataConfig, DatasetEntry, ExperimentConfig, TaskConfig
from protocol.overrides import ConfigError
from rewards import CompositeReward, get_reward
from tasks.bundled import ensure_bundled
from tasks.bundled_boxes import ensure_bundled_boxes
from tasks.coop import read_coop
from tasks.detection import k_shot_detection, read_coco_dir
from tasks.examples import (
    PromptExample,
    box_corpus,
    build_examples,
    build_task_examples,
    question_text,
    tokenizer_corpus,
)
from tasks.grounding import read_grounding_jsonl, read_reasonseg
from tasks.manifest import ClassificationDataset, DatasetError, read_dataset
from tasks.parquet import read_rft_parquet
from tasks.prompts import PROMPT_STYLES
from tasks.sampling import base_new_split, k_shot, subset_classes
from tasks.vqa import ensure_bundled_vqa, read_vqa_jsonl
from telemetry.logs import announce
from vlm.cache import default_cache_dir
from vlm.tiny import ensure_tiny_vlm


@dataclass
class RunData:
    model_path: str  # model.path, or the tiny model built for these data sets' vocabulary
    tasks: dict[str, TaskConfig]  # by data set name
    weights: dict[str, float]
    train_examples: list[PromptExample]
    test_examples: list[PromptExample]


@dataclass
class SampleSet:
    """A detection, grounding or VQA data set: samples (tasks/detection.py, grounding.py, vqa.py), split and
    cut."""

    name: str
    train: list
    test: list


def read_entry(d: DataConfig) -> tuple[ClassificationDataset | None, ClassificationDataset | SampleSet]:
    """(the whole classification data set an entry names or None for box sets, what the entry keeps of it)."""
    if d.format in TASK_FORMATS:
        return None, _read_samples(d)
    if d.format == "coop":
        dataset = read_coop(d.root, d.coop)
    elif d.format == "rft_parquet":
        dataset = read_rft_parquet(d.root, default_cache_dir() / "rft_images", name=d.name)
    elif d.root:
        dataset = read_dataset(d.root, name=d.name)
    else:
        bundled = d.bundled or "shapes"
        dataset = read_dataset(ensure_bundled(bundled), name=d.name or bundled)
    if d.classes == "all":
        return dataset, dataset
    base, new = base_new_split(dataset.classnames)
    keep = base if d.classes == "base" else new
    return dataset, ClassificationDataset(dataset.name, keep, subset_classes(dataset.samples, keep))


def _cap_questions(train: list, d: DataConfig) -> list:
    """Class-less sets (grounding, VQA): k_shot caps the training questions, a seeded pick in id order."""
    if not d.k_shot:
        return train
    return sorted(random.Random(d.seed).sample(train, min(d.k_shot, len(train))), key=lambda s: s.id)


def _file(root: Path, default_name: str) -> Path:
    """`root` itself when it names a file, else the file `default_name` inside that folder."""
    return root if root.is_file() else root / default_name


def _read_samples(d: DataConfig) -> SampleSet:
    if d.format == "vqa_jsonl":
        root = Path(d.root) if d.root else ensure_bundled_vqa()
        samples = read_vqa_jsonl(_file(root, "vqa.jsonl"))
        test_root = Path(d.test_root) if d.test_root else None  # e.g. train on SAT, test on CVBench
        test = read_vqa_jsonl(_file(test_root, "vqa.jsonl")) if test_root else samples
        train = [s for s in samples if s.split == "train"]
        train = _cap_questions(train, d)
        return SampleSet(d.name or (root.stem if d.root else "shapes_vqa"), train,
                         [s for s in test if s.split != "train" or test_root is not None])
    root = Path(d.root) if d.root else ensure_bundled_boxes()
    if d.format == "coco":
        cats = d.categories or None
        train, test = read_coco_dir(root, "train2017", cats), read_coco_dir(root, "val2017", cats)
        train_samples = k_shot_detection(train, d.k_shot, d.seed) if d.k_shot else train.samples()
        return SampleSet(d.name or (root.name if d.root else "shapes_boxes"), train_samples, test.samples())
    if d.format == "reasonseg":
        samples = read_reasonseg(root)
    else:
        samples = read_grounding_jsonl(_file(root, "grounding.jsonl"))
    test_split = "test" if any(s.split == "test" for s in samples) else "val"
    train = [s for s in samples if s.split == "train"]
    train = _cap_questions(train, d)
    return SampleSet(d.name or (root.stem if d.root else "shapes_grounding"), train,
                  [s for s in samples if s.split == test_split])


def load_run_data(cfg: ExperimentConfig, entries: list[DatasetEntry] | None = None) -> RunData:
    entries = cfg.dataset_entries() if entries is None else entries
    for i, e in enumerate(entries):  # a bad reward name fails here, not in the reward actor after warm start
        check_rewards(e.task, f"datasets[{i}].task" if cfg.datasets else "task")
    whole, read = zip(*[read_entry(e.data) for e in entries])
    names = [ds.name for ds in read]
    if len(set(names)) != len(names):
        raise ConfigError(
            f"data set names must be unique, got {names}: set datasets[].data.name to tell them apart"
        )
    for ds, e in zip(read, entries):
        want = TASK_FORMATS.get(e.data.format, PROMPT_STYLES)
        if e.task.prompt not in want:
            raise ConfigError(f"data set {ds.name!r} (data.format {e.data.format}) needs task.prompt "
                              f"{'|'.join(want)}, got {e.task.prompt!r}")
    corpus = tokenizer_corpus([w for w in whole if w is not None])  # every class named
    boxes = [ds for ds in read if isinstance(ds, SampleSet)]
    if boxes:
        corpus += box_corpus([question_text(s) for b in boxes for s in b.train + b.test])
    model_path = cfg.model.path or str(ensure_tiny_vlm(cfg.model.tiny, corpus))
    data = RunData(model_path, {ds.name: e.task for ds, e in zip(read, entries)},
                   {ds.name: e.weight for ds, e in zip(read, entries)}, [], [])
    for dataset, entry in zip(read, entries):
        train, test = _examples(dataset, entry.data, entry.task)
        data.train_examples += train
        data.test_examples += test
    return data


def check_rewards(task: TaskConfig, key: str) -> None:
    """Build the task's rewards and its correct_reward as the actors will; ConfigError naming the key."""
    try:
        CompositeReward(task.rewards)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"config key '{key}.rewards': {err}") from err
    try:
        get_reward(task.correct_reward)
    except ValueError as err:
        raise ConfigError(f"config key '{key}.correct_reward': {err}") from err


def _eval_sample(test: list, d: DataConfig) -> list:
    # a seeded sample kept in file order (not the first eval_limit: files are often sorted by class)
    if d.eval_limit and d.eval_limit < len(test):
        keep = set(random.Random(f"{d.seed}:eval").sample(range(len(test)), d.eval_limit))
        test = [s for i, s in enumerate(test) if i in keep]
    return test


def _examples(dataset: ClassificationDataset | SampleSet, d: DataConfig, t: TaskConfig) -> tuple[list, list]:
    processor = None  # scanned only (encode=False): the workers encode
    if isinstance(dataset, SampleSet):
        build = dict(style=t.prompt, min_pixels=d.min_pixels, max_pixels=d.max_pixels,
                     skip_bad_images=d.skip_bad_images, encode=False)
        test = _eval_sample(dataset.test, d)
        train_examples, skipped = build_task_examples(processor, dataset.name, dataset.train, **build)
        test_examples, skipped_test = build_task_examples(processor, dataset.name, test, **build)
        if t.prompt == "detection":
            classes = len({getattr(s, "category", None) for s in dataset.train})
        else:
            classes = "no"
    else:
        train = dataset.split("train")
        if d.k_shot:
            train = k_shot(train, d.k_shot, d.seed, dataset.classnames)
        build = dict(style=t.prompt, min_pixels=d.min_pixels, max_pixels=d.max_pixels, seed=d.seed,
                     skip_bad_images=d.skip_bad_images, thing=t.thing, attribute=t.attribute, encode=False)
        train_examples, skipped = build_examples(processor, dataset, train, **build)
        test = _eval_sample(dataset.split("test"), d)
        test_examples, skipped_test = build_examples(processor, dataset, test, **build)
        classes = len(dataset.classnames)
    if skipped or skipped_test:
        announce(f"{dataset.name}: skipped {len(skipped) + len(skipped_test)} unreadable images; first: "
                 f"{(skipped + skipped_test)[0]}")
    if not train_examples or not test_examples:
        raise DatasetError(f"data set {dataset.name!r} has {len(train_examples)} train and "
                         f"{len(test_examples)} test prompts; both splits need images")
    for e in train_examples + test_examples:
        e.id = f"{dataset.name}/{e.id}"
    announce(f"data: {dataset.name}, {classes} classes, {len(train_examples)} train / "
             f"{len(test_examples)} test prompts")
    return train_examples, test_examples
