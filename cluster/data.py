"""A run's data: every data set of the config read, cut to its classes and shots, and encoded into prompts.

Shared by training (cluster/job.py) and evaluation (cluster/evaluation.py). Prompt ids are
"<data set>/<sample id>", unique run-wide.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from cluster.config import DataConfig, DatasetEntry, ExperimentConfig, TaskConfig
from cluster.logs import announce
from tasks.bundled import ensure_bundled
from tasks.coop import read_coop
from tasks.examples import PromptExample, build_examples, tokenizer_corpus
from tasks.manifest import ClassificationDataset, read_dataset
from tasks.parquet import read_rft_parquet
from tasks.sampling import base_new_split, k_shot, subset_classes
from vlm.cache import default_cache_dir
from vlm.processor import load_processor
from vlm.tiny import ensure_tiny_vlm


@dataclass
class RunData:
    model_path: str  # model.path, or the tiny model built for these data sets' vocabulary
    tasks: dict[str, TaskConfig]  # by data set name
    weights: dict[str, float]
    train_examples: list[PromptExample]
    test_examples: list[PromptExample]


def read_entry(d: DataConfig) -> tuple[ClassificationDataset, ClassificationDataset]:
    """(the whole data set an entry names, the part of it `data.classes` keeps (base-to-new))."""
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


def load_run_data(cfg: ExperimentConfig, entries: list[DatasetEntry] | None = None) -> RunData:
    entries = cfg.dataset_entries() if entries is None else entries
    whole, read = zip(*[read_entry(e.data) for e in entries])
    names = [ds.name for ds in read]
    if len(set(names)) != len(names):
        raise ValueError(f"data set names must be unique, got {names}: set datasets[].data.name to tell them apart")
    model_path = cfg.model.path or str(ensure_tiny_vlm(cfg.model.tiny, tokenizer_corpus(whole)))  # every class named
    processor = load_processor(model_path, cfg.model.trust_remote_code)
    data = RunData(model_path, {ds.name: e.task for ds, e in zip(read, entries)},
                   {ds.name: e.weight for ds, e in zip(read, entries)}, [], [])
    for dataset, entry in zip(read, entries):
        train, test = _examples(processor, dataset, entry.data, entry.task)
        data.train_examples += train
        data.test_examples += test
    return data


def _examples(processor, dataset: ClassificationDataset, d: DataConfig, t: TaskConfig) -> tuple[list, list]:
    train = dataset.split("train")
    if d.k_shot:
        train = k_shot(train, d.k_shot, d.seed, dataset.classnames)
    build = dict(style=t.prompt, min_pixels=d.min_pixels, max_pixels=d.max_pixels, seed=d.seed,
                 skip_bad_images=d.skip_bad_images, thing=t.thing, attribute=t.attribute)
    train_examples, skipped = build_examples(processor, dataset, train, **build)
    test = dataset.split("test")
    if d.eval_limit and d.eval_limit < len(test):  # a seeded sample in file order: files are often sorted by class
        keep = set(random.Random(f"{d.seed}:eval").sample(range(len(test)), d.eval_limit))
        test = [s for i, s in enumerate(test) if i in keep]
    test_examples, skipped_test = build_examples(processor, dataset, test, **build)
    if skipped or skipped_test:
        announce(f"{dataset.name}: skipped {len(skipped) + len(skipped_test)} unreadable images; first: "
                 f"{(skipped + skipped_test)[0]}")
    if not train_examples or not test_examples:
        raise ValueError(f"data set {dataset.name!r} has {len(train_examples)} train and {len(test_examples)} test "
                         f"prompts; both splits need images")
    for e in train_examples + test_examples:
        e.id = f"{dataset.name}/{e.id}"
    announce(f"data: {dataset.name}, {len(dataset.classnames)} classes, {len(train_examples)} train / "
             f"{len(test_examples)} test prompts")
    return train_examples, test_examples
