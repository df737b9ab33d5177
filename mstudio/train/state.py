"""The train state: everything a step reads and returns, as one immutable pytree of tensors."""

from __future__ import annotations

import operator
from typing import Any, Callable, Mapping, NamedTuple

import optree
import torch
from torch import Tensor, nn

import losses
from losses.api import HYPERPARAMS_KEY, STEP_KEY
from mstudio.bridge import functionalize
from mstudio.optim import GradientTransformation, find_hyperparams, read_hyperparam, store_hyperparam
from mstudio.optim.checks import FINITE, check_number, describe
from mstudio.optim import set_hyperparams as set_optimizer_hyperparams
from mstudio.policy import check_policy

__all__ = ["TrainState", "check_memory", "init_state", "objective_batch", "set_hyperparams"]


class TrainState(NamedTuple):
    """What a train step carries from one batch to the next (an optree pytree; never modified in place).

    Attributes:
        params: trainable parameters, ``state_dict`` name -> tensor.
        buffers: buffers and frozen parameters, name -> tensor (never updated by the step).
        opt_state: the optimizer's state (for :func:`mstudio.optim.adamw`, an ``InjectHyperparamsState``
            holding ``learning_rate`` and ``weight_decay`` and the states of its blocks).
        memory: the recurrent memory carried into the next batch, batch on dim 0 of every leaf.
        init_memory: ``policy.initial_state(B)``, what rows restart from at an episode boundary.
        last_timestamp: long ``(B,)``, each row's last timestamp so far (zeros at the start).
        step: long 0-d, the number of batches the step has processed (updates applied plus skipped).
        hyperparams: the objective's hyper-parameters (:class:`losses.Hyperparam`), name -> float64 ``(1,)``
            (:func:`mstudio.optim.store_hyperparam`; objectives receive them 0-d).
        ema: an exponential moving average of ``params`` (same structure), or ``None`` when not kept.
        skipped_updates: long 0-d, how many updates the non-finite guard skipped so far.
    """

    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    opt_state: Any
    memory: Any
    init_memory: Any
    last_timestamp: Tensor
    step: Tensor
    hyperparams: dict[str, Tensor]
    ema: dict[str, Tensor] | None
    skipped_updates: Tensor

    @property
    def batch_size(self) -> int:
        return self.last_timestamp.shape[0]


def check_memory(memory: Any, batch_size: int, what: str) -> None:
    """Raise ``ValueError`` unless every leaf of ``memory`` is a tensor with ``batch_size`` rows on dim 0."""
    for path, leaf in zip(*optree.tree_flatten_with_path(memory)[:2]):
        if not isinstance(leaf, Tensor) or leaf.dim() == 0 or leaf.shape[0] != batch_size:
            shape = tuple(leaf.shape) if isinstance(leaf, Tensor) else type(leaf).__name__
            raise ValueError(
                f"{what} leaf at {path} must be a tensor with the batch ({batch_size}) on dim 0, got {shape}; "
                "the memory carry resets rows along dim 0"
            )


def init_state(
    policy: nn.Module,
    optimizer: GradientTransformation,
    batch_size: int,
    *,
    objective: Callable | None = None,
    ema: bool = False,
) -> TrainState:
    """A fresh :class:`TrainState` for training ``policy`` with ``optimizer`` on batches of ``batch_size`` rows.

    Copies the policy's tensors, so training never changes the module (load the result back with
    ``policy.load_state_dict({**state.params, **state.buffers})``).

    Args:
        policy: the policy module.
        optimizer: e.g. :func:`mstudio.optim.adamw`.
        batch_size: rows per batch (the memory has one row per batch row): an int or any integral such as
            ``np.int64`` (``operator.index``), never a bool.
        objective: the objective to train; the state then holds the defaults of the hyper-parameters it reads
            (:func:`losses.hyperparams_of`). Needed only for objectives weighted by a :class:`losses.Hyperparam`.
        ema: keep an exponential moving average of the parameters (``make_train_step(..., ema_decay=...)``).
    """
    check_policy(policy)
    if not isinstance(optimizer, GradientTransformation):
        raise TypeError(f"optimizer must be a mstudio.optim.GradientTransformation (e.g. mstudio.optim.adamw(lr)), "
                        f"got {type(optimizer).__name__}")
    if objective is not None and not callable(objective):
        raise TypeError(f"objective must be callable (batch, latents, params) -> dict, got {describe(objective)}")
    if isinstance(batch_size, bool) or (isinstance(batch_size, Tensor) and batch_size.dtype == torch.bool):
        raise ValueError(f"batch_size must be a positive int (rows per batch), got the bool {batch_size!r}")
    try:
        batch_size = operator.index(batch_size)  # int, np.int64, 0-d integer tensors
    except TypeError:
        raise ValueError(f"batch_size must be a positive int, got {type(batch_size).__name__} {batch_size!r}") from None
    if batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    _, params, buffers = functionalize(policy)
    params = {name: p.clone() for name, p in params.items()}
    buffers = {name: b.clone() for name, b in buffers.items()}
    init_memory = policy.initial_state(batch_size)
    check_memory(init_memory, batch_size, f"{type(policy).__name__}.initial_state({batch_size})")
    device = next(iter(params.values())).device if params else torch.device("cpu")
    defaults = losses.hyperparams_of(objective) if objective is not None else {}
    defaults = {name: check_number(v, f"hyper-parameter {name} (default)", FINITE) for name, v in defaults.items()}
    counter = lambda: torch.zeros((), dtype=torch.int64, device=device)  # noqa: E731
    return TrainState(
        params=params,
        buffers=buffers,
        opt_state=optimizer.init(params),
        memory=optree.tree_map(torch.clone, init_memory),
        init_memory=init_memory,
        last_timestamp=torch.zeros(batch_size, dtype=torch.int64, device=device),
        step=counter(),
        hyperparams={name: store_hyperparam(v, device) for name, v in defaults.items()},
        ema={name: p.clone() for name, p in params.items()} if ema else None,
        skipped_updates=counter(),
    )


def set_hyperparams(state: TrainState, **values: float) -> TrainState:
    """``state`` with new values for named hyper-parameters: the objective's (``state.hyperparams``) or the
    optimizer's (``learning_rate``, ``weight_decay`` of :func:`mstudio.optim.adamw`).

    The new values are tensors of the same dtype and device, so a compiled step runs on without recompiling.

    Raises:
        TypeError: ``state`` is not a :class:`TrainState`, or a value is not a number (a string, a bool, a tensor).
        KeyError: an unknown name, listing the names the state has.
        ValueError: a value that is not finite, or a negative optimizer hyper-parameter (objective weights may be
            negative, see :func:`losses.weighted`).
    """
    if not isinstance(state, TrainState):
        raise TypeError(f"set_hyperparams needs a TrainState (from mstudio.init_state), got {type(state).__name__}; "
                        "for an optimizer state alone use mstudio.optim.set_hyperparams")
    objective_values = {name: check_number(v, name, FINITE) for name, v in values.items() if name in state.hyperparams}
    optimizer_values = {name: v for name, v in values.items() if name not in state.hyperparams}
    unknown = sorted(set(optimizer_values) - set(find_hyperparams(state.opt_state)))
    if unknown:
        known = sorted([*state.hyperparams, *find_hyperparams(state.opt_state)])
        raise KeyError(f"no hyper-parameter(s) {unknown} in the train state; it has {known}")
    hyperparams = {
        name: torch.full_like(t, objective_values[name]) if name in objective_values else t
        for name, t in state.hyperparams.items()
    }
    opt_state = set_optimizer_hyperparams(state.opt_state, **optimizer_values) if optimizer_values else state.opt_state
    return state._replace(hyperparams=hyperparams, opt_state=opt_state)


def objective_batch(batch: Mapping[str, Any], state: TrainState) -> dict[str, Any]:
    """What objectives receive as their batch: ``batch`` plus the step counter and the hyper-parameters (0-d),
    under the keys :mod:`losses.api` reserves for them."""
    hyperparams = {name: read_hyperparam(t) for name, t in state.hyperparams.items()}
    return {**batch, STEP_KEY: state.step, HYPERPARAMS_KEY: hyperparams}
