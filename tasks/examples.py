"""From data-set samples to prompts: the question text, the image (a file reference, encoded where the
prompt is used), the solution.

A run's driver keeps only `PromptSource`s (built with encode=False after a header scan of every image), so its
memory and start-up do not grow with the images' pixels; rollout and eval workers encode the prompts of the
requests they get, a call's batch at a time (`encode_requests`)."""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from protocol.rollout import PromptInputs, PromptSource, RolloutRequest
from tasks.images import ImageLoadError, check_image, load_image
from tasks.manifest import ClassificationDataset, Sample
from tasks.prompts import (
    DIRECT_INSTRUCTION,
    THINK_INSTRUCTION,
    classification_prompt,
    detection_prompt,
    grounding_prompt,
    question_prefix,
    vqa_prompt,
)
from vlm.inputs import encode_prompt


@dataclass
class PromptExample:
    """One prompt: `id` is stable across epochs (for exactly-once accounting). `inputs` is None when only
    scanned (encode=False): `source` then says what to encode where the prompt is used."""

    id: str
    dataset: str
    text: str
    inputs: PromptInputs | None
    solution: object  # the class name; for detection / grounding the list of [x1, y1, x2, y2] boxes
    source: PromptSource | None = None


def example_rng(seed: int, epoch: int, sample_id: str) -> random.Random:
    """Each (seed, epoch, sample) draws its own candidate list, independent of batch order."""
    return random.Random(f"{seed}:{epoch}:{sample_id}")


Encoded = tuple[list[PromptExample], list[str]]  # (examples, messages naming the images skipped)


SKIP_HINT = "data.skip_bad_images=true skips (and counts) such files"


def _encode(processor, dataset: str, samples: Sequence, min_pixels: int, max_pixels: int,
            skip_bad_images: bool, question: Callable, solution: Callable, encode: bool) -> Encoded:
    """Each sample's prompt with question(sample), its image encoded (encode=True) or only scanned (file
    there, header readable); returns (examples, skipped messages). Bad images raise unless skipping."""
    examples, skipped = [], []
    for s in samples:
        source = PromptSource(dataset, str(s.image), question(s), min_pixels, max_pixels, skip_bad_images)
        try:
            if encode:
                inputs = encode_source(processor, source)
            else:
                check_image(s.image, min_pixels, max_pixels)
                inputs = None
        except ImageLoadError as err:
            if not skip_bad_images:
                raise ImageLoadError(f"data set {dataset!r}: {err}; {SKIP_HINT}") from err
            skipped.append(str(err))
            continue
        examples.append(PromptExample(s.id, dataset, source.text, inputs, solution(s), source))
    return examples, skipped


def encode_source(processor, source: PromptSource) -> PromptInputs:
    """Read, resize and encode a prompt's image where the prompt is used."""
    image = load_image(source.image, source.min_pixels, source.max_pixels)
    return encode_prompt(processor, image, source.text)


def encode_requests(processor, requests: Sequence[RolloutRequest]) -> tuple[list[RolloutRequest], list]:
    """(the requests with their inputs encoded from their sources, [(request, message)] skipped). An image
    that fails here (corrupt past the header the start-up scan read) is an error naming file and data set,
    unless its data set skips bad images."""
    ready, skipped = [], []
    for r in requests:
        if r.inputs is not None or r.source is None:
            ready.append(r)
            continue
        try:
            ready.append(dataclasses.replace(r, inputs=encode_source(processor, r.source)))
        except ImageLoadError as err:
            message = f"data set {r.source.dataset!r}: {err}"
            if not r.source.skip_bad_images:
                raise ImageLoadError(f"{message}; {SKIP_HINT}") from err
            skipped.append((r, message))
    return ready, skipped


def build_examples(processor, dataset: ClassificationDataset, samples: Sequence[Sample], style: str,
                   min_pixels: int, max_pixels: int, seed: int, epoch: int = 0, skip_bad_images: bool = False,
                   thing: str = "object", attribute: str = "category", encode: bool = True) -> Encoded:
    """Classification prompts (the solution is the class name); encode=False only scans the images."""
    def question(s: Sample) -> str:
        rng = example_rng(seed, epoch, s.id)
        return classification_prompt(style, dataset.classnames, s.label, dataset.name, rng,
                                     thing=thing, attribute=attribute)

    return _encode(processor, dataset.name, samples, min_pixels, max_pixels, skip_bad_images, question,
                   lambda s: s.label, encode)


def tokenizer_corpus(datasets: Sequence[ClassificationDataset]) -> list[str]:
    """Text a tiny tokenizer is trained on: the tasks' own questions, class names and answer formats."""
    lines = [THINK_INSTRUCTION, DIRECT_INSTRUCTION, "Please strictly follow the format.",
             "system user assistant", "You are a helpful assistant.", "<think> </think> <answer> </answer>"]
    for ds in sorted(datasets, key=lambda d: d.name):
        lines.append(question_prefix(ds.name))
        lines.append("Please choose one from list [ " + ", ".join(ds.classnames) + "].")
        lines += [f"<think> The image shows {c}. </think> <answer>{c}</answer>" for c in ds.classnames]
    return lines


def format_target(style: str, answer) -> str:
    """A completion in the task's answer format (warm start and SFT targets): a class name, or for the box
    styles the solution's boxes in the 0-1000 frame."""
    if style in ("no_think", "vqa"):
        return answer
    if style == "detection":
        found = ", ".join(f"{{'Position': {list(b)}, 'Confidence': 1.0}}" for b in answer)
        listed = f"[{found}]" if answer else "No Objects"
        return f"<think> I look for the objects. </think> <answer>{listed}</answer>"
    if style == "grounding":
        x1, y1, x2, y2 = answer[0]
        return f"<think> I look for the object. </think> <answer>({x1},{y1}),({x2},{y2})</answer>"
    return f"<think> The image shows {answer}. </think> <answer>{answer}</answer>"


def build_task_examples(processor, dataset: str, samples: Sequence, style: str, min_pixels: int,
                        max_pixels: int, skip_bad_images: bool = False, encode: bool = True) -> Encoded:
    """Detection, grounding or VQA samples (tasks/detection.py, grounding.py, vqa.py) into prompts whose
    solution is what their rewards read (boxes, or the answer string)."""
    return _encode(processor, dataset, samples, min_pixels, max_pixels, skip_bad_images,
                   lambda s: question_text(s, style), lambda s: s.solution(), encode)


def question_text(sample, style: str | None = None) -> str:
    """The prompt of a detection, grounding or VQA sample (VQA: direct unless style is vqa_think)."""
    if hasattr(sample, "category"):
        return detection_prompt(sample.category)
    if hasattr(sample, "choices"):
        return vqa_prompt(sample.question, sample.choices, thinking=style == "vqa_think")
    return grounding_prompt(sample.question)


def box_corpus(examples_text: Sequence[str]) -> list[str]:
    """Extra tiny-tokenizer text for box tasks: their prompts and answer formats."""
    return sorted(set(examples_text)) + ["[{'Position': [0, 0, 1000, 1000], 'Confidence': 1.0}] No Objects",
                                         "(0,0),(1000,1000) 0123456789"]


def candidates_in(text: str) -> list[str]:
    """The class names offered in a CLS-RL prompt's list (for a warm start that teaches format, not
    labels)."""
    start = text.find("[ ")
    end = text.find("].", start)
    return [c.strip() for c in text[start + 2:end].split(",")] if start >= 0 and end > start else []


class RequestEncoder:
    """A worker's `encode_requests`, with the processor of `model_path` loaded on first need (a worker whose
    requests all arrive encoded, e.g. text-only ones, never loads it)."""

    def __init__(self, model_path: str, trust_remote_code: bool = False) -> None:
        self.model_path = model_path
        self.trust_remote_code = trust_remote_code
        self.processor = None

    def __call__(self, requests: Sequence[RolloutRequest]) -> tuple[list[RolloutRequest], list]:
        if self.processor is None and any(r.inputs is None for r in requests):
            from vlm.processor import load_processor

            self.processor = load_processor(self.model_path, self.trust_remote_code)
        return encode_requests(self.processor, requests)
