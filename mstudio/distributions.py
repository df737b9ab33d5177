"""Action distributions as pure functions over logits.

VPT's action heads are categorical distributions with a singleton action dimension: a head's logits are
float ``(..., 1, K)`` **log-softmax** values and its actions long ``(..., 1)`` (``K = 8641`` for
``buttons``, ``121`` for ``camera``). The per-head functions below sum over that singleton dimension, so
they return ``(...)`` (``(B, T)`` for a batch of windows), as MineStudio's ``CategoricalActionHead``
``logprob`` / ``entropy`` do. The dict versions apply a function to every head of ``pi_logits``.

Also here: the KL divergence between diagonal Gaussians that ``KLDivergenceCallback`` uses
(:func:`diagonal_gaussian_kl`).
"""

from __future__ import annotations

import warnings
from typing import Mapping

import torch
from torch import Tensor

__all__ = [
    "categorical_entropy",
    "categorical_kl",
    "categorical_logprob",
    "categorical_mode",
    "categorical_sample",
    "diagonal_gaussian_kl",
    "entropy",
    "logprob",
    "mode",
    "per_head_kl",
    "sample",
]


def _check_logits(logits: Tensor, head: str) -> None:
    if not torch.is_floating_point(logits) or logits.dim() < 2:
        raise ValueError(
            f"pi_logits[{head!r}] must be floating point (..., 1, K) log-softmax values; "
            f"got {logits.dtype} {tuple(logits.shape)}"
        )


def _check_action(logits: Tensor, action: Tensor, head: str) -> None:
    _check_logits(logits, head)
    if action.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"agent_action[{head!r}] must be an integer tensor, got {action.dtype}")
    if tuple(action.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"agent_action[{head!r}] has shape {tuple(action.shape)} but pi_logits[{head!r}] "
            f"{tuple(logits.shape)} needs actions of shape {tuple(logits.shape[:-1])}"
        )


def categorical_logprob(logits: Tensor, action: Tensor, *, head: str = "head") -> Tensor:
    """Log-probability of ``action`` under one head.

    Args:
        logits: float ``(..., 1, K)`` log-softmax values.
        action: integer ``(..., 1)`` class indices in ``[0, K)``.
        head: the head's name, used in error messages.

    Returns:
        float ``(...)``: ``logits[..., 0, action]`` summed over the singleton dimension.
    """
    _check_action(logits, action, head)
    return torch.gather(logits, -1, action.long().unsqueeze(-1)).squeeze(-1).sum(-1)


def categorical_entropy(logits: Tensor, *, head: str = "head") -> Tensor:
    """Entropy ``-sum_k p_k log p_k`` of one head: float ``(..., 1, K)`` -> ``(...)``."""
    _check_logits(logits, head)
    return -(logits.exp() * logits).sum(-1).sum(-1)


def categorical_kl(logits_p: Tensor, logits_q: Tensor, *, head: str = "head") -> Tensor:
    """``KL(p || q) = sum_k p_k (log p_k - log q_k)`` of one head: two ``(..., 1, K)`` -> ``(...)``."""
    _check_logits(logits_p, head)
    if logits_p.shape != logits_q.shape:
        raise ValueError(
            f"KL of head {head!r} needs logits of equal shape; got {tuple(logits_p.shape)} and {tuple(logits_q.shape)}"
        )
    return (logits_p.exp() * (logits_p - logits_q)).sum(-1).sum(-1)


def categorical_sample(logits: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """Draw one class per distribution by the Gumbel-max trick: ``(..., 1, K)`` -> long ``(..., 1)``."""
    uniform = torch.rand(logits.shape, dtype=logits.dtype, device=logits.device, generator=generator)
    # Clamp away from 0 so that -log(-log(u)) stays finite.
    gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(logits.dtype).tiny)))
    return torch.argmax(logits + gumbel, dim=-1)


def categorical_mode(logits: Tensor) -> Tensor:
    """Most likely class: ``(..., 1, K)`` -> long ``(..., 1)``."""
    return torch.argmax(logits, dim=-1)


def logprob(pi_logits: Mapping[str, Tensor], actions: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """:func:`categorical_logprob` of every head in ``pi_logits``; ``actions`` must have each head."""
    missing = [head for head in pi_logits if head not in actions]
    if missing:
        raise ValueError(f"agent_action lacks head(s) {missing}; it has {sorted(actions)}")
    return {head: categorical_logprob(logits, actions[head], head=head) for head, logits in pi_logits.items()}


def entropy(pi_logits: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """:func:`categorical_entropy` of every head."""
    return {head: categorical_entropy(logits, head=head) for head, logits in pi_logits.items()}


def per_head_kl(pi_logits_p: Mapping[str, Tensor], pi_logits_q: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """:func:`categorical_kl` of every head: head -> ``KL(p || q)`` float ``(...)``.

    The heads are independent, so the joint action's KL is the sum of the values (what MineStudio's
    ``pi_head.kl_divergence`` returns, see :meth:`mstudio.policy.DictActionHead.kl_divergence`).
    """
    if set(pi_logits_p) != set(pi_logits_q):
        raise ValueError(f"KL needs the same heads on both sides; got {sorted(pi_logits_p)} and {sorted(pi_logits_q)}")
    return {head: categorical_kl(lp, pi_logits_q[head], head=head) for head, lp in pi_logits_p.items()}


def sample(pi_logits: Mapping[str, Tensor], *, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """:func:`categorical_sample` of every head: a dict of long ``(..., 1)`` actions."""
    return {head: categorical_sample(logits, generator=generator) for head, logits in pi_logits.items()}


def mode(pi_logits: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """:func:`categorical_mode` of every head."""
    return {head: categorical_mode(logits) for head, logits in pi_logits.items()}


def diagonal_gaussian_kl(q_mu: Tensor, q_log_var: Tensor, p_mu: Tensor, p_log_var: Tensor) -> Tensor:
    """KL divergence ``KL(q || p)`` between diagonal Gaussians given means and log-variances.

    ``-0.5 * sum_D(1 + (lq - lp) - exp(lq - lp) - (mq - mp)^2 / exp(lp))``, evaluated in the same order as
    MineStudio's ``KLDivergenceCallback.kl_divergence``.

    Args:
        q_mu, q_log_var, p_mu, p_log_var: float ``(..., D)``, all the same shape.

    Returns:
        float ``(...)``.
    """
    shapes = {tuple(t.shape) for t in (q_mu, q_log_var, p_mu, p_log_var)}
    if len(shapes) != 1:
        raise ValueError(
            "diagonal_gaussian_kl needs q_mu, q_log_var, p_mu, p_log_var of one shape; got "
            f"{tuple(q_mu.shape)}, {tuple(q_log_var.shape)}, {tuple(p_mu.shape)}, {tuple(p_log_var.shape)}"
        )
    log_ratio = q_log_var - p_log_var
    return -0.5 * torch.sum(1 + log_ratio - log_ratio.exp() - (q_mu - p_mu).pow(2) / p_log_var.exp(), dim=-1)


#: Old name -> new name; the old names still work and warn.
_DEPRECATED = {"kl_divergence": "per_head_kl", "gaussian_kl": "diagonal_gaussian_kl"}


def __getattr__(name: str):
    if name in _DEPRECATED:
        new = _DEPRECATED[name]
        warnings.warn(f"mstudio.distributions.{name} is deprecated: it is now {new} (same arguments and result)",
                      DeprecationWarning, stacklevel=2)
        return globals()[new]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
