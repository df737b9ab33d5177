"""Summaries of gradients: how strongly each loss term pulls, whether terms agree, and how noisy the gradient is."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from losses.api import Objective
from mstudio.research.gradients import objective_gradients
from mstudio.train.state import TrainState

__all__ = ["diagnose", "gradient_noise_scale", "gradient_similarity"]


def _flat(grads: Mapping[str, Tensor]) -> Tensor:
    """One float64 vector of every gradient (sorted by parameter name, so two gradients line up)."""
    return torch.cat([grads[name].double().reshape(-1) for name in sorted(grads)])


def gradient_similarity(grads: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Global norms of each objective's gradient and the cosine similarity of every pair.

    Args:
        grads: objective name -> (parameter name -> gradient), e.g. from
            :func:`mstudio.research.objective_gradients`.

    Returns:
        float64 0-d tensors: ``grad_norm/<a>`` for each objective and ``grad_cosine/<a>__<b>`` for each pair
        ``a`` before ``b`` in ``grads``' order (1: they pull the same way; -1: they fight; 0: unrelated). A
        cosine with a zero gradient is 0.
    """
    names = list(grads)
    vectors = {name: _flat(grads[name]) for name in names}
    norms = {name: torch.linalg.vector_norm(v) for name, v in vectors.items()}
    out = {f"grad_norm/{name}": norms[name] for name in names}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            denominator = norms[a] * norms[b]
            cosine = (vectors[a] @ vectors[b]) / torch.where(denominator > 0, denominator, 1.0)
            out[f"grad_cosine/{a}__{b}"] = cosine
    return out


def gradient_noise_scale(per_sample: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The simple gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` (McCandlish et al., 2018, appendix A).

    From ``n`` per-sample gradients ``g_i`` (the leading dim of every tensor): ``tr(Sigma)`` is the unbiased
    total variance ``sum_i |g_i - mean g|^2 / (n - 1)``, and ``|G|^2`` the unbiased estimate of the true gradient's
    squared norm, ``|mean g|^2 - tr(Sigma) / n``. ``B_simple`` is roughly the batch size beyond which larger
    batches stop paying off; it is noisy for small ``n`` and undefined (reported inf) when ``|G|^2 <= 0``.

    Args:
        per_sample: parameter name -> ``(n, *shape)`` gradients, e.g. from
            :func:`mstudio.research.per_sample_gradients`; ``n >= 2``.

    Returns:
        float64 0-d tensors ``{"noise_scale", "trace_covariance", "grad_sq_norm"}``.
    """
    matrix = torch.cat([per_sample[name].double().flatten(1) for name in sorted(per_sample)], dim=1)
    n = matrix.shape[0]
    if n < 2:
        raise ValueError(f"gradient_noise_scale needs at least 2 per-sample gradients, got {n}")
    mean = matrix.mean(0)
    trace = (matrix - mean).square().sum() / (n - 1)
    sq_norm = mean.square().sum() - trace / n
    scale = torch.where(sq_norm > 0, trace / sq_norm.clamp_min(torch.finfo(torch.float64).tiny), torch.inf)
    return {"noise_scale": scale, "trace_covariance": trace, "grad_sq_norm": sq_norm}


def diagnose(policy: nn.Module, objectives: Mapping[str, Objective], state: TrainState,
             batch: Mapping[str, Any]) -> dict[str, Tensor]:
    """One diagnostics pass, ready to log: :func:`gradient_similarity` of the objectives' gradients from one forward,
    plus each objective's loss as ``loss/<name>``.

    Pure and traceable: ``torch.compile(diagnose, fullgraph=True)`` compiles it into one graph (the Trainer
    compiles it once and runs it every N steps, between ordinary steps).

    Returns:
        0-d tensors ``loss/<a>``, ``grad_norm/<a>``, ``grad_cosine/<a>__<b>`` (see :func:`gradient_similarity`).
    """
    grads, outputs = objective_gradients(policy, objectives, state, batch)
    return {**{f"loss/{name}": out["loss"] for name, out in outputs.items()}, **gradient_similarity(grads)}
