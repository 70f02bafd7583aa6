"""The learning benchmark's data sets: the bundled ones, plus ImageFolder trees made here the way a new user
would bring their own (root/train/<class>/*.png, root/test/<class>/*.png, class names as words).

- `digits4`: scikit-learn's digit scans, classes zero..three (an easier real-image set);
- `digits10`: all ten digit classes, 16 training and 40 test images per class (the set where the old
  defaults collapsed);
- `shapes12`: a harder generated set, 12 classes = 4 colours x 3 shapes ("red circle", ...), so the answer
  needs colour and shape at once.
Each is written once under the bench's output folder and reused.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import ImageDraw

from tasks.bundled import DIGIT_NAMES, SHAPE_COLOURS, noisy_background

# name -> (how it is made, the config overrides that select it); bundled ones need no folder
BUNDLED = {
    "shapes": ["data.bundled=shapes"],
    "digits": ["data.bundled=digits"],
    "shapes_vqa": ["data.bundled=shapes_vqa", "data.format=vqa_jsonl", "task.prompt=vqa"],
}
MADE = ("digits4", "digits10", "shapes12")
CLASSES = {"shapes": 4, "digits": 10, "shapes_vqa": 2, "digits4": 4, "digits10": 10, "shapes12": 12}


def _write(root: Path, items) -> None:
    """items: (split, class name, PIL image); written as root/split/class/NNNN.png, then a done marker."""
    counts: dict[tuple[str, str], int] = {}
    for split, label, img in items:
        folder = root / split / label
        folder.mkdir(parents=True, exist_ok=True)
        n = counts[(split, label)] = counts.get((split, label), 0) + 1
        img.save(folder / f"{n:04d}.png")
    (root / "done.json").write_text(json.dumps({f"{s}/{c}": n for (s, c), n in sorted(counts.items())}))


def _digits(classes: int, train: int, test: int):
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for digit in range(classes):
        idx = np.flatnonzero(digits.target == digit)
        if len(idx) < train + test:
            raise ValueError(f"digit {digit} has {len(idx)} scans, {train}+{test} asked")
        for k, i in enumerate(idx[:train + test]):
            grey = (255 - digits.images[i] * 255 / 16).astype(np.uint8)
            img = Image.fromarray(grey).convert("RGB").resize((56, 56), Image.NEAREST)
            yield ("train" if k < train else "test"), DIGIT_NAMES[digit], img


def _shapes12(train: int, test: int, size: int = 84, seed: int = 0):
    rng = np.random.default_rng(seed)
    for colour, rgb in SHAPE_COLOURS.items():
        for shape in ("circle", "square", "triangle"):
            for k in range(train + test):
                img = noisy_background(rng, size)
                draw = ImageDraw.Draw(img)
                r = int(rng.integers(size // 5, size // 3))
                cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
                fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(rgb, rng.integers(-25, 26, size=3)))
                box = (cx - r, cy - r, cx + r, cy + r)
                if shape == "circle":
                    draw.ellipse(box, fill=fill)
                elif shape == "square":
                    draw.rectangle(box, fill=fill)
                else:
                    draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
                yield ("train" if k < train else "test"), f"{colour} {shape}", img


def dataset_overrides(name: str, data_dir: Path) -> list[str]:
    """The config overrides that train on data set `name`, making its folder first when it is one of ours."""
    if name in BUNDLED:
        return BUNDLED[name]
    if name not in MADE:
        raise ValueError(f"unknown data set {name!r}; available: {sorted(BUNDLED) + list(MADE)}")
    root = data_dir / name
    if not (root / "done.json").is_file():
        make = {"digits4": lambda: _digits(4, 32, 24), "digits10": lambda: _digits(10, 16, 40),
                "shapes12": lambda: _shapes12(24, 12)}[name]
        _write(root, make())
    return [f"data.root={root}", f"data.name={name}"]
