"""A small box data set made locally (no downloads), for detection and grounding runs on the tiny model.

`shapes_boxes`: one to three coloured shapes on a noisy background per image; a shape's colour is its
category. Written once (cached) in two layouts the loaders read: COCO's
(annotations/instances_{train,val}2017.json over train2017/ and val2017/, pixel [x, y, w, h] boxes) and our
grounding JSONL ("Where is the red shape?" with the box in the 0-1000 frame; tasks/grounding.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tasks.boxes import pixel_box_to_frame
from tasks.bundled import SHAPE_COLOURS, bundled_root, noisy_background
from vlm.cache import build_once

BOXES_VERSION = 1
SUBSETS = {"train2017": 40, "val2017": 16}  # images per subset


def _image(rng: np.random.Generator, size: int = 84) -> tuple[Image.Image, list[tuple[str, list[int]]]]:
    img = noisy_background(rng, size)
    draw = ImageDraw.Draw(img)
    objects = []
    for colour in rng.choice(list(SHAPE_COLOURS), size=int(rng.integers(1, 4)), replace=False):
        w, h = (int(v) for v in rng.integers(size // 6, size // 2, size=2))
        x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        draw.rectangle((x, y, x + w - 1, y + h - 1), fill=SHAPE_COLOURS[str(colour)])
        objects.append((str(colour), [x, y, w, h]))
    return img, objects


def ensure_bundled_boxes(root: str | Path | None = None) -> Path:
    """Write `shapes_boxes` once (file-locked) and return its folder (COCO layout + grounding.jsonl)."""
    def write(tmp: Path) -> None:
        rng = np.random.default_rng(0)
        categories = [{"id": i + 1, "name": c} for i, c in enumerate(SHAPE_COLOURS)]
        cat_id = {c["name"]: c["id"] for c in categories}
        (tmp / "annotations").mkdir()
        grounding = []
        for subset, count in SUBSETS.items():
            (tmp / subset).mkdir()
            images, annotations = [], []
            for k in range(count):
                img, objects = _image(rng)
                name = f"{k:05d}.png"
                img.save(tmp / subset / name)
                images.append({"id": k + 1, "file_name": name, "width": img.width, "height": img.height})
                for colour, (x, y, w, h) in objects:
                    annotations.append({"id": len(annotations) + 1, "image_id": k + 1,
                                        "category_id": cat_id[colour], "bbox": [x, y, w, h], "area": w * h,
                                        "iscrowd": 0})
                    box = pixel_box_to_frame(x, y, x + w, y + h, img.width, img.height)
                    grounding.append({"id": f"{subset}-{k:05d}-{colour}", "image": f"{subset}/{name}",
                                      "question": f"Where is the {colour} shape?", "boxes": [list(box)],
                                      "split": "train" if subset.startswith("train") else "test"})
            (tmp / "annotations" / f"instances_{subset}.json").write_text(
                json.dumps({"images": images, "annotations": annotations, "categories": categories}))
        (tmp / "grounding.jsonl").write_text("".join(json.dumps(g) + "\n" for g in grounding))

    return build_once(bundled_root(root) / f"shapes_boxes-v{BOXES_VERSION}", "grounding.jsonl", write)
