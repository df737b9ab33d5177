"""MineStudio's recurrent-memory carry between episode-continuous batches (``MineLightning._make_memory``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mstudio import trees

__all__ = ["carry_memory", "episode_starts"]


def episode_starts(timestamp: Tensor, last_timestamp: Tensor) -> Tensor:
    """bool ``(B,)``: rows whose window does not continue the previous one.

    A row continues exactly when its first timestamp is its last one plus one; ``last_timestamp`` starts at
    zeros, so a first batch starting at timestamp 1 continues from the initial memory (MineStudio's rule).

    Args:
        timestamp: long ``(B, T)``, frame indices of this batch.
        last_timestamp: long ``(B,)``, the last frame index each row saw.
    """
    return timestamp[:, 0] != last_timestamp + 1


def carry_memory(memory: Any, init_memory: Any, restart: Tensor) -> Any:
    """Per row, ``init_memory`` where ``restart`` else ``memory`` (every leaf batch-first, same structure).

    Branch-free (``torch.where``), so a compiled step neither breaks nor recompiles at episode boundaries.
    """

    def select(carried: Tensor, initial: Tensor) -> Tensor:
        return torch.where(restart.view(-1, *([1] * (carried.dim() - 1))), initial, carried)

    return trees.tree_map(select, memory, init_memory)
