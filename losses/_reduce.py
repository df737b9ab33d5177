"""Reductions shared by the per-step objectives (private)."""

from __future__ import annotations

from torch import Tensor


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """``sum(values * mask) / max(sum(mask), 1)``: the mean over valid steps (an all-padding batch gives 0, not NaN).

    Args:
        values: float ``(B, T)``.
        mask: float ``(B, T)``, 0 on padding (from :func:`losses._keys.step_mask`).
    """
    return (values * mask).sum() / mask.sum().clamp_min(1)
