"""Shared by the rollout-buffer tests: small real groups, polling with a deadline, and entry accessors."""
from __future__ import annotations

import time

import torch

from protocol.rollout import Completion, PromptInputs, RolloutGroup, RolloutRequest
from stream.buffer import RolloutBuffer


def group(i: int, patches: int = 2) -> RolloutGroup:
    """A small group; patches=2 gives ~9 KB, above Redis' 4 KB node size, so MAXLEN ~ trims exactly."""
    # an image of the float32 patches' byte count (4704 bytes a patch)
    inputs = PromptInputs(input_ids=torch.arange(i, i + 20),
                          image=torch.full((28 * patches, 56, 3), i % 256, dtype=torch.uint8),
                          image_grid_thw=torch.tensor([[1, 2, 2]]))
    comps = [Completion([i, 1, 2], [-0.5, -0.25, -0.125], f"answer {i}", "stop") for _ in range(2)]
    return RolloutGroup(RolloutRequest(f"p{i}", inputs, solution="red", meta={"i": i}), comps, policy_version=i,
                        rewards=[1.0, 0.0])


def wait_until(cond, what: str, timeout_s: float = 10.0):
    """Poll `cond` until it is truthy (returned) or the deadline passes (an assertion naming `what`)."""
    deadline = time.monotonic() + timeout_s
    while not (got := cond()):
        assert time.monotonic() < deadline, f"waited {timeout_s} s for {what}"
        time.sleep(0.01)
    return got


def wait_idle(buf: RolloutBuffer, ms: int) -> None:
    """Until every entry pending in buf's group was delivered at least `ms` ago (what XAUTOCLAIM's min-idle reads)."""
    def idle() -> bool:
        pel = buf._r.xpending_range(buf.stream, buf.group, "-", "+", 1000)
        return bool(pel) and min(p["time_since_delivered"] for p in pel) >= ms
    wait_until(idle, f"pending entries idle for {ms} ms")


def ids(entries) -> list[str]:
    return [e for e, _ in entries]


def prompts(entries) -> list[str]:
    return [g.request.prompt_id for _, g in entries]
