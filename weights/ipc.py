"""Colocated weight sync: the learner shares its tensors as `torch.multiprocessing` handles and the engine on
the same GPU maps them, with no copy through a process group (CUDA IPC on GPU; on CPU, shared memory).

    handles, keep = share(named)         # learner: keep `keep` alive until every engine has loaded
    named = rebuild(handles, device)     # engine worker: tensors viewing the learner's memory
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.multiprocessing.reductions import reduce_tensor

Handle = tuple[str, tuple]  # (name, (rebuild function, its arguments))

_CUDA_DEVICE_ARG = 6  # position of the device index in a CUDA tensor's rebuild arguments


def share(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[list[Handle], list[torch.Tensor]]:
    """(handles, tensors to keep alive): a handle is only valid while its tensor lives in the sharing
    process."""
    handles, keep = [], []
    for name, tensor in named:
        tensor = tensor.detach().contiguous()
        keep.append(tensor)
        handles.append((name, reduce_tensor(tensor)))
    return handles, keep


def rebuild(handles: list[Handle], device: torch.device) -> list[tuple[str, torch.Tensor]]:
    """The shared tensors, mapped into this process. A CUDA handle names the sharer's device index, which this
    process (with its own CUDA_VISIBLE_DEVICES) may number otherwise: it is replaced by `device`'s."""
    named = []
    for name, (fn, args) in handles:
        args = list(args)
        if device.type == "cuda":
            args[_CUDA_DEVICE_ARG] = device.index if device.index is not None else torch.cuda.current_device()
        named.append((name, fn(*args)))
    return named
