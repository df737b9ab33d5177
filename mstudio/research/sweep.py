"""Sweeps in one step: K variants of a run (loss weights, learning rates) trained side by side in one call.

The pure step makes this possible: the K train states are stacked on a new leading dim, the forward, objective
and gradients run once under ``torch.func.vmap`` over them (one batched forward and backward for all K), and the
optimizer update runs per variant (its ``torch._foreach_*`` kernels have no vmap rule; the update is a small
part of the step). Each variant's hyper-parameters live in its own state (``Hyperparam`` weights, the
optimizer's learning rate), so the K variants share one graph::

    sweep = SweepStep(policy, losses.combine(losses.behavior_clone,
                                             losses.weighted(losses.entropy_bonus, losses.Hyperparam("ent", 0.0))),
                      adamw(1e-3))
    states = sweep.init(batch_size, [{"ent": 0.0}, {"ent": 1e-3}, {"ent": 1e-2, "learning_rate": 3e-4}])
    for batch in loader:
        states, metrics = sweep(states, batch)        # metrics["loss"]: (K,)
    variant_1 = unstack_state(states, 1)              # an ordinary TrainState

Variant ``k`` follows exactly the run ``make_train_step`` gives from ``unstack_state(states, k)`` on the same
batches (the same per-variant arithmetic, batched).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import optree
import torch
from torch import Tensor, nn

from losses.api import Objective
from mstudio.compile import compiled_call
from mstudio.optim import GradientTransformation
from mstudio.train.state import TrainState, init_state, set_hyperparams
from mstudio.train.step import (
    TrainStep,
    reached_parameters,
    train_step_parts,
    value_and_grad_func,
)

__all__ = ["SweepStep", "stack_states", "unstack_state"]


def stack_states(states: Sequence[TrainState]) -> TrainState:
    """One state whose every tensor is the ``K`` states' tensors stacked on a new dim 0 (same structure needed)."""
    if not states:
        raise ValueError("stack_states needs at least one state")
    specs = [optree.tree_structure(s, none_is_leaf=False) for s in states]
    if any(spec != specs[0] for spec in specs):
        raise ValueError("stack_states needs states of one structure (same policy, optimizer and objective)")
    return _stack(states)


def _stack(trees: Sequence[Any]) -> Any:
    """The trees' tensors stacked on a new dim 0 (no structure check: what the compiled sweep calls)."""
    return optree.tree_map(lambda *leaves: torch.stack(leaves), *trees)


def unstack_state(states: TrainState, k: int) -> TrainState:
    """Variant ``k`` of stacked ``states``, an ordinary :class:`~mstudio.TrainState`."""
    count = states.step.shape[0]
    if not -count <= k < count:
        raise IndexError(f"variant {k} out of range for a sweep of {count}")
    return optree.tree_map(lambda t: t[k], states)


class SweepStep(TrainStep):
    """``sweep(states, batch) -> (states, metrics)`` over ``K`` stacked train states; see the module docstring.

    Built like :func:`mstudio.make_train_step` (same keyword arguments, same checks on every batch); ``metrics``
    hold the same entries as the step's, each with a leading ``K`` dim.
    """

    def __init__(self, policy: nn.Module, objective: Objective, optimizer: GradientTransformation, *,
                 compile: bool = True, validate: bool = True, skip_nonfinite: bool = True):
        super().__init__(policy, objective, optimizer, compile=compile, validate=validate, autocast_dtype=None,
                         ema_decay=None, skip_nonfinite=skip_nonfinite)

    def init(self, batch_size: int, variants: Sequence[Mapping[str, float]]) -> TrainState:
        """``K = len(variants)`` fresh states of the policy stacked, variant ``k`` with the hyper-parameter values
        ``variants[k]`` (names as for :func:`mstudio.set_hyperparams`: the objective's, ``learning_rate``, ...)."""
        if not variants:
            raise ValueError("a sweep needs at least one variant")
        base = init_state(self.policy, self.optimizer, batch_size, objective=self.objective)
        return stack_states([set_hyperparams(base, **dict(values)) for values in variants])

    def __call__(self, states: TrainState, batch: Mapping[str, Any]) -> tuple[TrainState, dict[str, Tensor]]:
        batch = self._prepare(unstack_state(states, 0), batch, states.last_timestamp.shape[-1])
        return self._step_fn(states, batch)

    def _build(self, state: TrainState, batch: Mapping[str, Any]) -> None:
        self.reached = reached_parameters(self.policy, self.objective, state, batch)
        self._batch_keys = frozenset(batch)
        # torch.func's gradient in both modes: autograd.grad cannot run under vmap.
        gradients, update = train_step_parts(self.apply_fn, self.objective, self.optimizer, self.reached,
                                             value_and_grad_func, **self._options)

        def sweep_step(states: TrainState, batch: Mapping[str, Any]) -> tuple[TrainState, dict[str, Tensor]]:
            # vmap over every tensor of the states; absent parts (no EMA, ...) are None, not batched
            dims = torch.utils._pytree.tree_map(lambda t: 0 if isinstance(t, Tensor) else None, states)
            computed = torch.func.vmap(gradients, in_dims=(dims, None))(states, batch)
            results = [update(unstack_state(states, k), batch, optree.tree_map(lambda t, k=k: t[k], computed))
                       for k in range(states.step.shape[0])]
            return _stack([state for state, _ in results]), _stack([metrics for _, metrics in results])

        self._step_fn = (compiled_call(torch.compile(sweep_step, fullgraph=True)) if self.compile
                         else sweep_step)
