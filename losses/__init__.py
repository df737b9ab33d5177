"""Objectives: pure functions ``(batch, latents, params) -> {"loss": scalar, **metrics}``.

Importable on its own (it needs only torch and :mod:`mstudio.distributions`, never the trainer)::

    import losses
    objective = losses.combine(losses.weighted(losses.behavior_clone, 0.01), losses.kl_gaussian)
    out = objective(batch, latents, params)

Configuration is bound with keyword arguments (``functools.partial(losses.behavior_clone, weight=0.01)``)
or with :func:`weighted`; objectives hold no state. Each objective's docstring lists the keys it reads.
"""

from losses.behavior_clone import behavior_clone
from losses.combinators import STEP_KEY, Objective, combine, weighted
from losses.kl import kl_gaussian

__all__ = ["STEP_KEY", "Objective", "behavior_clone", "combine", "kl_gaussian", "weighted"]
