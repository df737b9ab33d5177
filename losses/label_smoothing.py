"""Behaviour cloning against label-smoothed targets (Szegedy et al. 2016, "Rethinking the Inception Architecture")."""

from __future__ import annotations

import numbers
from typing import Any, Mapping

from torch import Tensor

from losses._keys import require
from losses.behavior_clone import bc_outputs
from mstudio import distributions

__all__ = ["label_smoothed_behavior_clone"]


def label_smoothed_behavior_clone(
    batch: Mapping[str, Any], latents: Mapping[str, Any], params: Mapping[str, Tensor], *, smoothing: float = 0.1
) -> dict[str, Tensor]:
    """``behavior_clone`` with each head's one-hot target replaced by ``(1 - eps) * onehot + eps / K``.

    Reads what :func:`losses.behavior_clone` reads: ``batch["agent_action"] = {"buttons": long (B, T, 1),
    "camera": long (B, T, 1)}``, the optional ``batch["mask"]`` ``(B, T)`` of any dtype (0 on padding) and
    ``latents["pi_logits"]`` (log-softmax ``(B, T, 1, 8641)`` / ``(B, T, 1, 121)``). ``params`` is unused.

    With ``eps = smoothing``, ``logp_k`` the log-prob of the recorded action of head ``k`` (``K_k`` classes),
    ``m`` the mask and ``cam = (camera != 60)`` (as in BC, the camera head is not trained where the camera
    did not move), the per-step cross-entropy against the smoothed target is::

        ce_k        = -((1 - eps) * logp_k + eps * mean_j log pi_kj)      (mean over the K_k classes)
        camera_loss = (ce_camera * m * cam).sum(T)      button_loss = (ce_buttons * m).sum(T)
        loss        = mean_B(camera_loss + button_loss)

    With ``smoothing=0`` every output equals ``behavior_clone``'s bit for bit. Bind another value with
    ``functools.partial(label_smoothed_behavior_clone, smoothing=0.2)``; weight it with :func:`losses.weighted`
    (``bc_weight``, its declared ``weight_key``, then reports the weight, as for ``behavior_clone``; a
    ``partial`` of it too).

    Args:
        smoothing: ``eps`` in ``[0, 1)``.

    Returns:
        ``{"loss", "camera_loss", "button_loss", "entropy", "bc_weight"}`` with ``behavior_clone``'s meanings
        (``entropy`` is the policy's, not the target's).

    Raises:
        ValueError: ``smoothing`` is not a number in ``[0, 1)``.
    """
    del params
    if isinstance(smoothing, bool) or not isinstance(smoothing, numbers.Real) or not 0 <= smoothing < 1:
        raise ValueError(
            f"label_smoothed_behavior_clone needs smoothing in [0, 1) (the probability mass spread evenly over "
            f"all classes; 0 is plain behaviour cloning), got {smoothing!r}"
        )
    smoothing = float(smoothing)
    agent_action = require(batch, "agent_action", "batch", "label_smoothed_behavior_clone")
    pi_logits = require(latents, "pi_logits", "latents", "label_smoothed_behavior_clone")
    log_prob = distributions.logprob(pi_logits, agent_action)
    entropy = distributions.entropy(pi_logits)
    # (1 - eps) * onehot + eps / K against log pi: the mean over classes (summed over the singleton dim).
    smoothed = {head: (1 - smoothing) * log_prob[head] + smoothing * pi_logits[head].mean(-1).sum(-1)
                for head in ("buttons", "camera")}
    return bc_outputs(batch, agent_action, smoothed, entropy, 1.0)

label_smoothed_behavior_clone.weight_key = "bc_weight"
