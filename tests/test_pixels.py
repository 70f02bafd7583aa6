"""Patches -> image: what the vLLM engine hands vLLM must re-encode to the very patches the learner trains on."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.inputs import encode_prompt
from vlm.pixels import patches_to_image


@pytest.mark.parametrize("size", [(64, 48), (113, 77), (30, 200)])
def test_reencoding_the_recovered_image_gives_identical_patches_and_tokens(tiny_policy, size):
    _, processor = tiny_policy
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), mode="RGB")
    first = encode_prompt(processor, image, "what is it?")
    recovered = patches_to_image(first.pixel_values, first.image_grid_thw, processor.image_processor)
    grid = first.image_grid_thw[0]
    assert recovered.size == (int(grid[2]) * 14, int(grid[1]) * 14)  # the resized image, sides on the patch grid
    again = encode_prompt(processor, recovered, "what is it?")
    assert torch.equal(again.input_ids, first.input_ids)  # same number of image tokens
    assert torch.equal(again.image_grid_thw, first.image_grid_thw)
    assert torch.allclose(again.pixel_values, first.pixel_values, atol=1e-6)


def test_patch_count_that_does_not_fit_the_grid_is_refused(tiny_policy):
    _, processor = tiny_policy
    with pytest.raises(ValueError, match="do not fit grid"):
        patches_to_image(torch.zeros(5, 1176), torch.tensor([[1, 2, 2]]), processor.image_processor)
