"""Shared weights and constants for the weight-broadcast tests."""

from __future__ import annotations

import torch

from protocol.components import WeightSyncConfig

HOST = "127.0.0.1"
FAST = WeightSyncConfig(bucket_mb=0.25, timeout_s=4.0, heartbeat_s=0.2)  # dead = 1 s without a heartbeat
MARGIN_S = 3.0  # the error must come within timeout_s + this



def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes: compares NaN, -0.0 and bf16 exactly."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def make_weights(seed: int) -> dict[str, torch.Tensor]:
    """~4.8 MB: float32 + bfloat16 + int64 + bool, a 0-d tensor, one tensor bigger than a 0.25 MB bucket."""
    g = torch.Generator().manual_seed(seed)
    w = {
        "embed.weight": torch.randn(3000, 256, generator=g),  # 3 MB: its own bucket
        "fc1.weight": torch.randn(512, 256, generator=g).bfloat16(),  # exactly one bucket
        "fc1.bias": torch.randn(512, generator=g).bfloat16(),
        "fc2.weight": torch.randn(128, 512, generator=g),
        "fc2.bias": torch.randn(128, generator=g),
        "scale": torch.randn((), generator=g),
        "steps": torch.randint(0, 2**40, (7, 3), generator=g),
        "mask": torch.rand(50, generator=g) > 0.5,
        "frozen.weight": torch.randn(64, 64, generator=g),  # never sent: the caller filters it out
    }
    for i in range(6):  # 200 KB each: one bucket apiece, so buckets keep flowing after a few tensors
        w[f"block{i}.weight"] = torch.randn(256, 200, generator=g)
    w["fc2.bias"][0] = float("nan")
    w["fc2.bias"][1] = -0.0
    return w


def sent(weights: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    return [(n, t) for n, t in weights.items() if not n.startswith("frozen.")]
