"""Behaviour cloning, exactly as MineStudio's ``BehaviorCloneCallback`` (``offline/mine_callbacks/behavior_clone.py``)."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from losses._keys import deprecated_weight, require, step_mask
from mstudio import distributions
from mstudio.actions import CAMERA_NULL

__all__ = ["behavior_clone"]


def behavior_clone(
    batch: Mapping[str, Any], latents: Mapping[str, Any], params: Mapping[str, Tensor], *, weight: float | None = None
) -> dict[str, Tensor]:
    """Negative log-likelihood of the recorded actions, summed over time and averaged over the batch.

    Reads ``batch["agent_action"] = {"buttons": long (B, T, 1), "camera": long (B, T, 1)}``, the optional
    ``batch["mask"]`` ``(B, T)`` of any dtype (0 on padding), and ``latents["pi_logits"]`` (log-softmax
    ``(B, T, 1, 8641)`` / ``(B, T, 1, 121)``). ``params`` is unused.

    With ``logp_k`` / ``ent_k`` the per-step log-prob / entropy of head ``k``, ``m`` the mask and
    ``cam = (camera != 60)`` (the camera head is not trained on steps where the camera did not move)::

        camera_loss = -(logp_camera * m * cam).sum(T)      button_loss = -(logp_buttons * m).sum(T)
        loss        = mean_B(camera_loss + button_loss)
        entropy     = mean_B((ent_camera * m * cam).sum(T) + (ent_buttons * m).sum(T))

    Weight it with :func:`losses.weighted` (``weighted(behavior_clone, 0.01)`` is MineStudio's
    ``BehaviorCloneCallback(weight=0.01)``; ``bc_weight``, its declared ``weight_key``, then reports 0.01).
    ``weight=`` is deprecated: it is the same as ``weighted``.

    Returns:
        ``{"loss", "camera_loss", "button_loss", "entropy", "bc_weight"}``, float32 scalars
        (``camera_loss`` / ``button_loss`` are means over B).
    """
    agent_action = require(batch, "agent_action", "batch", "behavior_clone")
    pi_logits = require(latents, "pi_logits", "latents", "behavior_clone")
    for head in ("buttons", "camera"):  # both heads are read below, by name
        require(pi_logits, head, "latents['pi_logits']", "behavior_clone")
    log_prob = distributions.logprob(pi_logits, agent_action)
    weight = deprecated_weight(weight, "behavior_clone")
    return bc_outputs(batch, agent_action, log_prob, distributions.entropy(pi_logits), weight)


def bc_outputs(batch: Mapping[str, Any], agent_action: Mapping[str, Tensor], log_likelihood: Mapping[str, Tensor],
               entropy: Mapping[str, Tensor], weight: float) -> dict[str, Tensor]:
    """BC's reduction of per-step log-likelihoods (head -> ``(B, T)``): the mask, the camera rule, the sum over T
    and the mean over B, as in :func:`behavior_clone`'s docstring (shared by its variants, e.g. label smoothing)."""
    camera_moved = (agent_action["camera"] != CAMERA_NULL).float().squeeze(-1)
    mask = step_mask(batch, camera_moved)
    logp_camera = (log_likelihood["camera"] * mask * camera_moved).sum(-1)
    logp_buttons = (log_likelihood["buttons"] * mask).sum(-1)
    entropy_camera = (entropy["camera"] * mask * camera_moved).sum(-1)
    entropy_buttons = (entropy["buttons"] * mask).sum(-1)
    camera_loss, button_loss = -logp_camera, -logp_buttons
    return {
        "loss": (camera_loss + button_loss).mean() * weight,
        "camera_loss": camera_loss.mean(),
        "button_loss": button_loss.mean(),
        "entropy": (entropy_camera + entropy_buttons).mean(),
        "bc_weight": torch.as_tensor(weight, dtype=torch.float32, device=camera_loss.device),
    }

behavior_clone.weight_key = "bc_weight"
