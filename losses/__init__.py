"""Objectives: pure functions ``(batch, latents, params) -> {"loss": scalar, **metrics}``.

Importable on its own (it needs only torch, :mod:`mstudio.distributions`, :mod:`mstudio.actions` and the number
checks of :mod:`mstudio.optim.checks`, never the trainer, the data stack or the models). The contract (what an objective receives and returns, the step
counter and hyper-parameters it may read) is in :mod:`losses.api`. Combine and weight objectives with
:func:`combine` and :func:`weighted`::

    objective = losses.combine(losses.weighted(losses.behavior_clone, 0.01), losses.kl_gaussian)
    out = objective(batch, latents, params)

Writing a new objective takes a function; this one penalises the value head's output size::

    def value_l2(batch, latents, params):
        \"\"\"Mean squared ``latents["vpred"]`` (B, T, 1) over valid steps.\"\"\"
        vpred = latents["vpred"].squeeze(-1).float()          # (B, T)
        mask = batch.get("mask")                               # optional (B, T), 0 on padding
        mask = torch.ones_like(vpred) if mask is None else mask.to(vpred.dtype)
        value_l2 = (vpred.square() * mask).sum() / mask.sum().clamp_min(1)
        return {"loss": value_l2, "value_l2": value_l2.detach()}

    objective = losses.combine(losses.behavior_clone, losses.weighted(value_l2, losses.Hyperparam("v_w", 0.1)))

It compiles into the train step as it is; ``mstudio.set_hyperparams(state, v_w=0.5)`` changes its weight
mid-run without a recompile.
"""

from losses import api
from losses.api import HYPERPARAMS_KEY, STEP_KEY, Hyperparam, Objective, Schedule, hyperparams_of
from losses.behavior_clone import behavior_clone
from losses.combinators import combine, weighted
from losses.entropy import entropy_bonus
from losses.kl import kl_gaussian
from losses.l2_init import l2_init
from losses.label_smoothing import label_smoothed_behavior_clone
from losses.reference_kl import reference_kl
from losses.value import value_regression

__all__ = [
    "HYPERPARAMS_KEY",
    "STEP_KEY",
    "Hyperparam",
    "Objective",
    "Schedule",
    "api",
    "behavior_clone",
    "combine",
    "entropy_bonus",
    "hyperparams_of",
    "kl_gaussian",
    "l2_init",
    "label_smoothed_behavior_clone",
    "reference_kl",
    "value_regression",
    "weighted",
]


def __dir__() -> list[str]:
    return __all__
