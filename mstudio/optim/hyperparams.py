"""Hyper-parameters as state (optax's ``inject_hyperparams``): change them mid-run without a recompile.

A number closed over when an optimizer is built is a constant of the compiled graph: trying another learning
rate means a new optimizer and a new compile. :func:`inject_hyperparams` keeps such numbers as float64
tensors in the optimizer state instead, where the compiled step reads them as data, and
:func:`set_hyperparams` returns a state with new values.

They are stored with shape ``(1,)`` and read as 0-d views (:func:`read_hyperparam`): inductor restarts its
whole analysis for every 0-d float64 graph input (it tries to turn them into Python floats), which doubles
the compile time of a train step.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import optree
import torch
from torch import Tensor

from mstudio.optim.checks import check_number, check_schedule_value
from mstudio.optim.transforms import GradientTransformation, PyTree, _device_of

__all__ = ["InjectHyperparamsState", "find_hyperparams", "inject_hyperparams", "read_hyperparam", "set_hyperparams",
           "store_hyperparam"]


def store_hyperparam(value: float, device: torch.device | str = "cpu") -> Tensor:
    """``value`` as a hyper-parameter is kept in a state: float64, shape ``(1,)`` (see the module docstring)."""
    return torch.tensor([float(value)], dtype=torch.float64, device=device)


def read_hyperparam(stored: Tensor) -> Tensor:
    """The float64 0-d value of a stored hyper-parameter (a view: no copy, traceable)."""
    return stored.reshape(())


class InjectHyperparamsState(NamedTuple):
    count: Tensor  # long 0-d: updates done so far (what schedules are evaluated at)
    hyperparams: dict[str, Tensor]  # the settable values, float64 (1,) (see store_hyperparam)
    inner_state: Any


def inject_hyperparams(
    factory: Callable[..., GradientTransformation],
    *,
    learning_rate: Callable[[Mapping[str, Tensor]], Tensor] | None = None,
    elementwise: bool = False,
) -> Callable[..., GradientTransformation]:
    """Wrap ``factory(**hyperparams) -> GradientTransformation`` so its numeric arguments live in the state.

    The returned builder takes the factory's keyword arguments. A number (finite and >= 0, as learning rates
    and decays are) becomes a settable float64 tensor of the state; a callable is a schedule
    ``count -> value`` evaluated at every update (not settable), which must return a number or a 0-d tensor.
    The factory is called again at every update with the current values, so it must be cheap and pure.

    Args:
        factory: builds the transformation from its hyper-parameter values.
        learning_rate: ``values -> lr``: how to read the learning rate in force from the values the factory
            receives, so :attr:`GradientTransformation.learning_rate` can report it.
        elementwise: whether every transformation the factory builds is
            (:attr:`GradientTransformation.elementwise`); the factory is not called to find out.
    """

    def build(**hyperparams: float | Callable[[Tensor], Tensor]) -> GradientTransformation:
        schedules = {name: value for name, value in hyperparams.items() if callable(value)}
        numbers = {
            name: check_number(value, f"hyper-parameter {name}", alternatives=" or a schedule")
            for name, value in hyperparams.items() if not callable(value)
        }

        def values(state: InjectHyperparamsState) -> dict[str, Tensor]:
            stored = {name: read_hyperparam(t) for name, t in state.hyperparams.items()}
            scheduled = {name: check_schedule_value(s(state.count), f"hyper-parameter {name}")
                         for name, s in schedules.items()}
            return {**stored, **scheduled}

        def init(params: PyTree) -> InjectHyperparamsState:
            device = _device_of(params)
            stored = {name: store_hyperparam(v, device) for name, v in numbers.items()}
            count = torch.zeros((), dtype=torch.int64, device=device)
            inner = factory(**values(InjectHyperparamsState(count, stored, None)))
            return InjectHyperparamsState(count, stored, inner.init(params))

        def update(grads, state: InjectHyperparamsState, params=None):
            updates, inner_state = factory(**values(state)).update(grads, state.inner_state, params)
            return updates, InjectHyperparamsState(state.count + 1, state.hyperparams, inner_state)

        report = None if learning_rate is None else (lambda state: learning_rate(values(state)))
        return GradientTransformation(init, update, learning_rate=report, elementwise=elementwise)

    return build


def _is_inject_state(node: Any) -> bool:
    return isinstance(node, InjectHyperparamsState)


def find_hyperparams(opt_state: PyTree) -> dict[str, Tensor]:
    """The settable hyper-parameters anywhere in ``opt_state`` (name -> float64 0-d value)."""
    found: dict[str, Tensor] = {}
    for node in optree.tree_leaves(opt_state, is_leaf=_is_inject_state, none_is_leaf=True):
        if _is_inject_state(node):
            found.update((name, read_hyperparam(t)) for name, t in node.hyperparams.items())
    return found


def set_hyperparams(opt_state: PyTree, **values: float) -> PyTree:
    """``opt_state`` with the named settable hyper-parameters replaced (same dtype and device: no recompile).

    Raises:
        KeyError: a name that no :func:`inject_hyperparams` state holds, listing the names there are.
        TypeError, ValueError: a value that is not a finite number >= 0 (a bool, a string, a tensor, NaN).
    """
    known = find_hyperparams(opt_state)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise KeyError(f"no settable hyper-parameter(s) {unknown} in the optimizer state; it has {sorted(known)}")
    values = {name: check_number(value, name) for name, value in values.items()}

    def replace(node: Any) -> Any:
        if not _is_inject_state(node):
            return node
        hyperparams = {
            name: torch.full_like(t, values[name]) if name in values else t for name, t in node.hyperparams.items()
        }
        return node._replace(hyperparams=hyperparams)

    return optree.tree_map(replace, opt_state, is_leaf=_is_inject_state, none_is_leaf=True)
