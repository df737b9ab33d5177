"""Functional optimizers: ``(init, update)`` pairs of pure functions over pytrees, in the manner of optax.

    optimizer = mstudio.optim.adamw(lr=4e-5, weight_decay=1.81e-4, warmup_steps=2000, clip_norm=1.0)
    opt_state = optimizer.init(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = mstudio.optim.apply_updates(params, updates)
"""

from mstudio.optim import schedules
from mstudio.optim.adamw import AdamWState, adamw, scale_by_adamw
from mstudio.optim.transforms import (
    GradientTransformation,
    apply_updates,
    chain,
    clip_by_global_norm,
    global_norm,
    identity,
)

__all__ = [
    "GradientTransformation",
    "AdamWState",
    "adamw",
    "apply_updates",
    "chain",
    "clip_by_global_norm",
    "global_norm",
    "identity",
    "scale_by_adamw",
    "schedules",
]
