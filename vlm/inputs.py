"""Model inputs shared by rollout and learner, so both see byte-identical tokens and pixels.

A prompt is encoded once (chat template, image expanded into its patch tokens, image resized by the
processor) into a `PromptInputs` that carries the resized image in 8 bits; rollout samples from it, the
buffer carries it, and the learner stacks prompt+completion rows from it with `build_sequence_batch`. Both
ends rebuild the float patches from the same 8-bit image with the same processor (`image_patches`), so they
see the same tensors while only the image's bytes travel.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from protocol.rollout import PromptInputs
from vlm.pixels import patches_to_image


def chat_messages(text: str) -> list[dict]:
    """The user turn as the papers build it: the image first, then the question."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def encode_prompt(processor, image: Image.Image, text: str) -> PromptInputs:
    prompt = processor.apply_chat_template(chat_messages(text), add_generation_prompt=True)
    enc = processor(text=[prompt], images=[image], return_tensors="pt")
    grid = enc["image_grid_thw"]
    side = int(processor.image_processor.patch_size)
    on_grid = (image.height, image.width) == (int(grid[0, 1]) * side, int(grid[0, 2]) * side)
    if image.mode == "RGB" and on_grid:
        resized = image  # already on the processor's grid (tasks/images.py resizes to it): it kept the size
    else:  # the processor's own resize, recovered exactly from its patches (vlm/pixels.py)
        resized = patches_to_image(enc["pixel_values"], grid, processor.image_processor)
    return PromptInputs(input_ids=enc["input_ids"][0], image=torch.from_numpy(np.array(resized)),
                        image_grid_thw=grid)


def image_patches(image_processor, inputs: PromptInputs) -> torch.Tensor:
    """The float patches of a prompt's 8-bit image, as the model takes them: a pure function of the image
    and the processor, so engine and learner build identical ones. The image is already on the patch grid,
    so the processor keeps its size; a grid other than the carried one is refused (different processor
    settings on the two ends would misalign the image tokens)."""
    if image_processor is None:
        raise ValueError("the prompt has an image but no image processor was given to build its patches")
    image = inputs.image
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[2] != 3:
        raise ValueError(f"a prompt's image must be a uint8 [H, W, 3] tensor, got {image.dtype} "
                         f"{list(image.shape)}")
    enc = image_processor(images=[image.numpy()], return_tensors="pt")
    if not torch.equal(enc["image_grid_thw"].long(), inputs.image_grid_thw.long().reshape(-1, 3)):
        raise ValueError(f"image processor made grid {enc['image_grid_thw'].tolist()} from a "
                         f"{list(image.shape)} image, the prompt carries {inputs.image_grid_thw.tolist()}: "
                         f"engine and learner must use the processor that encoded the prompt")
    return enc["pixel_values"]


def _distinct_patches(prompts: Sequence[PromptInputs],
                      image_processor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each distinct prompt object's patches once, in order of first appearance (rows repeat a prompt G
    times), and each row's index into them."""
    slots: dict[int, int] = {}
    patches = []
    for p in prompts:
        if id(p) not in slots:
            slots[id(p)] = len(patches)
            patches.append(image_patches(image_processor, p))
    return patches, torch.tensor([slots[id(p)] for p in prompts], dtype=torch.long)


def _row_patches(prompts: Sequence[PromptInputs], image_processor) -> torch.Tensor:
    """Every row's patches in row order (generate takes one image per row)."""
    patches, index = _distinct_patches(prompts, image_processor)
    return torch.cat([patches[i] for i in index.tolist()])


def vision_token_ids(config) -> list[int]:
    """Ids the policy must never emit: an extra image token in a completion breaks the next forward."""
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return sorted({int(getattr(config, n)) for n in names if getattr(config, n, None) is not None})


@dataclass
class SequenceBatch:
    """Right-padded prompt+completion rows for one training (or scoring) forward."""

    input_ids: torch.Tensor  # [N, L]
    attention_mask: torch.Tensor  # [N, L]
    mm_token_type_ids: torch.Tensor  # [N, L], 1 on image tokens (Qwen2-VL's 3-D positions need it)
    # each distinct image's patches once, concatenated in order of first appearance: the G rows of a group
    # share one image, so the vision tower need not encode it G times (vlm/logprobs.py model_outputs)
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor  # [N, 3], per row (the 3-D positions need every row's grid)
    prompt_lens: torch.Tensor  # [N]
    completion_lens: torch.Tensor  # [N]
    image_index: torch.Tensor  # [N], row i's image among the distinct ones in pixel_values

    def distinct_grid_thw(self) -> torch.Tensor:
        """[D, 3]: the grid of each distinct image, in pixel_values' order."""
        grids = torch.zeros((int(self.image_index.max()) + 1, 3), dtype=self.image_grid_thw.dtype,
                            device=self.image_grid_thw.device)
        return grids.index_copy(0, self.image_index.to(grids.device), self.image_grid_thw)

    def row_pixel_values(self) -> torch.Tensor:
        """Every row's patches in row order, the layout a plain model call takes."""
        sizes = self.distinct_grid_thw().prod(-1).tolist()
        chunks = self.pixel_values.split(sizes)
        return torch.cat([chunks[i] for i in self.image_index.tolist()])

    def model_kwargs(self, pixels: bool = True) -> dict:
        """The model's inputs; `pixels=False` leaves the images out for a caller that passes their encoder
        outputs instead."""
        out = dict(input_ids=self.input_ids, attention_mask=self.attention_mask,
                   mm_token_type_ids=self.mm_token_type_ids, image_grid_thw=self.image_grid_thw)
        return {**out, "pixel_values": self.row_pixel_values()} if pixels else out


def build_sequence_batch(prompts: Sequence[PromptInputs], completions: Sequence[Sequence[int]],
                         pad_token_id: int, image_token_id: int, image_processor=None) -> SequenceBatch:
    """Row i is prompts[i] followed by completions[i] (a prompt object may repeat, e.g. G times); the
    patches are built from the prompts' images by `image_processor`."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    rows = [torch.cat([p.input_ids, torch.as_tensor(list(c), dtype=torch.long)])
            for p, c in zip(prompts, completions)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = r
        attention_mask[i, : len(r)] = 1
    patches, image_index = _distinct_patches(prompts, image_processor)
    return SequenceBatch(
        input_ids=input_ids, attention_mask=attention_mask,
        mm_token_type_ids=(input_ids == image_token_id).long() * attention_mask,
        pixel_values=torch.cat(patches), image_grid_thw=torch.cat([p.image_grid_thw for p in prompts]),
        prompt_lens=torch.tensor([len(p) for p in prompts]),
        completion_lens=torch.tensor([len(c) for c in completions]), image_index=image_index)


def left_pad_prompts(prompts: Sequence[PromptInputs], pad_token_id: int, image_token_id: int | None,
                     image_processor=None) -> dict:
    """Generation inputs for several prompts at once (HF generate appends on the right, so pad on the
    left); the patches are built from the prompts' images by `image_processor`."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = p.input_ids
        attention_mask[i, width - len(p):] = 1
    if all(p.image is None for p in prompts):
        return dict(input_ids=input_ids, attention_mask=attention_mask)
    return dict(input_ids=input_ids, attention_mask=attention_mask,
                mm_token_type_ids=(input_ids == image_token_id).long() * attention_mask,
                pixel_values=_row_patches(prompts, image_processor),
                image_grid_thw=torch.cat([p.image_grid_thw for p in prompts]))
