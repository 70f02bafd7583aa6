"""The 11 CoOp data sets in CoOp's directory layout (its DATASETS.md), by name.

`read_coop(root, name)` takes `root` = the folder holding all data sets (CoOp's `$DATA`) or the data
set's own folder. Nine data sets are CoOp's `split_zhou_*.json` files over an image folder; FGVC
Aircraft and ImageNet keep their own layouts:

- fgvc_aircraft/: images/<id>.jpg, variants.txt (one class per line, in label order) and
  images_variant_{train,val,test}.txt (lines "<image id> <variant name>");
- imagenet/: classnames.txt (lines "<wnid> <class name>"), images/train/<wnid>/*, images/val/<wnid>/*
  (CoOp tests on ImageNet's val set, so val is our "test" split).

The data set's name is the display name the prompts key on (tasks/prompts.py question_prefix).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tasks.manifest import (
    IMAGE_SUFFIXES,
    ClassificationDataset,
    DatasetError,
    Sample,
    _check_classes,
    display_name,
    read_coop_split,
)


@dataclass(frozen=True)
class CoopLayout:
    key: str  # our name for it
    display: str  # ClassificationDataset.name (prompt prefixes key on it)
    folder: str  # CoOp's folder under $DATA
    images: str  # image folder inside it ("" = the data set folder itself)
    split_file: str | None  # CoOp's split JSON; None for the two data sets with their own layout

    def describe(self) -> str:
        img = f"{self.folder}/{self.images}/" if self.images else f"{self.folder}/<image folders>"
        if self.key == "fgvc_aircraft":
            return (f"{self.folder}/images/<id>.jpg + {self.folder}/variants.txt + "
                    f"{self.folder}/images_variant_{{train,val,test}}.txt")
        if self.key == "imagenet":
            return (f"{self.folder}/classnames.txt + {self.folder}/images/train/<wnid>/ + "
                    f"{self.folder}/images/val/<wnid>/")
        return f"{img} + {self.folder}/{self.split_file}"


COOP_DATASETS: dict[str, CoopLayout] = {d.key: d for d in (
    CoopLayout("imagenet", "ImageNet", "imagenet", "images", None),
    CoopLayout("caltech101", "Caltech101", "caltech-101", "101_ObjectCategories",
               "split_zhou_Caltech101.json"),
    CoopLayout("dtd", "DTD", "dtd", "images", "split_zhou_DescribableTextures.json"),
    CoopLayout("eurosat", "EuroSAT", "eurosat", "2750", "split_zhou_EuroSAT.json"),
    CoopLayout("food101", "Food101", "food-101", "images", "split_zhou_Food101.json"),
    CoopLayout("oxford_flowers", "Oxford Flowers", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    CoopLayout("oxford_pets", "Oxford Pets", "oxford_pets", "images", "split_zhou_OxfordPets.json"),
    CoopLayout("stanford_cars", "Stanford Cars", "stanford_cars", "", "split_zhou_StanfordCars.json"),
    CoopLayout("sun397", "SUN397", "sun397", "SUN397", "split_zhou_SUN397.json"),
    CoopLayout("ucf101", "UCF101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
    CoopLayout("fgvc_aircraft", "FGVC Aircraft", "fgvc_aircraft", "images", None),
)}

# other spellings people use (the papers' tables, Visual-RFT's names, CoOp's class names)
_ALIASES = {
    "flowers102": "oxford_flowers", "flowers": "oxford_flowers", "oxfordflowers": "oxford_flowers",
    "pets": "oxford_pets", "pets37": "oxford_pets", "oxfordpets": "oxford_pets",
    "cars": "stanford_cars", "cars196": "stanford_cars", "stanfordcars": "stanford_cars",
    "aircraft": "fgvc_aircraft", "fgvcaircraft": "fgvc_aircraft", "describabletextures": "dtd",
    "caltech": "caltech101", "caltech-101": "caltech101", "food-101": "food101",
}


def coop_layout(name: str) -> CoopLayout:
    key = name.strip().lower().replace(" ", "_")
    key = _ALIASES.get(key, _ALIASES.get(key.replace("_", ""), key))
    if key not in COOP_DATASETS:
        raise DatasetError(f"unknown CoOp data set {name!r}; choose one of {sorted(COOP_DATASETS)}")
    return COOP_DATASETS[key]


def _dataset_dir(root: Path, layout: CoopLayout) -> Path:
    if (root / layout.folder).is_dir():
        return root / layout.folder
    if root.is_dir() and root.name == layout.folder:
        return root
    raise DatasetError(f"CoOp data set folder not found: {root / layout.folder} "
                       f"(expected CoOp's layout {layout.describe()} under {root})")


def _require(path: Path, layout: CoopLayout, kind: str = "file") -> Path:
    ok = path.is_dir() if kind == "folder" else path.is_file()
    if not ok:
        raise DatasetError(f"{kind} not found: {path} (CoOp layout for {layout.key}: {layout.describe()})")
    return path


def _spot_check(dataset: ClassificationDataset, layout: CoopLayout) -> None:
    """One stat per split: a split file over the wrong image folder fails here, not mid-training."""
    for split in dataset.splits():
        first = dataset.split(split)[0].image
        if not first.is_file():
            raise DatasetError(f"image not found: {first} (first {split} image of {layout.key}; "
                               f"CoOp layout: {layout.describe()})")


def _read_json_split(data_dir: Path, layout: CoopLayout) -> ClassificationDataset:
    assert layout.split_file is not None
    image_dir = _require(data_dir / layout.images, layout, "folder") if layout.images else data_dir
    split_json = _require(data_dir / layout.split_file, layout)
    return read_coop_split(split_json, image_dir, name=layout.display)


def _read_fgvc(data_dir: Path, layout: CoopLayout) -> ClassificationDataset:
    image_dir = _require(data_dir / "images", layout, "folder")
    variants = _require(data_dir / "variants.txt", layout)
    names = [display_name(line) for line in variants.read_text(encoding="utf-8").splitlines() if line.strip()]
    known = set(names)
    samples = []
    for split in ("train", "val", "test"):
        listing = _require(data_dir / f"images_variant_{split}.txt", layout)
        for lineno, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            image_id, _, variant = line.strip().partition(" ")
            label = display_name(variant)
            if not label:
                raise DatasetError(f"{listing}:{lineno}: expected '<image id> <variant name>', got {line!r}")
            if label not in known:
                raise DatasetError(f"{listing}:{lineno}: variant {label!r} is not in {variants}")
            samples.append(Sample(f"{split}/{image_id}", image_dir / f"{image_id}.jpg", label, split))
    dataset = ClassificationDataset(layout.display, names, samples)
    _check_classes(dataset.name, names, samples, variants)
    return dataset


def _read_imagenet(data_dir: Path, layout: CoopLayout) -> ClassificationDataset:
    listing = _require(data_dir / "classnames.txt", layout)
    folder_to_name: dict[str, str] = {}
    for lineno, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, cname = line.strip().partition(" ")
        if not cname.strip():
            raise DatasetError(f"{listing}:{lineno}: expected '<wnid> <class name>', got {line!r}")
        folder_to_name[wnid] = display_name(cname)
    names = list(folder_to_name.values())
    samples = []
    # CoOp tests on ImageNet's val set, so val/ becomes our "test" split
    for folder, split in (("train", "train"), ("val", "test")):
        split_dir = _require(data_dir / "images" / folder, layout, "folder")
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            if class_dir.name not in folder_to_name:
                raise DatasetError(f"class folder {class_dir} is not listed in {listing}")
            label = folder_to_name[class_dir.name]
            files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            samples += [Sample(f"{split}/{class_dir.name}/{p.name}", p, label, split) for p in files]
    dataset = ClassificationDataset(layout.display, names, samples)
    _check_classes(dataset.name, names, samples, listing)
    return dataset


def read_coop(root: str | Path, name: str) -> ClassificationDataset:
    """One CoOp data set by name (see COOP_DATASETS), with CoOp's train/val/test splits."""
    layout = coop_layout(name)
    root = Path(root)
    data_dir = _dataset_dir(root, layout)
    if layout.key == "fgvc_aircraft":
        dataset = _read_fgvc(data_dir, layout)
    elif layout.key == "imagenet":
        dataset = _read_imagenet(data_dir, layout)
    else:
        dataset = _read_json_split(data_dir, layout)
    _spot_check(dataset, layout)
    return dataset
