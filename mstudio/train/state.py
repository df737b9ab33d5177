"""The train state: everything a step reads and returns, as one immutable pytree of tensors."""

from __future__ import annotations

from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor, nn

from mstudio.bridge import functionalize
from mstudio.optim import GradientTransformation
from mstudio.policy import check_policy


class TrainState(NamedTuple):
    """What a train step carries from one batch to the next (an optree pytree; never modified in place).

    Attributes:
        params: trainable parameters, ``state_dict`` name -> tensor.
        buffers: buffers and frozen parameters, name -> tensor (never updated by the step).
        opt_state: the optimizer's state (for :func:`mstudio.optim.adamw`: clipping's ``()`` and
            ``AdamWState(count, mu, nu)``).
        memory: the recurrent memory carried into the next batch, batch on dim 0 of every leaf.
        init_memory: ``policy.initial_state(B)``, what rows restart from at an episode boundary.
        last_timestamp: long ``(B,)``, each row's last timestamp so far (zeros at the start).
        step: long scalar, the number of updates done.
    """

    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    opt_state: Any
    memory: Any
    init_memory: Any
    last_timestamp: Tensor
    step: Tensor

    @property
    def batch_size(self) -> int:
        return self.last_timestamp.shape[0]


def check_memory(memory: Any, batch_size: int, what: str) -> None:
    """Raise ``ValueError`` unless every leaf of ``memory`` is a tensor with ``batch_size`` rows on dim 0."""
    for path, leaf in zip(*optree.tree_flatten_with_path(memory)[:2]):
        if not isinstance(leaf, Tensor) or leaf.dim() == 0 or leaf.shape[0] != batch_size:
            shape = tuple(leaf.shape) if isinstance(leaf, Tensor) else type(leaf).__name__
            raise ValueError(
                f"{what} leaf at {path} must be a tensor with the batch ({batch_size}) on dim 0, got {shape}; "
                "the memory carry resets rows along dim 0"
            )


def init_state(policy: nn.Module, optimizer: GradientTransformation, batch_size: int) -> TrainState:
    """A fresh :class:`TrainState` for training ``policy`` with ``optimizer`` on batches of ``batch_size`` rows.

    Copies the policy's tensors, so training never changes the module (load the result back with
    ``policy.load_state_dict({**state.params, **state.buffers})``).
    """
    check_policy(policy)
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    _, params, buffers = functionalize(policy)
    params = {name: p.clone() for name, p in params.items()}
    buffers = {name: b.clone() for name, b in buffers.items()}
    init_memory = policy.initial_state(batch_size)
    check_memory(init_memory, batch_size, f"{type(policy).__name__}.initial_state({batch_size})")
    device = next(iter(params.values())).device if params else torch.device("cpu")
    return TrainState(
        params=params,
        buffers=buffers,
        opt_state=optimizer.init(params),
        memory=optree.tree_map(torch.clone, init_memory),
        init_memory=init_memory,
        last_timestamp=torch.zeros(batch_size, dtype=torch.int64, device=device),
        step=torch.zeros((), dtype=torch.int64, device=device),
    )
