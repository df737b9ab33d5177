"""Objectives from objectives: sums and weights. Each combinator returns an objective again, so they nest."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Union

import torch
from torch import Tensor

Objective = Callable[[Mapping[str, Any], Mapping[str, Any], Mapping[str, Tensor]], dict[str, Tensor]]
Schedule = Callable[[Tensor], Union[Tensor, float]]

#: Key under which the train step hands its step counter (long scalar tensor, the number of updates done
#: before this batch) to objectives, inside the batch they receive. Schedules of :func:`weighted` read it.
STEP_KEY = "step"


def _name(objective: Callable) -> str:
    return getattr(objective, "__name__", None) or getattr(getattr(objective, "func", None), "__name__", repr(objective))


def _call(objective: Objective, batch, latents, params) -> dict[str, Tensor]:
    out = objective(batch, latents, params)
    if not isinstance(out, Mapping) or "loss" not in out:
        raise ValueError(f"objective {_name(objective)} must return a dict with a 'loss' entry, got {out!r:.200}")
    return dict(out)


def combine(*objectives: Objective) -> Objective:
    """Sum of objectives, as MineStudio's ``MineLightning`` sums its callbacks.

    The ``"loss"`` entries are added; any other key returned by more than one objective is added too
    (MineStudio sums same-named keys), and the rest are passed through.
    """
    if not objectives:
        raise ValueError("combine needs at least one objective")

    def combined(batch, latents, params):
        total: dict[str, Tensor] = {}
        for objective in objectives:
            for key, value in _call(objective, batch, latents, params).items():
                total[key] = total[key] + value if key in total else value
        return total

    combined.__name__ = f"combine({', '.join(_name(o) for o in objectives)})"
    return combined


def weighted(objective: Objective, weight: float | Schedule) -> Objective:
    """``objective`` with its ``"loss"`` multiplied by ``weight``.

    Args:
        objective: any objective.
        weight: a number, or a schedule ``step -> weight`` (e.g. from :mod:`mstudio.optim.schedules`) evaluated
            on ``batch["step"]`` (:data:`STEP_KEY`), which :func:`mstudio.make_train_step` puts in the batch it
            hands to objectives. Called on its own, a scheduled objective needs that key in ``batch``.

    Entries named ``*_weight`` (``bc_weight``, ``kl_weight``) are multiplied too, so they report the weight
    in force: ``weighted(behavior_clone, 0.01)`` returns exactly what MineStudio's
    ``BehaviorCloneCallback(weight=0.01)`` does.
    """

    def weighted_objective(batch, latents, params):
        out = _call(objective, batch, latents, params)
        if callable(weight):
            if STEP_KEY not in batch:
                raise ValueError(
                    f"weighted({_name(objective)}) has a scheduled weight, which reads batch[{STEP_KEY!r}] "
                    "(a long scalar tensor); make_train_step adds it, a direct call must pass it"
                )
            w = torch.as_tensor(weight(batch[STEP_KEY]), dtype=out["loss"].dtype, device=out["loss"].device)
        else:
            w = weight
        return {key: value * w if key == "loss" or key.endswith("_weight") else value for key, value in out.items()}

    weighted_objective.__name__ = f"weighted({_name(objective)})"
    return weighted_objective
