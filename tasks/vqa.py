"""Visual question answering with one right answer (No-Thinking-CLS-RL's SAT -> CVBench setting).

Our layout, one JSON object a line, image paths relative to the file:
`{"image": "imgs/a.png", "question": "...", "answer": "(B)", "choices": ["left", "right"]?, "split": "train",
"id"?}`. With `choices`, the prompt lists them as "(A) left (B) right" and the answer is usually the letter,
as CVBench writes it; the reward is equality with `answer` (No-Thinking's cls_equality) or, with tags,
cls_accuracy. SAT and CVBench convert into it with a few lines of pandas; a bundled spatial set (`shapes_vqa`:
"which shape is further left?" over the shapes_boxes images) makes the setting runnable on CPU.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from tasks.manifest import DatasetError, jsonl_rows

VQA_KEYS = {"image", "question", "answer", "choices", "split", "id"}


@dataclass(frozen=True)
class VqaSample:
    id: str
    image: Path
    question: str
    answer: str
    choices: tuple[str, ...]
    split: str

    def solution(self) -> str:
        return self.answer


def read_vqa_jsonl(path: str | Path) -> list[VqaSample]:
    """Our VQA layout (module docstring); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"VQA file not found: {path}")
    samples, seen = [], set()
    for lineno, where, row in jsonl_rows(path):
        if not isinstance(row, dict) or not {"image", "question", "answer"} <= set(row):
            raise DatasetError(
                f"{where}: needs 'image', 'question' and 'answer' (and optionally 'choices', 'split', 'id')"
            )
        if unknown := set(row) - VQA_KEYS:
            raise DatasetError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(VQA_KEYS)}")
        choices = row.get("choices") or []
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise DatasetError(f"{where}: 'choices' must be a list of strings, got {choices!r}")
        if not isinstance(row["answer"], str) or not row["answer"].strip():
            raise DatasetError(f"{where}: 'answer' must be a non-empty string, got {row['answer']!r}")
        sid = str(row.get("id", f"{path.stem}-{lineno}"))
        if sid in seen:
            raise DatasetError(f"{where}: id {sid!r} used twice")
        seen.add(sid)
        image = path.parent / row["image"]
        if not image.is_file():
            raise DatasetError(f"{where}: image not found: {image}")
        samples.append(VqaSample(sid, image, str(row["question"]), row["answer"].strip(), tuple(choices),
                                 str(row.get("split", "train"))))
    if not samples:
        raise DatasetError(f"{path}: no questions")
    return samples


def ensure_bundled_vqa(root: str | Path | None = None) -> Path:
    """`shapes_vqa`: for shapes_boxes images with two or more shapes, "which is further left/up?" with the two
    colours as choices and the letter as the answer (CVBench's style). Written once next to shapes_boxes."""
    from tasks.bundled_boxes import ensure_bundled_boxes
    from vlm.cache import build_once

    boxes = ensure_bundled_boxes(root)

    def write(tmp: Path) -> None:
        rng, rows = random.Random(0), []
        for subset, split in (("train2017", "train"), ("val2017", "test")):
            data = json.loads((boxes / "annotations" / f"instances_{subset}.json").read_text())
            names = {c["id"]: c["name"] for c in data["categories"]}
            by_image: dict[int, list] = {}
            for a in data["annotations"]:
                by_image.setdefault(a["image_id"], []).append(a)
            for im in data["images"]:
                anns = by_image.get(im["id"], [])
                if len(anns) < 2:
                    continue
                a, b = rng.sample(anns, 2)
                for axis, word in ((0, "left"), (1, "up")):
                    centre = [x[axis] + x[axis + 2] / 2 for x in (a["bbox"], b["bbox"])]
                    if abs(centre[0] - centre[1]) < 4:
                        continue  # too close to call
                    choices = [names[a["category_id"]], names[b["category_id"]]]
                    question = (f"Which shape is further {word}, "
                                f"the {choices[0]} one or the {choices[1]} one?")
                    rows.append({"id": f"{subset}-{im['id']}-{axis}",
                                 "image": f"../{boxes.name}/{subset}/{im['file_name']}",
                                 "question": question, "choices": choices,
                                 "answer": "(A)" if centre[0] < centre[1] else "(B)", "split": split})
        (tmp / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    return build_once(boxes.parent / "shapes_vqa-v2", "vqa.jsonl", write)
