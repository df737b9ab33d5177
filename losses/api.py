"""The objective contract, in one place: what an objective is, what it receives, and what it must return.

An **objective** is a pure function ``(batch, latents, params) -> dict[str, Tensor]``:

- ``batch``: the data batch (``design.md``'s layout) plus two entries the train step adds, both read-only:
  ``batch[STEP_KEY]``, a long 0-d tensor counting the updates done before this batch (what schedules read),
  and ``batch[HYPERPARAMS_KEY]``, a dict of 0-d float tensors from the train state (what
  :class:`Hyperparam` weights read; change them mid-run with ``mstudio.set_hyperparams`` without a
  recompile). They travel inside the batch so the signature stays three pure arguments.
- ``latents``: what the policy's forward returned (``pi_logits``, ``vpred``, ...).
- ``params``: the policy's parameters, ``state_dict`` name -> tensor.

It returns a dict with a float scalar ``"loss"`` (the only entry that is differentiated) and any scalar
metrics to log. Objectives hold no state: configuration is bound with keyword arguments or combinators.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Mapping, NamedTuple, Union

import torch
from torch import Tensor

from mstudio.optim.checks import check_schedule_value, describe

__all__ = [
    "HYPERPARAMS_KEY",
    "STEP_KEY",
    "Hyperparam",
    "Objective",
    "Schedule",
    "Weight",
    "check_output",
    "hyperparams_of",
    "objective_name",
    "resolve_weight",
]

Objective = Callable[[Mapping[str, Any], Mapping[str, Any], Mapping[str, Tensor]], dict[str, Tensor]]
#: ``step -> value``: a function of the long 0-d step tensor (see :mod:`mstudio.optim.schedules`).
Schedule = Callable[[Tensor], Union[Tensor, float]]

#: Batch key under which the train step hands objectives its step counter (long 0-d tensor).
STEP_KEY = "step"
#: Batch key under which the train step hands objectives the train state's hyper-parameters
#: (``dict[str, float64 0-d tensor]``).
HYPERPARAMS_KEY = "hyperparams"


class Hyperparam(NamedTuple):
    """A weight read from the train state at every step: ``batch[HYPERPARAMS_KEY][name]``.

    ``default`` is the value :func:`mstudio.init_state` stores when it is given the objective; afterwards the
    state's tensor is what counts, so a sweep or a change mid-run needs no new objective and no recompile.
    """

    name: str
    default: float


#: What :func:`losses.weighted` accepts: a number, a schedule of the step, or a hyper-parameter of the state.
Weight = Union[float, Schedule, Hyperparam]


def objective_name(objective: Callable) -> str:
    """A readable name for error messages (``functools.partial`` objects show their function's name)."""
    name = getattr(objective, "__name__", None) or getattr(getattr(objective, "func", None), "__name__", None)
    return name or repr(objective)


def _is_scalar(value: Any) -> bool:
    """A metric the trainer can log: a real number or a 0-d tensor that is not complex."""
    if isinstance(value, Tensor):
        return value.dim() == 0 and not value.is_complex()
    return isinstance(value, numbers.Real)


def check_output(out: Any, objective: Callable) -> dict[str, Tensor]:
    """``out`` as a dict, or a ``ValueError`` unless it keeps the contract: a mapping with ``str`` keys, a float
    0-d tensor ``"loss"`` and scalar metrics (0-d tensors or numbers) under the other keys.

    Only types and shapes are read (static under ``torch.compile``: no host sync, no graph break).
    """
    name = objective_name(objective)
    if not isinstance(out, Mapping):
        raise ValueError(f"objective {name} must return a dict with a 'loss' entry, got {describe(out)}")
    keys = [key for key in out if not isinstance(key, str)]
    if keys:
        raise ValueError(f"objective {name} returned the non-str key(s) {keys!r} ({type(keys[0]).__name__}); "
                         "keys are the metrics' names and must be str")
    if "loss" not in out:
        raise ValueError(f"objective {name} must return a dict with a 'loss' entry, got a dict with keys {sorted(out)}")
    loss = out["loss"]
    if not (isinstance(loss, Tensor) and loss.dim() == 0 and loss.is_floating_point()):
        raise ValueError(f"objective {name} must return a float scalar 'loss' tensor (0-d), got {describe(loss)}")
    for key, value in out.items():
        if not _is_scalar(value):
            raise ValueError(f"objective {name} returned metric {key!r} as {describe(value)}; metrics must be "
                             "scalars (0-d tensors or numbers) so the trainer can log them")
    return dict(out)


def hyperparams_of(objective: Callable) -> dict[str, float]:
    """The ``name -> default`` of every :class:`Hyperparam` an objective (and the objectives it combines) reads."""
    return dict(getattr(objective, "hyperparams", {}))


def resolve_weight(weight: Weight, batch: Mapping[str, Any], like: Tensor, objective: Callable) -> Tensor | float:
    """The value of ``weight`` for this batch: the number itself, ``schedule(batch[STEP_KEY])``, or
    ``batch[HYPERPARAMS_KEY][name]``; tensors come back in ``like``'s dtype and device."""
    if isinstance(weight, Hyperparam):
        values = batch.get(HYPERPARAMS_KEY, {})
        if weight.name not in values:
            raise ValueError(
                f"{objective_name(objective)} is weighted by hyper-parameter {weight.name!r}, read from "
                f"batch[{HYPERPARAMS_KEY!r}] (has {sorted(values)}); make the state with "
                "mstudio.init_state(..., objective=objective) so it holds the objective's hyper-parameters"
            )
        return values[weight.name].to(like.dtype)
    if callable(weight):
        if STEP_KEY not in batch:
            raise ValueError(
                f"{objective_name(objective)} has a scheduled weight, which reads batch[{STEP_KEY!r}] (a long "
                "scalar tensor); make_train_step adds it, a direct call must pass it"
            )
        value = check_schedule_value(weight(batch[STEP_KEY]), f"weighted({objective_name(objective)}) weight")
        return torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return weight
