"""Recover the resized image from a prompt's Qwen2-VL patches: the 8-bit image a prompt carries.

`encode_prompt` runs the processor once and keeps, instead of its float patches, the image it resized
(undoing the patch layout and the normalisation gives it back exactly: the processor resized in 8-bit, so
rounding recovers it); its sides are multiples of the patch grid, so a processor (the learner's, the HF
engine's, vLLM's own) keeps its size and produces the same patches and the same number of image tokens.
"""
from __future__ import annotations

import torch
from PIL import Image

# the processor's patch layout (transformers' Qwen2-VL image processor): axes of the 9-D view it flattens
# are (t, tp, c, h/m, m, p, w/m, m, p), permuted by (0, 3, 6, 4, 7, 2, 1, 5, 8); this is the inverse.
_UNPERMUTE = (0, 6, 5, 1, 3, 7, 2, 4, 8)


def patches_to_image(pixel_values: torch.Tensor, grid_thw, image_processor) -> Image.Image:
    """The RGB image that `image_processor` turned into `pixel_values` with grid `grid_thw` = (t, h, w)."""
    t, h, w = (int(x) for x in torch.as_tensor(grid_thw).reshape(-1)[:3])
    p, tp = int(image_processor.patch_size), int(image_processor.temporal_patch_size)
    m = int(image_processor.merge_size)
    if pixel_values.shape[0] != t * h * w:
        raise ValueError(f"{pixel_values.shape[0]} patches do not fit grid {(t, h, w)}")
    channels = pixel_values.shape[1] // (tp * p * p)
    x = pixel_values.float().reshape(t, h // m, w // m, m, m, channels, tp, p, p).permute(*_UNPERMUTE)
    frame = x.reshape(t * tp, channels, h * p, w * p)[0]
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(-1, 1, 1)
    scale = float(getattr(image_processor, "rescale_factor", 1 / 255))
    rgb = ((frame * std + mean) / scale).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(rgb.permute(1, 2, 0).numpy(), mode="RGB")
