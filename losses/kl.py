"""KL regulariser between a posterior and a prior Gaussian, as MineStudio's ``KLDivergenceCallback``."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from losses._keys import deprecated_weight, require
from mstudio.optim.checks import describe
from mstudio.distributions import diagonal_gaussian_kl

__all__ = ["kl_gaussian"]


def kl_gaussian(
    batch: Mapping[str, Any], latents: Mapping[str, Any], params: Mapping[str, Tensor], *, weight: float | None = None
) -> dict[str, Tensor]:
    """KL divergence from ``latents["prior_dist"]`` to ``latents["posterior_dist"]``, averaged.

    Each of the two latents is ``{"mu": float (..., D), "log_var": float (..., D)}`` (in GROOT, ``(B, D)``).
    Per row, ``KL = -0.5 * sum_D(1 + (lq - lp) - exp(lq - lp) - (mq - mp)^2 / exp(lp))``;
    ``loss = mean(KL)``. ``batch`` and ``params`` are unused. Weight it with :func:`losses.weighted`
    (``kl_weight``, its declared ``weight_key``, then reports the weight); ``weight=`` is deprecated.

    Returns:
        ``{"loss", "kl_div", "kl_weight"}``, float32 scalars (``kl_div`` is the unweighted mean KL).
    """
    posterior = require(latents, "posterior_dist", "latents", "kl_gaussian")
    prior = require(latents, "prior_dist", "latents", "kl_gaussian")
    for name, dist in (("posterior_dist", posterior), ("prior_dist", prior)):
        for key in ("mu", "log_var"):
            value = require(dist, key, f"latents[{name!r}]", "kl_gaussian")
            if not (isinstance(value, Tensor) and value.is_floating_point()):
                raise ValueError(f"kl_gaussian needs latents[{name!r}][{key!r}] to be a float tensor (..., D), "
                                 f"got {describe(value)}")
    kl = diagonal_gaussian_kl(posterior["mu"], posterior["log_var"], prior["mu"], prior["log_var"])
    weight = deprecated_weight(weight, "kl_gaussian")
    return {
        "loss": kl.mean() * weight,
        "kl_div": kl.mean(),
        "kl_weight": torch.as_tensor(weight, dtype=torch.float32, device=kl.device),
    }


kl_gaussian.weight_key = "kl_weight"
