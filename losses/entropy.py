"""An entropy bonus: a loss that falls as the policy's action distribution spreads out."""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from losses._keys import require, step_mask
from losses._reduce import masked_mean
from mstudio import distributions

__all__ = ["entropy_bonus"]


def entropy_bonus(
    batch: Mapping[str, Any], latents: Mapping[str, Any], params: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Minus the policy's mean per-step entropy, summed over heads: minimizing it raises the entropy.

    Reads ``latents["pi_logits"]`` (head -> log-softmax float ``(B, T, 1, K)``; VPT: ``buttons`` K = 8641,
    ``camera`` K = 121) and the optional ``batch["mask"]`` ``(B, T)`` of any dtype (0 on padding; a missing
    mask counts every step). ``params`` is unused. With ``ent_k = -sum_j p_kj log p_kj`` the entropy of head
    ``k`` at a step and ``m`` the mask::

        mean_entropy = sum_{B,T}(m * sum_k ent_k) / max(sum_{B,T} m, 1)
        loss         = -mean_entropy

    Every head counts at every valid step (unlike ``behavior_clone``'s ``entropy`` metric, no camera rule:
    the bonus needs no recorded action). The reduction is a mean over valid steps, so its scale does not grow
    with ``T``; weight it with :func:`losses.weighted`, e.g.
    ``combine(behavior_clone, weighted(entropy_bonus, 1e-3))``.

    Returns:
        ``{"loss", "mean_entropy"}``, scalars in the logits' dtype (``mean_entropy`` detached). The metric is not
        named ``entropy`` so that ``combine`` does not add it to ``behavior_clone``'s ``entropy``.
    """
    del params
    pi_logits = require(latents, "pi_logits", "latents", "entropy_bonus")
    per_step = sum(distributions.entropy(pi_logits).values())  # (B, T)
    mean_entropy = masked_mean(per_step, step_mask(batch, per_step))
    return {"loss": -mean_entropy, "mean_entropy": mean_entropy.detach()}
