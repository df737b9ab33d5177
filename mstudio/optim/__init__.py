"""Functional optimizers: ``(init, update)`` pairs of pure functions over pytrees, in the manner of optax::

    optimizer = mstudio.optim.adamw(lr=4e-5, weight_decay=1.81e-4, warmup_steps=2000, clip_norm=1.0)
    opt_state = optimizer.init(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = mstudio.optim.apply_updates(params, updates)
    opt_state = mstudio.optim.set_hyperparams(opt_state, learning_rate=1e-4)   # no recompile

``adamw`` is a chain of blocks that each do one thing (``clip_by_global_norm``, ``scale_by_adam``,
``scale_by_learning_rate``, ``add_decayed_weights``) with its numbers kept as state by ``inject_hyperparams``.
Inside ``with donated():`` the same update is written into the caller's tensors (see :func:`donated`).
"""

from mstudio.optim import schedules
from mstudio.optim.adam import ScaleByAdamState, scale_by_adam
from mstudio.optim.alias import adamw
from mstudio.optim.hyperparams import (
    InjectHyperparamsState,
    find_hyperparams,
    inject_hyperparams,
    read_hyperparam,
    set_hyperparams,
    store_hyperparam,
)
from mstudio.optim.scale import add_decayed_weights, scale_by_learning_rate
from mstudio.optim.transforms import (
    GradientTransformation,
    apply_updates,
    chain,
    clip_by_global_norm,
    donated,
    global_norm,
    identity,
    is_donated,
    known_global_norm,
)

__all__ = [
    "GradientTransformation",
    "InjectHyperparamsState",
    "ScaleByAdamState",
    "add_decayed_weights",
    "adamw",
    "apply_updates",
    "chain",
    "clip_by_global_norm",
    "donated",
    "find_hyperparams",
    "global_norm",
    "identity",
    "inject_hyperparams",
    "is_donated",
    "known_global_norm",
    "read_hyperparam",
    "scale_by_adam",
    "scale_by_learning_rate",
    "schedules",
    "set_hyperparams",
    "store_hyperparam",
]


def __dir__() -> list[str]:
    return __all__
