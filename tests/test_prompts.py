"""Prompt texts exactly as methods.md gives them, and the CLS-RL candidate-list rule."""
from __future__ import annotations

import random

import pytest

from tasks.examples import candidates_in
from tasks.prompts import (
    candidate_count,
    candidate_list,
    classification_prompt,
    cls_rl_prompt,
    detection_prompt,
    grounding_prompt,
    visual_rft_cls_prompt,
)


@pytest.mark.parametrize("n, expected", [(4, 4), (29, 29), (74, 74), (75, 30), (100, 40), (250, 100), (1000, 100)])
def test_candidate_count(n, expected):
    assert candidate_count(n) == expected


def test_candidate_list_contains_label_and_is_seeded():
    names = [f"class {i}" for i in range(200)]
    a = candidate_list(names, "class 7", random.Random(1))
    assert "class 7" in a and len(a) == 80 and len(set(a)) == 80
    assert a == candidate_list(names, "class 7", random.Random(1))
    with pytest.raises(ValueError, match="'nope' is not among"):
        candidate_list(names, "nope", random.Random(0))


def test_cls_rl_prompts_exact():
    names = ["cat", "dog", "emu"]
    text = cls_rl_prompt(names, "dog", "OxfordPets", random.Random(0))
    listed = candidates_in(text)
    assert sorted(listed) == names
    assert text == ("What type of object is in the photo?\nPlease choose one from list [ " + ", ".join(listed) + "].\n"
                    " Please output the thinking process in <think> </think> and final answer in <answer> </answer> tags.")
    direct = cls_rl_prompt(names, "dog", "EuroSAT", random.Random(0), thinking=False)
    assert direct.startswith("What type of object is in the centered satellite photo?\nPlease choose one from list [ ")
    assert direct.endswith("].\n Please directly output the answer.")
    assert classification_prompt("no_think", names, "dog", "dtd", random.Random(0)).startswith(
        "What type of texture is in the photo?")


def test_other_prompts():
    assert visual_rft_cls_prompt("aircraft", "model").startswith(
        "This is an image containing an aircraft. Please identify the model of the aircraft based on the image.")
    assert visual_rft_cls_prompt("flower", "species").endswith("Please strictly follow the format.")
    det = detection_prompt("dog")
    assert "category 'dog' in the image, return 'No Objects'." in det and "'Confidence'" in det
    assert grounding_prompt("Where is the cup?").endswith("(x1,y1),(x2,y2).")
    with pytest.raises(ValueError, match="unknown prompt style 'cot'"):
        classification_prompt("cot", ["a"], "a", "x", random.Random(0))
