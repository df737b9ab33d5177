"""Learning-rate scaling and decoupled weight decay: the two blocks that turn a direction into a step."""

from __future__ import annotations

import torch
from torch import Tensor

from mstudio.optim.transforms import (
    GradientTransformation,
    _leaves_matching,
    _rebuild,
    _scalar_for,
    _with_grad,
    is_donated,
)

__all__ = ["add_decayed_weights", "scale_by_learning_rate"]


def _stateless(update) -> GradientTransformation:
    return GradientTransformation(lambda params: (), update, elementwise=True)


def scale_by_learning_rate(learning_rate: float | Tensor) -> GradientTransformation:
    """Multiply updates by ``-learning_rate`` (descent). ``None`` updates stay ``None``.

    Args:
        learning_rate: a number or a 0-d tensor (e.g. a hyper-parameter of the state, see
            :func:`~mstudio.optim.inject_hyperparams`); a tensor traces into a compiled step as data, so
            changing it never recompiles.
    """

    def update(grads, state, params=None):
        present, values, leaves, treedef = _with_grad(grads)
        if not values:
            return grads, state
        step = _scalar_for(values, -learning_rate)
        if is_donated():
            torch._foreach_mul_(values, step)
            return grads, state
        return _rebuild(treedef, leaves, present, torch._foreach_mul(values, step)), state

    return _stateless(update)


def add_decayed_weights(weight_decay: float | Tensor, learning_rate: float | Tensor) -> GradientTransformation:
    """Decoupled weight decay (Loshchilov & Hutter, 2019) as ``torch.optim.AdamW`` applies it.

    Chained *after* :func:`scale_by_learning_rate`: the parameter is first shrunk, then the step added,
    ``new_p = p * (1 - learning_rate * weight_decay) + update``, and the update returned is ``new_p - p``.
    That difference is exact whenever ``new_p`` lies within a factor two of ``p`` (Sterbenz's lemma), so
    :func:`~mstudio.optim.apply_updates` gives back ``new_p`` bit for bit, in torch's order; only an element
    whose step exceeds its own size (a near-zero weight) can differ, by one rounding. Parameters without a
    gradient are not decayed (torch skips ``grad is None``).

    Inside :func:`~mstudio.optim.donated` the parameters are shrunk in place and the updates returned as they
    came, so that :func:`~mstudio.optim.apply_updates` (in place too) gives ``p * (1 - lr * wd) + update``,
    torch's own order.

    Args:
        weight_decay: the decay coefficient (a number or 0-d tensor), >= 0.
        learning_rate: the learning rate in force (decay is scaled by it, as in PyTorch).
    """

    def update(updates, state, params):
        present, values, leaves, treedef = _with_grad(updates)
        if not values:
            return updates, state
        param_leaves = _leaves_matching(params, treedef, "params")  # once: flattening is O(leaves)
        p = [param_leaves[i] for i in present]
        shrink = _scalar_for(p, 1 - learning_rate * weight_decay)
        if is_donated():
            torch._foreach_mul_(p, shrink)
            return updates, state
        new_p = torch._foreach_mul(p, shrink)
        torch._foreach_add_(new_p, values)
        torch._foreach_sub_(new_p, p)
        return _rebuild(treedef, leaves, present, new_p), state

    return _stateless(update)
