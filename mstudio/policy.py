"""The policy protocol: what mstudio asks of a policy module.

A policy is a plain ``nn.Module``; mstudio calls it statelessly through ``torch.func.functional_call``
(see :mod:`mstudio.bridge`), so it must not write to itself during ``forward``.

Contract (shapes use ``B`` batch rows, ``T`` time steps):

``forward(batch, state_in) -> (latents, state_out)``
    ``batch`` is a dict with at least ``image``: uint8 ``(B, T, H, W, 3)``. ``state_in`` is the recurrent
    memory, a pytree of tensors whose every leaf has the batch on dim 0. ``latents`` is a dict with
    ``pi_logits = {"buttons": float32 (B, T, 1, 8641), "camera": float32 (B, T, 1, 121)}`` holding
    log-softmax values, and ``vpred``: ``(B, T, 1)``; policies may add keys (e.g. ``posterior_dist``).
    ``state_out`` has the structure, shapes and dtypes of ``state_in``.

``initial_state(batch_size) -> pytree``
    The memory at the beginning of an episode, batch on dim 0 of every leaf.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, runtime_checkable

import torch

#: Number of classes of VPT's joint button head (8640 combinations + the inventory token).
N_BUTTONS = 8641
#: Number of classes of VPT's joint camera head (11 x 11 mu-law bins).
N_CAMERA = 121
#: Camera class meaning "the camera did not move" (pitch bin 5, yaw bin 5).
CAMERA_NULL = 60

State = Any  # a pytree of tensors, batch on dim 0 of every leaf
Latents = dict[str, Any]


@runtime_checkable
class Policy(Protocol):
    """Structural type of an mstudio policy (any ``nn.Module`` with these two methods)."""

    def forward(self, batch: Mapping[str, Any], state_in: State) -> tuple[Latents, State]: ...

    def initial_state(self, batch_size: int) -> State: ...


def check_policy(policy: torch.nn.Module) -> None:
    """Raise ``TypeError`` unless ``policy`` is an ``nn.Module`` that follows the :class:`Policy` protocol."""
    if not isinstance(policy, torch.nn.Module):
        raise TypeError(f"a policy must be a torch.nn.Module, got {type(policy).__name__}")
    if not callable(getattr(policy, "initial_state", None)):
        raise TypeError(
            f"{type(policy).__name__} has no initial_state(batch_size) method; mstudio policies return their "
            "episode-start memory from it (an empty tuple for a memoryless policy)"
        )
