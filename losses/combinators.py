"""Objectives from objectives: sums and weights. Each combinator returns an objective again, so they nest."""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from losses.api import Hyperparam, Objective, Weight, check_output, objective_name, resolve_weight
from mstudio.optim.checks import FINITE, check_number, describe

__all__ = ["combine", "weighted"]


def combine(*objectives: Objective) -> Objective:
    """Sum of objectives, as MineStudio's ``MineLightning`` sums its callbacks.

    The ``"loss"`` entries are added; any other key returned by more than one objective is added too
    (MineStudio sums same-named keys), and the rest are passed through. The result reads the
    hyper-parameters of all of ``objectives``.
    """
    if not objectives:
        raise ValueError("combine needs at least one objective")
    for i, objective in enumerate(objectives):
        _check_callable(objective, f"combine: objectives[{i}]")

    def combined(batch: Mapping[str, Any], latents: Mapping[str, Any], params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        total: dict[str, Tensor] = {}
        for objective in objectives:
            for key, value in check_output(objective(batch, latents, params), objective).items():
                total[key] = total[key] + value if key in total else value
        return total

    combined.__name__ = f"combine({', '.join(objective_name(o) for o in objectives)})"
    combined.hyperparams = _merge_hyperparams(objectives)
    return combined


def weighted(objective: Objective, weight: Weight, *, weight_key: str | None = None) -> Objective:
    """``objective`` with its ``"loss"`` multiplied by ``weight``: the one way to weight a term.

    Args:
        objective: any objective.
        weight: a finite number (negative on purpose only: it maximises the objective's loss); a schedule ``step -> weight`` (:mod:`mstudio.optim.schedules`) evaluated
            on ``batch["step"]``, returning a number or a 0-d tensor; or a :class:`~losses.api.Hyperparam` read
            from the train state, so it can change mid-run without a recompile (see :mod:`losses.api`).
        weight_key: the metric that reports the objective's weight, multiplied too so it shows the weight in
            force (MineStudio logs ``bc_weight`` / ``kl_weight``). Defaults to the objective's declared
            ``weight_key`` attribute (``behavior_clone.weight_key == "bc_weight"``; a ``functools.partial``'s
            function's); ``None`` when it has none.

    ``weighted(behavior_clone, 0.01)`` returns exactly what MineStudio's ``BehaviorCloneCallback(weight=0.01)``
    does. A NaN from a schedule cannot be seen without a host sync: the train step's guard skips that update.

    Raises:
        TypeError: ``objective`` is not callable, or ``weight`` is none of the above (a string, a bool, a tensor).
        ValueError: a number (or a ``Hyperparam`` default) that is NaN or infinite.

    Example::

        objective = losses.weighted(losses.behavior_clone, losses.Hyperparam("bc_weight", 0.01))
    """
    _check_callable(objective, "weighted: objective")
    weight = _check_weight(weight)
    # a functools.partial (e.g. label_smoothed_behavior_clone with its smoothing bound) keeps its function's key
    declared = getattr(objective, "weight_key", getattr(getattr(objective, "func", None), "weight_key", None))
    key = weight_key if weight_key is not None else declared

    def weighted_objective(batch: Mapping[str, Any], latents: Mapping[str, Any], params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = check_output(objective(batch, latents, params), objective)
        w = resolve_weight(weight, batch, out["loss"], objective)
        out["loss"] = out["loss"] * w
        if key is not None and key in out:
            out[key] = out[key] * w
        return out

    weighted_objective.__name__ = f"weighted({objective_name(objective)})"
    weighted_objective.weight_key = key
    extra = [weight] if isinstance(weight, Hyperparam) else []
    weighted_objective.hyperparams = _merge_hyperparams([objective], extra)
    return weighted_objective


def _check_callable(objective: Any, name: str) -> None:
    if not callable(objective):
        raise TypeError(f"{name} must be callable (batch, latents, params) -> dict, got {describe(objective)}")


def _check_weight(weight: Any) -> Weight:
    """``weight`` if :func:`weighted` can use it (a number as a float); ``TypeError`` / ``ValueError`` naming it."""
    if isinstance(weight, Hyperparam):
        if not isinstance(weight.name, str):
            raise TypeError(f"losses.Hyperparam name must be a str, got {describe(weight.name)}")
        default = check_number(weight.default, f"losses.Hyperparam({weight.name!r}) default", FINITE)
        return weight._replace(default=default)
    if callable(weight):
        return weight
    # A tensor is refused too: it would be a constant baked into a compiled step; a Hyperparam can change.
    return check_number(weight, "weighted: weight", FINITE,
                        alternatives=", a schedule (step -> weight) or a losses.Hyperparam")


def _merge_hyperparams(objectives, extra: list[Hyperparam] = ()) -> dict[str, float]:
    """``name -> default`` over ``objectives`` and ``extra``; one name with two defaults is an error."""
    merged: dict[str, float] = {}
    pairs = [item for o in objectives for item in getattr(o, "hyperparams", {}).items()]
    for name, default in pairs + [(h.name, h.default) for h in extra]:
        if merged.setdefault(name, default) != default:
            raise ValueError(f"hyper-parameter {name!r} is declared with two defaults, {merged[name]} and {default}")
    return merged
