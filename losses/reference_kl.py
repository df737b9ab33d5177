"""KL divergence to a frozen reference policy: distillation, or "stay close to the pretrained VPT"."""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from losses._keys import require, step_mask
from mstudio.actions import CAMERA_NULL
from mstudio.distributions import per_head_kl

__all__ = ["reference_kl"]

_DIRECTIONS = ("forward", "reverse")


def reference_kl(
    batch: Mapping[str, Any],
    latents: Mapping[str, Any],
    params: Mapping[str, Tensor],
    *,
    direction: str = "forward",
) -> dict[str, Tensor]:
    """KL divergence between a frozen reference policy and the policy, summed over time, averaged over the batch.

    Reads ``latents["pi_logits"]`` and ``latents["reference_pi_logits"]`` (the same heads, log-softmax
    ``(B, T, 1, K)``; :class:`mstudio.models.WithReference` adds the second from a frozen copy of the policy),
    ``batch["agent_action"]["camera"]`` long ``(B, T, 1)`` (for the camera rule) and the optional
    ``batch["mask"]`` ``(B, T)`` of any dtype (0 on padding). ``params`` is unused. The reference is a
    constant: its logits are detached. With ``m`` the mask, ``cam = (camera != 60)`` (as in
    ``behavior_clone``, the camera head does not count where the camera did not move) and, per head ``k``::

        kl_k   = KL(pi_ref_k || pi_k) = sum_j p_ref_kj (log p_ref_kj - log p_kj)     direction="forward"
        kl_k   = KL(pi_k || pi_ref_k)                                               direction="reverse"
        loss   = mean_B( (kl_camera * m * cam).sum(T) + sum_{k != camera} (kl_k * m).sum(T) )

    Forward KL (the default, as in distillation) is mass-covering: the policy keeps every action the
    reference takes; reverse KL is mode-seeking. Weight it with :func:`losses.weighted`, e.g.
    ``combine(behavior_clone, weighted(reference_kl, 0.1))`` (the scale is BC's: summed over ``T``). Bind the
    direction with ``functools.partial(reference_kl, direction="reverse")``.

    Returns:
        ``{"loss", "reference_kl"}``, scalars in the logits' dtype (``reference_kl`` detached).

    Raises:
        ValueError: an unknown ``direction``, a missing key (naming it), or heads that differ.
    """
    del params
    if direction not in _DIRECTIONS:
        raise ValueError(f"reference_kl needs direction 'forward' (KL(pi_ref || pi)) or 'reverse' "
                         f"(KL(pi || pi_ref)), got {direction!r}")
    pi_logits = require(latents, "pi_logits", "latents", "reference_kl")
    if "reference_pi_logits" not in latents:
        raise ValueError(
            f"reference_kl needs latents['reference_pi_logits'] (the frozen reference's log-softmax logits, laid "
            f"out as pi_logits), but latents has only {sorted(latents)}; train "
            "mstudio.models.WithReference(policy), whose forward adds them"
        )
    reference = {head: logits.detach() for head, logits in latents["reference_pi_logits"].items()}
    agent_action = require(batch, "agent_action", "batch", "reference_kl")
    camera = require(agent_action, "camera", "batch['agent_action']", "reference_kl")
    kl = per_head_kl(reference, pi_logits) if direction == "forward" else per_head_kl(pi_logits, reference)
    some_kl = next(iter(kl.values()))
    camera_moved = (camera != CAMERA_NULL).to(some_kl.dtype).squeeze(-1)
    mask = step_mask(batch, camera_moved)
    per_row = sum((value * mask * camera_moved if head == "camera" else value * mask).sum(-1)
                  for head, value in kl.items())  # (B,)
    loss = per_row.mean()
    return {"loss": loss, "reference_kl": loss.detach()}
