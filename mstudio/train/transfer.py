"""Moving batches to the step's device: uint8 frames as they are, asynchronously from pinned host memory."""

from __future__ import annotations

from typing import Any

import optree
import torch
from torch import Tensor

__all__ = ["batch_to_device"]


def batch_to_device(batch: Any, device: torch.device | str) -> Any:
    """``batch`` (a pytree of tensors) with every tensor on ``device``, dtypes unchanged.

    Images stay uint8 on the way (a quarter of float32's bytes; the policy converts them on the device). A
    host-to-CUDA copy is issued ``non_blocking``: from pinned memory (the loader's ``pin_memory``) it runs on
    the copy engine while the device is still busy with the previous step, and the step's kernels, queued
    after it on the same stream, wait for it. Other copies (to the CPU, between GPUs, from pageable memory)
    are synchronous as usual. Tensors already on ``device`` are returned as they are.

    Args:
        batch: e.g. ``{"image": uint8 (B, T, H, W, 3), "agent_action": {...}, "timestamp": long (B, T)}``.
        device: where the step's state lives (``state.step.device``).
    """
    device = torch.device(device)

    def move(tensor: Any) -> Any:
        if not isinstance(tensor, Tensor):
            return tensor
        return tensor.to(device, non_blocking=device.type == "cuda" and tensor.device.type == "cpu")

    return optree.tree_map(move, batch)
