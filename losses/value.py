"""Value-head regression on a return target carried by the batch."""

from __future__ import annotations

from typing import Any, Mapping

import torch.nn.functional as F
from torch import Tensor

from losses._keys import require, step_mask
from losses._reduce import masked_mean

__all__ = ["value_regression"]


def value_regression(
    batch: Mapping[str, Any],
    latents: Mapping[str, Any],
    params: Mapping[str, Tensor],
    *,
    huber_delta: float | None = None,
) -> dict[str, Tensor]:
    """Squared (or Huber) error between the value head and the batch's return, averaged over valid steps.

    Reads ``latents["vpred"]`` float ``(B, T, 1)``, ``batch["return"]`` float ``(B, T)`` (the regression
    target of each step, e.g. the discounted return-to-go; treated as data, no gradient) and the optional
    ``batch["mask"]`` ``(B, T)`` of any dtype (0 on padding; a missing mask counts every step). ``params`` is
    unused. With ``v = vpred[..., 0]``, ``R = return``, ``m`` the mask and ``d = huber_delta``::

        err_t      = (v - R)^2                                       huber_delta=None (MSE)
        err_t      = 0.5 (v - R)^2 if |v - R| < d else d (|v - R| - 0.5 d)   otherwise (Huber)
        value_loss = sum_{B,T}(m * err) / max(sum_{B,T} m, 1)

    Args:
        huber_delta: ``None`` for the squared error, or the Huber threshold ``d > 0``
            (``torch.nn.functional.huber_loss``; note its quadratic part is half the squared error).

    Returns:
        ``{"loss", "value_loss"}``, scalars in ``vpred``'s dtype (``value_loss`` detached).

    Raises:
        ValueError: no ``batch["return"]``, shapes that do not match, or ``huber_delta <= 0``.
    """
    del params
    if huber_delta is not None and not huber_delta > 0:
        raise ValueError(f"value_regression needs huber_delta > 0 (or None for the squared error), got {huber_delta!r}")
    if "return" not in batch:
        raise ValueError(
            "value_regression needs batch['return'], float (B, T): the return target of every step (e.g. the "
            f"discounted return-to-go); the batch has only {sorted(batch)}. Add the returns to the batch, or "
            "leave value_regression out of the objective for data without them"
        )
    target = batch["return"]
    vpred = require(latents, "vpred", "latents", "value_regression")
    if vpred.dim() < 1 or vpred.shape[-1] != 1:
        raise ValueError(f"value_regression needs latents['vpred'] of shape (B, T, 1), got {tuple(vpred.shape)}")
    if not target.is_floating_point() or tuple(target.shape) != tuple(vpred.shape[:-1]):
        raise ValueError(
            f"value_regression needs batch['return'] float of shape {tuple(vpred.shape[:-1])} (B, T, as "
            f"latents['vpred'] without its last dim), got {target.dtype} {tuple(target.shape)}"
        )
    prediction = vpred[..., 0]
    target = target.detach().to(prediction.dtype)
    if huber_delta is None:
        per_step = (prediction - target).square()
    else:
        per_step = F.huber_loss(prediction, target, reduction="none", delta=float(huber_delta))
    value_loss = masked_mean(per_step, step_mask(batch, per_step))
    return {"loss": value_loss, "value_loss": value_loss.detach()}
