"""Patches -> image: what the vLLM engine hands vLLM must re-encode to the very patches the learner trains on."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from protocol.rollout import Completion, RolloutGroup, RolloutRequest
from stream.codec import decode_group, encode_group
from vlm.inputs import build_sequence_batch, encode_prompt, image_patches, left_pad_prompts
from vlm.pixels import patches_to_image


@pytest.mark.parametrize("size", [(64, 48), (113, 77), (30, 200)])
def test_reencoding_the_recovered_image_gives_identical_patches_and_tokens(tiny_policy, size):
    _, processor = tiny_policy
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), mode="RGB")
    first = encode_prompt(processor, image, "what is it?")
    patches = image_patches(processor.image_processor, first)
    recovered = patches_to_image(patches, first.image_grid_thw, processor.image_processor)
    grid = first.image_grid_thw[0]
    assert recovered.size == (int(grid[2]) * 14, int(grid[1]) * 14)  # the resized image, sides on the patch grid
    again = encode_prompt(processor, recovered, "what is it?")
    assert torch.equal(again.input_ids, first.input_ids)  # same number of image tokens
    assert torch.equal(again.image_grid_thw, first.image_grid_thw)
    assert torch.equal(again.image, first.image)
    assert torch.allclose(image_patches(processor.image_processor, again), patches, atol=1e-6)


def test_patch_count_that_does_not_fit_the_grid_is_refused(tiny_policy):
    _, processor = tiny_policy
    with pytest.raises(ValueError, match="do not fit grid"):
        patches_to_image(torch.zeros(5, 1176), torch.tensor([[1, 2, 2]]), processor.image_processor)


def test_learner_rebuilds_the_engines_patches_bit_for_bit_from_the_wire_image(tiny_policy):
    """The prompt carries its resized image in 8 bits; the engine builds the patches it samples from, the
    learner those it trains on after the Redis codec's round trip: the very same tensors."""
    model, processor = tiny_policy
    rng = np.random.default_rng(7)
    image = Image.fromarray(rng.integers(0, 256, (91, 133, 3), dtype=np.uint8), mode="RGB")  # resized on encode
    prompt = encode_prompt(processor, image, "what is it?")
    assert prompt.image.dtype == torch.uint8 and prompt.image.shape[2] == 3
    assert not hasattr(prompt, "pixel_values")  # no float patches travel
    pad, image_id = model.generation_config.pad_token_id, model.config.image_token_id
    engine = left_pad_prompts([prompt], pad, image_id, processor.image_processor)["pixel_values"]
    group = RolloutGroup(RolloutRequest("p0", prompt), [Completion([5, 6], [-0.5, -0.5], "x", "stop")], 0)
    wire = decode_group(encode_group(group)).request.inputs
    learner = build_sequence_batch([wire], [[5, 6]], pad, image_id, processor.image_processor).pixel_values
    assert engine.dtype == torch.float32 and engine.shape[0] == int(prompt.image_grid_thw.prod())
    assert torch.equal(engine, learner)
    # and they are the patches the processor makes of that image: recovering it from them is exact
    assert torch.equal(torch.from_numpy(np.array(patches_to_image(
        learner, prompt.image_grid_thw, processor.image_processor))), prompt.image)


def test_patches_need_the_processor_and_its_grid(tiny_policy):
    _, processor = tiny_policy
    prompt = encode_prompt(processor, Image.new("RGB", (56, 56), "red"), "what is it?")
    with pytest.raises(ValueError, match="no image processor was given"):
        image_patches(None, prompt)
    prompt.image_grid_thw = torch.tensor([[1, 2, 8]])  # not what this processor makes of a 56x56 image
    with pytest.raises(ValueError, match=r"made grid \[\[1, 4, 4\]\] from a \[56, 56, 3\] image"):
        image_patches(processor.image_processor, prompt)


def test_an_image_already_on_the_grid_is_carried_as_the_processor_saw_it(tiny_policy):
    """encode_prompt skips recovering the image from the patches when the processor kept its size: the
    carried image must be exactly the one recovery would give."""
    _, processor = tiny_policy
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (56, 84, 3), dtype=np.uint8), mode="RGB")  # 2x3 merged patches
    prompt = encode_prompt(processor, image, "what is it?")
    enc = processor.image_processor(images=[image], return_tensors="pt")
    recovered = patches_to_image(enc["pixel_values"], enc["image_grid_thw"], processor.image_processor)
    assert torch.equal(prompt.image, torch.from_numpy(np.array(recovered)))
    assert torch.equal(prompt.image, torch.from_numpy(np.array(image)))
