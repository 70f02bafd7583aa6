"""Which weights a learner rank or an engine holds, bit for bit: one SHA-256 per parameter over its name,
dtype, shape and raw bytes (row-major, whatever the tensor's memory layout), so a permuted or transposed
tensor, a cast or a reshape all read as different weights where a float sum would not.

    checksums(model.named_parameters())   # {name: hex digest}; LearnerWorker, HFEngine, the vLLM extension
    digest(named)                         # one hex digest for a whole set of tensors, in any order

The learner and the HF engine name parameters alike (the same Hugging Face class), so their dicts compare
with `==`; the vLLM extension reports vLLM's own (fused) names and layouts, comparable between vLLM engines.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch


def tensor_digest(name: str, tensor: torch.Tensor) -> str:
    """SHA-256 of a parameter's name, dtype, shape and bytes."""
    t = tensor.detach()
    h = hashlib.sha256(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
    flat = t.to("cpu").contiguous().reshape(-1)
    h.update(flat.view(torch.uint8).numpy())  # raw bytes of any dtype (bfloat16 has no numpy type)
    return h.hexdigest()


def checksums(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, str]:
    """{name: tensor_digest} for every (name, tensor)."""
    return {name: tensor_digest(name, t) for name, t in named}


def digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """One SHA-256 over every parameter's digest, in name order."""
    h = hashlib.sha256()
    for name, d in sorted(checksums(named).items()):
        h.update(f"{name}\0{d}\0".encode())
    return h.hexdigest()
