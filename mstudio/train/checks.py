"""What the train step checks about the state it is handed, before any work, with errors that name the field.

Per call (Python only, no device sync): the state is a :class:`~mstudio.train.TrainState` whose parameters and
buffers have the policy's names, shapes and dtypes, and whose memory has one row per batch row. Once, when the
step is built: the optimizer state has the structure the optimizer makes, and every float tensor of the state
is finite (one sync). After that a state cannot turn non-finite through the step (its guard skips such
updates), so a later NaN is the guard's to catch, not a per-step sync's.
"""

from __future__ import annotations

from typing import Any, Mapping

import optree
import torch
from torch import Tensor

from mstudio.optim import GradientTransformation
from mstudio.optim.checks import describe
from mstudio.train.state import TrainState, check_memory

__all__ = ["TensorSpec", "check_finite_state", "check_is_state", "check_not_donated", "check_opt_state", "check_state",
           "check_unwritten", "mark_donated", "tensor_spec", "tensor_versions"]

#: Set on ``state.step`` (a tensor every step replaces) when the state is donated to a step.
_DONATED_MARK = "_mstudio_donated"

#: name -> (shape, dtype) of a dict of tensors (a policy's parameters or buffers).
TensorSpec = dict[str, tuple[tuple[int, ...], torch.dtype]]


def tensor_spec(tensors: Mapping[str, Tensor]) -> TensorSpec:
    """The names, shapes and dtypes of ``tensors``."""
    return {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}


def _check_tensors(tensors: Any, expected: TensorSpec, where: str) -> None:
    """``tensors`` has exactly the names of ``expected``, each a tensor of its shape and dtype."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"{where} must be a dict name -> tensor, got {describe(tensors)}")
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where} does not hold the policy's tensors: missing {missing}, unexpected {unexpected}; "
                         "make the state with init_state(policy, ...) for the policy this step trains")
    for name, (shape, dtype) in expected.items():
        tensor = tensors[name]
        if not isinstance(tensor, Tensor) or (tuple(tensor.shape), tensor.dtype) != (shape, dtype):
            raise ValueError(f"{where}[{name!r}] must be {dtype} {shape} like the policy's own, got "
                             f"{describe(tensor)}; was the state made by init_state for another policy?")


def check_is_state(state: Any) -> None:
    """Raise ``TypeError`` unless ``state`` is a :class:`TrainState`."""
    if not isinstance(state, TrainState):
        raise TypeError(f"state must be a mstudio.TrainState (from mstudio.init_state), got {type(state).__name__}")


def mark_donated(state: TrainState) -> None:
    """Mark ``state`` as handed over to a step (``step(state, batch, donate=True)``): it may not be used again.

    The mark sits on ``state.step``, a 0-d tensor of this state alone (every step returns a new one), so the
    state the donated call returns is not marked."""
    setattr(state.step, _DONATED_MARK, True)


def check_not_donated(state: TrainState) -> None:
    """Raise ``RuntimeError`` if ``state`` was donated to an earlier step (:func:`mark_donated`)."""
    if getattr(state.step, _DONATED_MARK, False):
        raise RuntimeError("this TrainState was donated to an earlier step(state, batch, donate=True) call, which "
                           "may have overwritten its tensors; use the state that call returned (or call without "
                           "donate=True to keep the old state usable)")


def check_state(state: Any, params: TensorSpec, buffers: TensorSpec) -> None:
    """Raise unless ``state`` is a :class:`TrainState` for a policy whose tensors are ``params`` and ``buffers``.

    Raises:
        TypeError: not a ``TrainState`` (a tuple, a dict).
        ValueError: a parameter or buffer missing, unexpected, or of another shape or dtype; a memory leaf
            without ``state.batch_size`` rows.
    """
    check_is_state(state)
    _check_tensors(state.params, params, "state.params")
    _check_tensors(state.buffers, buffers, "state.buffers")
    check_memory(state.memory, state.batch_size, "state.memory")
    check_memory(state.init_memory, state.batch_size, "state.init_memory")


def _spec_tree(tree: Any) -> Any:
    return optree.tree_map(lambda t: (tuple(t.shape), t.dtype) if isinstance(t, Tensor) else type(t), tree,
                           none_is_leaf=True)


def check_opt_state(state: TrainState, optimizer: GradientTransformation) -> None:
    """Raise ``ValueError`` unless ``state.opt_state`` has the structure, shapes and dtypes ``optimizer.init``
    gives (computed on the meta device: no memory)."""
    meta = {name: torch.empty_like(p, device="meta") for name, p in state.params.items()}
    expected = _spec_tree(optimizer.init(meta))
    found = _spec_tree(state.opt_state)
    if expected != found:
        raise ValueError(
            f"state.opt_state does not match the optimizer given to make_train_step: its init(params) gives "
            f"{type(expected).__name__} with {len(optree.tree_leaves(expected))} leaves, the state holds "
            f"{type(found).__name__} with {len(optree.tree_leaves(found))}; make the state with "
            "init_state(policy, optimizer, ...) using the step's optimizer"
        )


def _named_leaves(state: TrainState) -> list[tuple[str, Tensor]]:
    """``(name, tensor)`` for every floating tensor of ``state``, named as ``state.opt_state[1]['lr']``."""
    leaves = []
    for field in ("params", "buffers", "opt_state", "memory", "init_memory", "hyperparams", "ema"):
        paths, values, _ = optree.tree_flatten_with_path(getattr(state, field))
        leaves += [(f"state.{field}" + "".join(f"[{key!r}]" for key in path), value)
                   for path, value in zip(paths, values) if isinstance(value, Tensor) and value.is_floating_point()]
    return leaves


def check_finite_state(state: TrainState) -> None:
    """Raise ``ValueError`` naming the first float tensor of ``state`` that holds NaN or inf (one device sync)."""
    leaves = _named_leaves(state)
    if not leaves:
        return
    device = leaves[0][1].device
    counts = torch.stack([(~torch.isfinite(t)).sum().to(device) for _, t in leaves]).tolist()
    for (name, _), count in zip(leaves, counts):
        if count:
            raise ValueError(f"{name} must be finite, got {count} NaN or inf value(s); a step would spread them "
                             "(load a checkpoint from before the values went bad, or make a fresh state)")


def tensor_versions(tree: Any, root: str) -> dict[str, tuple[Tensor, int]]:
    """name -> (tensor, its version counter) for every tensor of ``tree`` (nested dicts), named from ``root``."""
    paths, values, _ = optree.tree_flatten_with_path(tree)
    return {root + "".join(f"[{key!r}]" for key in path): (value, value._version)
            for path, value in zip(paths, values) if isinstance(value, Tensor)}


def check_unwritten(versions: dict[str, tuple[Tensor, int]], who: str) -> None:
    """Raise ``RuntimeError`` if ``who`` wrote in place to a tensor recorded by :func:`tensor_versions`."""
    written = [name for name, (tensor, version) in versions.items() if tensor._version != version]
    if written:
        raise RuntimeError(f"{who} wrote to {', '.join(written)} in place; the step never modifies its inputs, so "
                           "compute on new tensors instead (e.g. mask * 0, not mask.mul_(0))")
