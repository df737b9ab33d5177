"""Skipping a non-finite update: the new state where the update was finite, else the old one, leaf by leaf.

Eagerly, and for whatever may alias what the step received, that is ``torch.where(ok, new, old)`` per leaf.
Inside a compiled step, for tensors the step made itself (the flat buffers of :mod:`mstudio.train.packing`),
it is instead a custom op that writes ``old`` back into them only when the update is to be skipped: on CPU the
verdict is read (there is no device to wait for), so the common case costs no pass at all, where a ``where``
reads old and new and writes every parameter and moment once more (on VPT ``small``, 196 -> 190 ms a step).
On other devices the op runs the ``where`` in place, without a host sync.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mstudio import trees
from mstudio.operators import define

__all__ = ["keep_if"]


def _restore_unless(ok: Tensor, new: list[Tensor], old: list[Tensor]) -> None:
    """``new[i] <- old[i]`` for every ``i`` unless ``ok`` (bool 0-d); same shapes and dtypes pairwise (checked
    while traced, by :func:`_restore_unless_fake`)."""
    if ok.device.type == "cpu":
        if not bool(ok):
            torch._foreach_copy_(new, old)
        return
    for n, o in zip(new, old):
        torch.where(ok, n, o, out=n)


def _restore_unless_fake(ok: Tensor, new: list[Tensor], old: list[Tensor]) -> None:
    for n, o in zip(new, old):
        if n.shape != o.shape or n.dtype != o.dtype:
            raise ValueError(f"restore_unless_: a new tensor {tuple(n.shape)} {n.dtype} and its old value "
                             f"{tuple(o.shape)} {o.dtype} differ in shape or dtype")


restore_unless_ = define("restore_unless_(Tensor ok, Tensor(a!)[] new, Tensor[] old) -> ()", _restore_unless,
                         _restore_unless_fake)


def keep_if(ok: Tensor, new: Any, old: Any, *, writable: bool = False) -> Any:
    """Leaf by leaf ``new`` where ``ok`` (a bool 0-d tensor) else ``old``; ``None`` leaves stay ``None``, and a
    leaf the update passed through unchanged (the same tensor) costs nothing.

    Args:
        ok: bool 0-d tensor, the verdict.
        new, old: trees of the same structure.
        writable: the caller's promise that ``new``'s tensors, other than those it shares with ``old``, are the
            traced function's own intermediates, never its inputs or aliases of them: traced, they are then
            overwritten in place when ``not ok`` (views and a tensor standing for two leaves still get a
            ``where``). Eagerly nothing is written in any case.

    Raises:
        ValueError: ``new`` and ``old`` differ in structure.
    """
    new_leaves, spec = trees.tree_flatten(new)
    old_leaves, old_spec = trees.tree_flatten(old)
    if old_spec != spec:
        raise ValueError(f"keep_if: the new tree's structure {spec} is not the old one's {old_spec}")
    changed = [i for i, (n, o) in enumerate(zip(new_leaves, old_leaves)) if n is not o]
    kept = list(new_leaves)
    if writable and torch.compiler.is_compiling():
        own, rest, seen = [], [], set()
        for i in changed:
            leaf = new_leaves[i]
            if isinstance(leaf, Tensor) and leaf._base is None and id(leaf) not in seen:
                own.append(i)
                seen.add(id(leaf))
            else:
                rest.append(i)
        if own:
            restore_unless_(ok, [new_leaves[i] for i in own], [old_leaves[i] for i in own])
        changed = rest
    for i in changed:
        kept[i] = torch.where(ok, new_leaves[i], old_leaves[i])
    return trees.tree_unflatten(spec, kept)
