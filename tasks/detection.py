"""COCO-format detection annotations (instances_*.json) as per-(image, category) detection prompts.

Every image yields one sample per queried category: a positive with that category's boxes, or a
negative (no box; the det_* rewards score a correct "No Objects" as 1). Boxes go from COCO's pixel
[x, y, w, h] to [x1, y1, x2, y2] integers in the image's 0-1000 frame (the prompt's frame). An
(image, category) with a crowd annotation (`iscrowd: 1`, a box around many objects) is neither a
positive nor a negative: its ground truth is ambiguous, so it is left out.
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tasks.boxes import Box1000, as_solution, coco_box_to_frame
from tasks.manifest import DatasetError, read_json

COCO_KEYS = ("images", "annotations", "categories")


@dataclass(frozen=True)
class DetectionSample:
    id: str
    image: Path
    category: str
    boxes: tuple[Box1000, ...]  # empty: a negative (the category is not in the image)
    split: str

    def solution(self) -> list[list[int]]:
        """What det_iou / det_confidence take as the solution: a list of [x1, y1, x2, y2] (empty = none)."""
        return as_solution(self.boxes)


@dataclass(frozen=True)
class AnnotatedImage:
    id: str
    path: Path
    width: int
    height: int
    boxes: dict[str, tuple[Box1000, ...]]  # queried category -> its boxes (only categories present)
    ambiguous: frozenset[str] = frozenset()  # categories with a crowd annotation here

    def samples(self, categories: Sequence[str], split: str, negatives: bool = True) -> list[DetectionSample]:
        out = []
        for c in categories:
            if c in self.ambiguous or (c not in self.boxes and not negatives):
                continue
            out.append(DetectionSample(f"{split}/{self.id}/{c}", self.path, c, self.boxes.get(c, ()), split))
        return out


@dataclass
class DetectionDataset:
    name: str
    split: str
    categories: list[str]  # the queried categories, in the order asked for
    images: list[AnnotatedImage] = field(default_factory=list)

    def samples(
        self, negatives: bool = True, images: Iterable[AnnotatedImage] | None = None
    ) -> list[DetectionSample]:
        """One sample per (image, category); `negatives=False` keeps positives only."""
        return [s for im in (self.images if images is None else images)
                for s in im.samples(self.categories, self.split, negatives)]

    def images_with(self, category: str) -> list[AnnotatedImage]:
        return [im for im in self.images if category in im.boxes]


def _load(path: Path) -> dict:
    data = read_json(path, "COCO annotation file")
    missing = [k for k in COCO_KEYS if not isinstance(data, dict) or not isinstance(data.get(k), list)]
    if missing:
        raise DatasetError(f"{path}: not a COCO instances file: missing list(s) {missing} "
                           f"(expected keys {list(COCO_KEYS)})")
    return data


def _categories(path: Path, data: dict, wanted: Sequence[str] | None) -> tuple[dict[int, str], list[str]]:
    """COCO category id -> name for the queried categories, and their names in the order asked for."""
    by_name: dict[str, int] = {}
    for k, cat in enumerate(data["categories"]):
        ok = isinstance(cat, dict) and isinstance(cat.get("id"), int) and isinstance(cat.get("name"), str)
        if not ok:
            raise DatasetError(
                f"{path}: categories[{k}] should have an integer 'id' and a 'name', got {cat!r}"
            )
        by_name[cat["name"]] = cat["id"]
    names = list(by_name) if wanted is None else list(dict.fromkeys(wanted))
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise DatasetError(f"{path}: unknown categor(ies) {unknown}; the file has {sorted(by_name)}")
    if not names:
        raise DatasetError(f"{path}: no categories to query")
    return {by_name[n]: n for n in names}, names


def read_coco(annotations: str | Path, image_root: str | Path, categories: Sequence[str] | None = None,
              split: str = "train", name: str | None = None) -> DetectionDataset:
    """A COCO instances file over its image folder, restricted to `categories` (names; default all)."""
    annotations, image_root = Path(annotations), Path(image_root)
    data = _load(annotations)
    if not image_root.is_dir():
        raise DatasetError(f"image folder not found: {image_root} (images of {annotations})")
    id_to_name, names = _categories(annotations, data, categories)
    info: dict[int, tuple[str, int, int]] = {}
    for k, im in enumerate(data["images"]):
        ok = isinstance(im, dict) and isinstance(im.get("id"), int) and isinstance(im.get("file_name"), str)
        if not ok or not all(isinstance(im.get(d), int) and im[d] > 0 for d in ("width", "height")):
            raise DatasetError(f"{annotations}: images[{k}] needs an integer 'id', a 'file_name' and "
                               f"positive integer 'width'/'height', got {im!r}")
        info[im["id"]] = (im["file_name"], im["width"], im["height"])
    boxes: dict[int, dict[str, list[Box1000]]] = {i: {} for i in info}
    crowd: dict[int, set[str]] = {i: set() for i in info}
    for k, ann in enumerate(data["annotations"]):
        where = f"{annotations}: annotations[{k}] (id {ann.get('id') if isinstance(ann, dict) else '?'})"
        if not isinstance(ann, dict) or ann.get("image_id") not in info:
            raise DatasetError(f"{where}: image_id {ann.get('image_id') if isinstance(ann, dict) else ann!r} "
                               "is not in 'images'")
        cname = id_to_name.get(ann.get("category_id"))
        if cname is None:
            continue  # a category we are not asking about
        if ann.get("iscrowd"):
            crowd[ann["image_id"]].add(cname)
            continue
        bbox = ann.get("bbox")
        _, w, h = info[ann["image_id"]]
        try:
            all_numbers = isinstance(bbox, list) and all(isinstance(v, (int, float)) for v in bbox)
            if not (all_numbers and len(bbox) == 4):
                raise ValueError(f"bbox must be [x, y, w, h] (4 numbers), got {bbox!r}")
            box = coco_box_to_frame(bbox, w, h)
        except ValueError as err:
            raise DatasetError(f"{where}: {err}") from None
        boxes[ann["image_id"]].setdefault(cname, []).append(box)
    images = []
    for i, (fname, w, h) in sorted(info.items()):
        kept = {c: tuple(bs) for c, bs in boxes[i].items() if c not in crowd[i]}
        images.append(AnnotatedImage(str(i), image_root / fname, w, h, kept, frozenset(crowd[i])))
    if images and not images[0].path.is_file():  # one stat: a wrong image folder fails here, not mid-training
        raise DatasetError(f"image not found: {images[0].path} ('file_name' of image {images[0].id} in "
                           f"{annotations}, under {image_root})")
    return DetectionDataset(name or annotations.stem.removeprefix("instances_"), split, names, images)


def read_coco_dir(root: str | Path, subset: str = "train2017", categories: Sequence[str] | None = None,
                  split: str | None = None) -> DetectionDataset:
    """COCO's own layout: root/annotations/instances_<subset>.json over root/<subset>/."""
    root = Path(root)
    if not split:
        split = next((s for s in ("train", "val") if subset.startswith(s)), subset)
    return read_coco(root / "annotations" / f"instances_{subset}.json", root / subset, categories, split,
                     name=f"coco_{subset}")


def k_shot_images(dataset: DetectionDataset, k: int, seed: int) -> list[AnnotatedImage]:
    """At least k images per queried category, the same ones for the same seed.

    Categories are filled in the dataset's order; an image already chosen counts for every category
    it contains, so a later category only draws the images it still lacks (the usual few-shot
    detection protocol). A category with fewer than k images is an error naming it.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    chosen: dict[str, AnnotatedImage] = {}
    for c in dataset.categories:
        have = sum(1 for im in chosen.values() if c in im.boxes)
        pool = [im for im in dataset.images_with(c) if im.id not in chosen]
        if have + len(pool) < k:
            raise DatasetError(
                f"category {c!r} is in {have + len(pool)} image(s) of {dataset.name}, fewer than k={k}"
            )
        # one RNG per category over an id-sorted pool: independent of file order
        for im in random.Random(f"{seed}:{c}").sample(sorted(pool, key=lambda im: im.id), max(0, k - have)):
            chosen[im.id] = im
    return sorted(chosen.values(), key=lambda im: im.id)


def k_shot_detection(
    dataset: DetectionDataset, k: int, seed: int, negatives: bool = True
) -> list[DetectionSample]:
    """The k-shot images' samples: every queried category on each, negatives included unless turned off."""
    return dataset.samples(negatives=negatives, images=k_shot_images(dataset, k, seed))
