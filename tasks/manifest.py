"""Classification data sets: our JSONL manifest, an ImageFolder tree, and CoOp's split files.

Every reader returns a `ClassificationDataset` of (id, image path, label, split) samples plus the class
names, and fails with a message that names the file (and line) and the bad value.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MANIFEST_KEYS = {"image", "label", "split", "id"}


class DatasetError(ValueError):
    """A data set on disk that does not match its declared layout."""


@dataclass(frozen=True)
class Sample:
    id: str
    image: Path
    label: str
    split: str


@dataclass
class ClassificationDataset:
    name: str
    classnames: list[str]
    samples: list[Sample] = field(default_factory=list)

    def split(self, split: str) -> list[Sample]:
        return [s for s in self.samples if s.split == split]

    def splits(self) -> list[str]:
        return sorted({s.split for s in self.samples})


def display_name(folder: str) -> str:
    """Folder and CoOp names use '_' for spaces; prompts and rewards use the spaced name."""
    return " ".join(folder.replace("_", " ").split())


def _check_classes(name: str, classnames: list[str], samples: list[Sample], source: Path) -> None:
    dupes = [c for c, k in Counter(classnames).items() if k > 1]
    if dupes:
        raise DatasetError(f"{source}: duplicate class names {dupes}")
    counts = Counter(s.label for s in samples)
    empty = [c for c in classnames if counts[c] == 0]
    if empty:
        raise DatasetError(f"{source}: class(es) with no images in data set {name!r}: {empty}")


def check_unique_ids(ids: list[str], source: Path) -> None:
    """Raise naming (up to five of) the ids that occur more than once."""
    dupes = [i for i, k in Counter(ids).items() if k > 1]
    if dupes:
        raise DatasetError(f"{source}: duplicate ids {dupes[:5]}")


def split_folders(root: Path, splits: Sequence[str], what: str, expected: str) -> list[str]:
    """The `splits` that are folders under `root` (the data set folder, `what`); none is an error that
    says what was `expected` and names what the folder holds."""
    if not root.is_dir():
        raise DatasetError(f"{what} not found: {root}")
    present = [s for s in splits if (root / s).is_dir()]
    if not present:
        found = sorted(p.name for p in root.iterdir())[:10]
        raise DatasetError(f"{root}: expected {expected}, found {found}")
    return present


def read_json(path: Path, what: str) -> object:
    """A whole JSON file; missing (named as `what`) or invalid JSON is an error naming the file and line."""
    if not path.is_file():
        raise DatasetError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None


def jsonl_rows(path: Path) -> Iterator[tuple[int, str, object]]:
    """(line number, "file:line", parsed JSON) for every non-blank line; a line that is not JSON is an error
    naming it."""
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{where}: not valid JSON ({err.msg})") from None
            yield lineno, where, row


def read_classnames(path: str | Path) -> list[str]:
    """One class name per line (blank lines ignored), or a JSON list of strings."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"class-names file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        names = json.loads(text)
        if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
            raise DatasetError(f"{path}: expected a JSON list of non-empty class-name strings")
        return [n.strip() for n in names]
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_manifest(manifest: str | Path, classnames: str | Path | None = None,
                  name: str | None = None) -> ClassificationDataset:
    """JSONL lines `{"image": path, "label": name, "split": "train"|"test"|..., "id"?: str}`.

    Image paths are relative to the manifest's folder; class names come from `classnames` (default
    `classnames.txt` beside the manifest).
    """
    manifest = Path(manifest)
    if not manifest.is_file():
        raise DatasetError(f"manifest not found: {manifest}")
    classnames_path = Path(classnames) if classnames else manifest.parent / "classnames.txt"
    names = read_classnames(classnames_path)
    known = set(names)
    samples: list[Sample] = []
    for lineno, where, row in jsonl_rows(manifest):
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: expected a JSON object")
        missing = {"image", "label", "split"} - row.keys()
        extra = row.keys() - MANIFEST_KEYS
        if missing or extra:
            raise DatasetError(f"{where}: missing keys {sorted(missing)}, unknown keys {sorted(extra)}; "
                               f"allowed: {sorted(MANIFEST_KEYS)}")
        if row["label"] not in known:
            raise DatasetError(f"{where}: unknown label {row['label']!r} (not in {classnames_path})")
        samples.append(Sample(id=str(row.get("id", f"{manifest.stem}-{lineno}")),
                              image=manifest.parent / row["image"], label=row["label"],
                              split=str(row["split"])))
    check_unique_ids([s.id for s in samples], manifest)
    dataset = ClassificationDataset(name or manifest.parent.name, names, samples)
    _check_classes(dataset.name, names, samples, manifest)
    return dataset


def read_image_folder(root: str | Path, splits: tuple[str, ...] = ("train", "test"),
                      name: str | None = None) -> ClassificationDataset:
    """`root/<split>/<class folder>/*.<image>`; the class set is the union of the splits' folders."""
    root = Path(root)
    present = split_folders(root, splits, "data set folder",
                            f"an ImageFolder tree with {'/'.join(splits)} folders (root/train/<class>/*.png)")
    folders = sorted({d.name for s in present for d in (root / s).iterdir() if d.is_dir()})
    names = [display_name(f) for f in folders]
    samples = []
    for split in present:
        for folder, label in zip(folders, names):
            class_dir = root / split / folder
            if not class_dir.is_dir():
                continue
            files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise DatasetError(f"empty class folder (no images): {class_dir}")
            samples += [Sample(f"{split}/{folder}/{p.name}", p, label, split) for p in files]
    dataset = ClassificationDataset(name or root.name, names, samples)
    _check_classes(dataset.name, names, samples, root)
    return dataset


def read_coop_split(split_json: str | Path, image_root: str | Path,
                    name: str | None = None) -> ClassificationDataset:
    """CoOp's `split_zhou_*.json`:
    {"train"|"val"|"test": [[relative image path, label index, class name], ...]}."""
    split_json, image_root = Path(split_json), Path(image_root)
    data = read_json(split_json, "CoOp split file")
    if not isinstance(data, dict) or not data:
        raise DatasetError(f"{split_json}: expected an object with train/val/test lists")
    by_index: dict[int, str] = {}
    samples = []
    for split, rows in data.items():
        for k, row in enumerate(rows):
            if not (isinstance(row, list) and len(row) == 3 and isinstance(row[1], int)):
                raise DatasetError(
                    f"{split_json}: {split}[{k}] should be [path, label index, class name], got {row!r}"
                )
            path, index, cname = row
            cname = display_name(str(cname))
            if by_index.setdefault(index, cname) != cname:
                raise DatasetError(f"{split_json}: {split}[{k}] label {index} is {cname!r} here "
                                   f"but {by_index[index]!r} elsewhere")
            samples.append(Sample(f"{split}/{path}", image_root / path, cname, split))
    names = [by_index[i] for i in sorted(by_index)]
    dataset = ClassificationDataset(name or split_json.stem.removeprefix("split_zhou_"), names, samples)
    _check_classes(dataset.name, names, samples, split_json)
    return dataset


def read_dataset(root: str | Path, name: str | None = None) -> ClassificationDataset:
    """A folder holding `manifest.jsonl` (+ classnames.txt), or an ImageFolder tree."""
    root = Path(root)
    if (root / "manifest.jsonl").is_file():
        return read_manifest(root / "manifest.jsonl", name=name)
    return read_image_folder(root, name=name)
