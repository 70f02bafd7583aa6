"""Small data sets made locally, for the embedded default and the tests (no downloads).

- `shapes`: procedurally drawn shapes on noisy backgrounds; the class is the shape's colour (a task the
  tiny random model can learn on CPU in minutes, so the demo shows GRPO learning).
- `digits`: scikit-learn's bundled 8x8 handwritten digits (real scans), classes named "zero".."nine".
Both are written in our manifest layout (manifest.jsonl + classnames.txt + images/) and cached.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vlm.cache import build_once, default_cache_dir

SHAPE_COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 190, 60),
    "blue": (45, 70, 220),
    "yellow": (230, 210, 40),
}
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
BUNDLED_VERSION = 1


def noisy_background(rng: np.random.Generator, size: int) -> Image.Image:
    """A size x size RGB image of one random dull colour under Gaussian noise (the shapes' canvas)."""
    background = rng.integers(60, 200, size=3)
    noise = rng.normal(0, 18, size=(size, size, 3))
    return Image.fromarray(np.clip(background[None, None, :] * 0.6 + noise + 40, 0, 255).astype(np.uint8))


def _shapes(
    per_class: dict[str, int], size: int = 84, seed: int = 0
) -> Iterator[tuple[str, str, Image.Image]]:
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for label, colour in SHAPE_COLOURS.items():
            for _ in range(count):
                img = noisy_background(rng, size)
                draw = ImageDraw.Draw(img)
                r = int(rng.integers(size // 5, size // 3))
                cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
                jitter = rng.integers(-25, 26, size=3)
                fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(colour, jitter))
                shape = rng.choice(["circle", "square", "triangle"])
                if shape == "circle":
                    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
                elif shape == "square":
                    draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
                else:
                    draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
                yield split, label, img


def _digits(per_class: dict[str, int], size: int = 56) -> Iterator[tuple[str, str, Image.Image]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    taken = {d: 0 for d in range(10)}
    for split, count in per_class.items():
        for digit in range(10):
            idx = np.flatnonzero(digits.target == digit)[taken[digit]: taken[digit] + count]
            taken[digit] += count
            for i in idx:
                grey = (255 - digits.images[i] * 255 / 16).astype(np.uint8)  # dark ink on white
                img = Image.fromarray(grey).convert("RGB").resize((size, size), Image.NEAREST)
                yield split, DIGIT_NAMES[digit], img


BUNDLED: dict[str, tuple[list[str], Callable[[], Iterator[tuple[str, str, Image.Image]]]]] = {
    "shapes": (list(SHAPE_COLOURS), lambda: _shapes({"train": 48, "test": 24})),
    "digits": (DIGIT_NAMES, lambda: _digits({"train": 32, "test": 16})),
}


def bundled_root(root: str | Path | None = None) -> Path:
    """Where bundled data sets are written: `root` if given, else the cache's data folder."""
    return Path(root) if root else default_cache_dir() / "data"


def ensure_bundled(name: str, root: str | Path | None = None) -> Path:
    """Write the bundled data set `name` once (file-locked) and return its folder."""
    if name not in BUNDLED:
        raise ValueError(f"unknown bundled data set {name!r}; available: {sorted(BUNDLED)}")
    classnames, generate = BUNDLED[name]

    def write(tmp: Path) -> None:
        (tmp / "images").mkdir()
        lines = []
        for k, (split, label, img) in enumerate(generate()):
            rel = f"images/{split}-{k:05d}.png"
            img.save(tmp / rel)
            lines.append(json.dumps({"id": f"{name}-{k:05d}", "image": rel, "label": label, "split": split}))
        (tmp / "classnames.txt").write_text("\n".join(classnames) + "\n")
        (tmp / "manifest.jsonl").write_text("\n".join(lines) + "\n")

    return build_once(bundled_root(root) / f"{name}-v{BUNDLED_VERSION}", "manifest.jsonl", write)
