"""Prompt texts of the papers (methods.md "Prompts"), built exactly and reproducibly."""
from __future__ import annotations

import random
from collections.abc import Sequence

THINK_INSTRUCTION = (
    "Please output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
)
DIRECT_INSTRUCTION = "Please directly output the answer."
DEFAULT_PREFIX = "What type of object is in the photo?"
# CLS-RL's question prefixes for the CoOp data sets that do not ask about an "object"
DATASET_PREFIXES = {
    "eurosat": "What type of object is in the centered satellite photo?",
    "ucf101": "What actions is the person performing in the photo?",
    "dtd": "What type of texture is in the photo?",
    "fgvc_aircraft": "What type of aircraft is in the photo?",
    "fgvcaircraft": "What type of aircraft is in the photo?",
}
PROMPT_STYLES = ("cls_rl", "no_think", "visual_rft")  # classification
BOX_STYLES = ("detection", "grounding")  # Visual-RFT detection (COCO) and LISA-style grounding
VQA_STYLES = ("vqa", "vqa_think")  # one-answer VQA (No-Thinking on SAT -> CVBench): direct, or think/answer


def question_prefix(dataset: str) -> str:
    return DATASET_PREFIXES.get(dataset.lower().replace("-", "_").replace(" ", "_"), DEFAULT_PREFIX)


def candidate_count(num_classes: int) -> int:
    """CLS-RL's list size: 40% of the classes; all of them when 40% is under 30; at most 100."""
    k = int(0.4 * num_classes)
    return min(num_classes if k < 30 else k, 100)


def candidate_list(classnames: Sequence[str], label: str, rng: random.Random) -> list[str]:
    """A shuffled subset of the class names that always contains the true label."""
    if label not in classnames:
        raise ValueError(f"label {label!r} is not among the {len(classnames)} class names")
    others = [c for c in classnames if c != label]
    picked = rng.sample(others, candidate_count(len(classnames)) - 1) + [label]
    rng.shuffle(picked)
    return picked


def cls_rl_prompt(
    classnames: Sequence[str], label: str, dataset: str, rng: random.Random, thinking: bool = True
) -> str:
    """CLS-RL (thinking) or No-Thinking-CLS-RL (direct answer) question with a candidate list."""
    choices = "Please choose one from list [ " + ", ".join(candidate_list(classnames, label, rng)) + "]."
    tail = THINK_INSTRUCTION if thinking else DIRECT_INSTRUCTION
    return f"{question_prefix(dataset)}\n{choices}\n {tail}"


def visual_rft_cls_prompt(thing: str, attribute: str) -> str:
    """Visual-RFT open classification: no candidate list; e.g. thing='flower', attribute='species'."""
    article = "an" if thing[:1].lower() in "aeiou" else "a"
    return (f"This is an image containing {article} {thing}. Please identify the {attribute} of the {thing} "
            f"based on the image.\n{THINK_INSTRUCTION} Please strictly follow the format.")


def detection_prompt(category: str) -> str:
    return (f"Detect all objects belonging to the category '{category}' in the image, and provide the "
            "bounding boxes (between 0 and 1000, integer) and confidence (between 0 and 1, with two decimal "
            "places). "
            f"If no object belonging to the category '{category}' in the image, return 'No Objects'.\n"
            f"{THINK_INSTRUCTION} The answer is a list in the format "
            "[{'Position': [x1, y1, x2, y2], 'Confidence': number}, ...].")


def vqa_prompt(question: str, choices: Sequence[str], thinking: bool) -> str:
    listed = " ".join(f"({chr(ord('A') + i)}) {c}" for i, c in enumerate(choices))
    lines = [question, listed] if listed else [question]
    lines.append(THINK_INSTRUCTION if thinking else DIRECT_INSTRUCTION)
    return "\n".join(lines)


def grounding_prompt(question: str) -> str:
    return (f"{question}\n{THINK_INSTRUCTION} "
            "The answer is the bounding box of the object in the format (x1,y1),(x2,y2).")


def classification_prompt(style: str, classnames: Sequence[str], label: str, dataset: str, rng: random.Random,
                          thing: str = "object", attribute: str = "category") -> str:
    """Dispatch on the task's prompt style (the YAML `task.prompt` key)."""
    if style == "cls_rl":
        return cls_rl_prompt(classnames, label, dataset, rng, thinking=True)
    if style == "no_think":
        return cls_rl_prompt(classnames, label, dataset, rng, thinking=False)
    if style == "visual_rft":
        return visual_rft_cls_prompt(thing, attribute)
    raise ValueError(f"unknown prompt style {style!r}; choose one of {PROMPT_STYLES}")
