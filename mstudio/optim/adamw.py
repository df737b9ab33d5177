"""AdamW (Loshchilov & Hutter, 2019) as MineStudio configures it, reproducing ``torch.optim.AdamW``."""

from __future__ import annotations

from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

from mstudio.optim.schedules import Schedule, linear_warmup
from mstudio.optim.transforms import (
    GradientTransformation,
    _device_of,
    _leaves_matching,
    _rebuild,
    _with_grad,
    chain,
    clip_by_global_norm,
    identity,
)


class AdamWState(NamedTuple):
    count: Tensor  # long scalar: updates done so far
    mu: Any  # first moments (exp_avg), params' structure
    nu: Any  # second moments (exp_avg_sq), params' structure


def scale_by_adamw(
    learning_rate: Schedule, b1: float, b2: float, eps: float, weight_decay: float
) -> GradientTransformation:
    """The AdamW update itself, in ``torch.optim.AdamW``'s order of operations.

    For the ``k``-th update (1-based count ``c = k + 1``) with ``lr = learning_rate(k)``::

        m = lerp(m, g, 1 - b1);  v = b2 * v + (1 - b2) * g * g
        new_p = p * (1 - lr * weight_decay) + (-lr / (1 - b1^c)) * m / (sqrt(v) / sqrt(1 - b2^c) + eps)

    Scalars are computed in float64 as torch computes them in Python floats. The update returned is
    ``new_p - p``, which is exact whenever ``new_p`` lies within a factor of two of ``p`` (Sterbenz's
    lemma): then :func:`apply_updates` gives back torch's ``new_p`` bit for bit. Only an element whose step
    is larger than itself (e.g. a near-zero weight in the first, full-``lr`` Adam step) can differ, by one
    rounding of the step. (Adding ``-lr * (direction + weight_decay * p)`` instead, as optax does, drifts
    from torch by ~1e-6 relative over 30 steps.)
    """

    def init(params):
        zeros = lambda p: torch.zeros_like(p, memory_format=torch.preserve_format)  # noqa: E731
        return AdamWState(
            count=torch.zeros((), dtype=torch.int64, device=_device_of(params)),
            mu=optree.tree_map(zeros, params),
            nu=optree.tree_map(zeros, params),
        )

    def update(grads, state, params):
        present, g, leaves, treedef = _with_grad(grads)
        mu = _leaves_matching(state.mu, treedef, "AdamW's first moments")
        nu = _leaves_matching(state.nu, treedef, "AdamW's second moments")
        count = state.count + 1
        if not g:
            return grads, AdamWState(count, state.mu, state.nu)
        p = [_leaves_matching(params, treedef, "params")[i] for i in present]
        lr = learning_rate(state.count)
        c = count.to(torch.float64)
        step_size = lr / (1 - b1**c)
        bias_correction2_sqrt = torch.sqrt(1 - b2**c)

        m = torch._foreach_lerp([mu[i] for i in present], g, 1 - b1)
        v = torch._foreach_mul([nu[i] for i in present], b2)
        torch._foreach_addcmul_(v, g, g, value=1 - b2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        # Freshly allocated tensors are updated in place below: on CPU an out-of-place foreach op costs
        # several times an in-place one (allocation), and none of these is visible outside this function.
        updates = torch._foreach_mul(p, 1 - lr * weight_decay)  # becomes new_p, then new_p - p
        if torch.compiler.is_compiling():
            # torch's `p.addcdiv_(m, denom, value=-step_size)` is p + (value * m) / denom: the same
            # arithmetic, with the step size kept a traced tensor (the overload below wants it on the host).
            step = torch._foreach_mul(m, -step_size)
            torch._foreach_div_(step, denom)
            torch._foreach_add_(updates, step)
        else:
            torch._foreach_addcdiv_(updates, m, denom, (-step_size).cpu().repeat(len(p)))
        torch._foreach_sub_(updates, p)
        new_state = AdamWState(count, _rebuild(treedef, mu, present, m), _rebuild(treedef, nu, present, v))
        return _rebuild(treedef, leaves, present, updates), new_state

    return GradientTransformation(init, update, learning_rate=learning_rate)


def adamw(
    lr: float | Schedule,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    warmup_steps: int = 0,
    clip_norm: float | None = None,
) -> GradientTransformation:
    """AdamW with MineStudio's warmup and optional global-norm clipping (its ``configure_optimizers``).

    Equivalent to ``torch.optim.AdamW(lr, betas, eps, weight_decay)`` stepped with
    ``LambdaLR(lambda k: min((k + 1) / warmup_steps, 1))``, after ``clip_grad_norm_(clip_norm)`` over the
    parameters that have gradients (Lightning's ``gradient_clip_val``). Parameters without a gradient are
    left alone entirely (see :mod:`mstudio.optim.transforms`).

    Args:
        lr: peak learning rate, or a schedule ``step -> lr`` (the warmup then multiplies it).
        betas: Adam's ``(b1, b2)``.
        eps: added to the denominator.
        weight_decay: decoupled weight decay, applied to every parameter that has a gradient (MineStudio uses
            no parameter groups: biases, norms and attention biases are decayed too).
        warmup_steps: length of the linear warmup; 0 for none.
        clip_norm: maximum global gradient norm, or ``None`` for no clipping.

    Returns:
        A :class:`GradientTransformation` whose ``learning_rate`` is the full schedule (warmup included).
    """
    b1, b2 = betas
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise ValueError(f"betas must be in [0, 1), got {betas}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if not callable(lr) and not lr >= 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    return chain(
        clip_by_global_norm(clip_norm) if clip_norm is not None else identity(),
        scale_by_adamw(linear_warmup(lr, warmup_steps), b1, b2, eps, weight_decay),
    )
