"""Model inputs shared by rollout and learner, so both see byte-identical tokens and pixels.

A prompt is encoded once (chat template, image expanded into its patch tokens, pixels normalised) into a
`PromptInputs`; rollout samples from it, the buffer carries it, and the learner stacks prompt+completion
rows from it with `build_sequence_batch`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from protocol.rollout import PromptInputs


def chat_messages(text: str) -> list[dict]:
    """The user turn as the papers build it: the image first, then the question."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def encode_prompt(processor, image: Image.Image, text: str) -> PromptInputs:
    prompt = processor.apply_chat_template(chat_messages(text), add_generation_prompt=True)
    enc = processor(text=[prompt], images=[image], return_tensors="pt")
    return PromptInputs(input_ids=enc["input_ids"][0], pixel_values=enc["pixel_values"],
                        image_grid_thw=enc["image_grid_thw"])


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
    pixel_values: torch.Tensor  # all rows' patches, concatenated in row order
    image_grid_thw: torch.Tensor  # [N, 3]
    prompt_lens: torch.Tensor  # [N]
    completion_lens: torch.Tensor  # [N]

    def model_kwargs(self) -> dict:
        return dict(input_ids=self.input_ids, attention_mask=self.attention_mask,
                    mm_token_type_ids=self.mm_token_type_ids, pixel_values=self.pixel_values,
                    image_grid_thw=self.image_grid_thw)


def build_sequence_batch(prompts: Sequence[PromptInputs], completions: Sequence[Sequence[int]],
                         pad_token_id: int, image_token_id: int) -> SequenceBatch:
    """Row i is prompts[i] followed by completions[i] (a prompt object may repeat, e.g. G times)."""
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
    return SequenceBatch(
        input_ids=input_ids, attention_mask=attention_mask,
        mm_token_type_ids=(input_ids == image_token_id).long() * attention_mask,
        pixel_values=torch.cat([p.pixel_values for p in prompts]),
        image_grid_thw=torch.cat([p.image_grid_thw for p in prompts]),
        prompt_lens=torch.tensor([len(p) for p in prompts]),
        completion_lens=torch.tensor([len(c) for c in completions]))


def left_pad_prompts(prompts: Sequence[PromptInputs], pad_token_id: int, image_token_id: int | None) -> dict:
    """Generation inputs for several prompts at once (HF generate appends on the right, so pad on the
    left)."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = p.input_ids
        attention_mask[i, width - len(p):] = 1
    if all(p.pixel_values is None for p in prompts):
        return dict(input_ids=input_ids, attention_mask=attention_mask)
    return dict(input_ids=input_ids, attention_mask=attention_mask,
                mm_token_type_ids=(input_ids == image_token_id).long() * attention_mask,
                pixel_values=torch.cat([p.pixel_values for p in prompts]),
                image_grid_thw=torch.cat([p.image_grid_thw for p in prompts]))
