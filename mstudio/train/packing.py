"""The optimizer's tensors packed into one flat buffer per dtype inside a compiled step.

A VPT policy has ~100 parameter tensors and AdamW with its guard takes ~15 element-wise operations per tensor:
traced per tensor, that is ~1,500 graph nodes, which inductor fuses, generates and compiles kernel by kernel.
An :attr:`~mstudio.optim.GradientTransformation.elementwise` optimizer gives the same numbers on the
concatenation of the tensors, so the compiled step concatenates the gradients, the parameters and every
parameter-shaped part of the optimizer state into one vector per dtype and device (a tensor of
:data:`ALONE_FROM` elements or more is instead a 1-d view of its own), runs the optimizer, the update norm and
the guard once over each, and cuts the results back into views of the parameters' shapes.
Measured on 2 cores: cold compile of VPT ``tiny``'s and ``small``'s steps 147 / 148 s -> 105 / 105 s (``mstudio
bench``, fresh processes); the steps, interleaved with the per-tensor ones in one process
(``benchmarks/bench_packing.py``), tiny 15.18 vs 15.78 ms and small 189.5 vs 191.5 ms. Packing the large tensors
too compiles a little faster, but copying ``tiny``'s head three times a step made it ~1 ms slower in the
bench's rounds (see :data:`ALONE_FROM`).

What differs: clipping takes one norm over each buffer instead of the norm of per-tensor norms (the same
number up to float rounding), and the new state's small parameters and moments are views into one buffer per
dtype, so keeping one of them from an old state keeps its whole buffer alive.

Only the parameters with a gradient are packed; the rest, and their moments, pass through as they are.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from mstudio.optim import GradientTransformation
from mstudio.train.skip import keep_if

__all__ = ["ALONE_FROM", "Packing", "packing_for"]


#: Tensors of at least this many elements keep a buffer of their own (a view of them, not a copy): packing is for
#: the many small tensors whose per-tensor kernels cost more than their arithmetic; copying a large one into a
#: shared buffer costs a pass over it (VPT ``tiny``: its 8641-way head is 56 % of the parameters).
ALONE_FROM = 1 << 16


class Packing:
    """Where every packed parameter sits: ``groups`` maps a buffer's key to the names in it, in the parameters'
    order (``"float32@cpu"``: the tensors of that dtype and device under :data:`ALONE_FROM` elements; a large
    tensor's own name: that tensor alone); ``names`` is every parameter's name (the dicts of that key set are
    parameter-shaped)."""

    def __init__(self, grads: Mapping[str, Tensor | None]):
        groups: dict[str, list[str]] = {}
        for name, grad in grads.items():
            if grad is None:
                continue
            key = name if grad.numel() >= ALONE_FROM else f"{str(grad.dtype).removeprefix('torch.')}@{grad.device}"
            groups.setdefault(key, []).append(name)
        self.groups = groups
        self.names = frozenset(grads)

    def pack(self, tree: Mapping[str, Tensor | None]) -> dict[str, Tensor]:
        """``{key: the group's tensors as one 1-d tensor}`` of a parameter-shaped dict (a tensor alone in its
        group: a 1-d view of it)."""
        return {key: tree[names[0]].reshape(-1) if len(names) == 1 else
                torch.cat([tree[name].reshape(-1) for name in names]) for key, names in self.groups.items()}

    def unpack(self, flat: Mapping[str, Tensor], like: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``like`` (a parameter-shaped dict, in its key order) with each packed entry replaced by the view of
        ``flat`` that holds it."""
        out = dict(like)
        for key, names in self.groups.items():
            pieces = torch.split(flat[key], [like[name].numel() for name in names])
            for name, piece in zip(names, pieces):
                out[name] = piece.view(like[name].shape)
        return out

    def pack_state(self, tree: Any) -> Any:
        """``tree`` (an optimizer state) with every parameter-shaped dict in it packed."""
        if self._is_parameter_shaped(tree):
            return self.pack(tree)
        return _rebuilt(tree, [self.pack_state(child) for child in _children(tree)])

    def unpack_state(self, packed: Any, like: Any) -> Any:
        """The inverse of :meth:`pack_state`: ``packed``'s values in ``like``'s structure."""
        if self._is_parameter_shaped(like):
            return self.unpack(packed, like)
        if not isinstance(like, (dict, tuple, list)):
            return packed  # a leaf: the new value
        return _rebuilt(like, [self.unpack_state(p, child) for p, child in zip(_children(packed), _children(like))])

    def keep_state_if(self, ok: Tensor, new: Any, old: Any, like: Any) -> Any:
        """:func:`~mstudio.train.skip.keep_if` over packed optimizer states ``new`` and ``old`` (``like``, the
        unpacked state, tells which parts are packed): the packed buffers are written in place (they are
        concatenations this step made, or made from them), the other leaves get a ``where``."""
        if self._is_parameter_shaped(like):
            return keep_if(ok, new, old, writable=True)
        if not isinstance(like, (dict, tuple, list)):
            return keep_if(ok, new, old)
        return _rebuilt(like, [self.keep_state_if(ok, n, o, child)
                               for n, o, child in zip(_children(new), _children(old), _children(like))])

    def _is_parameter_shaped(self, tree: Any) -> bool:
        return isinstance(tree, dict) and tree.keys() == self.names


def _children(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return list(tree.values())
    if isinstance(tree, (tuple, list)):
        return list(tree)
    return []


def _rebuilt(tree: Any, children: list[Any]) -> Any:
    if isinstance(tree, dict):
        return dict(zip(tree, children))
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*children)
    if isinstance(tree, (tuple, list)):
        return type(tree)(children)
    return tree


def packing_for(optimizer: GradientTransformation, grads: Mapping[str, Tensor | None],
                params: Mapping[str, Tensor]) -> Packing | None:
    """The packing for one step, or ``None`` when the update must run tensor by tensor: the optimizer is not
    :attr:`~mstudio.optim.GradientTransformation.elementwise`, or a parameter with a gradient is not
    contiguous (its view in a flat buffer would have other strides, and the compiled step would recompile)."""
    if not optimizer.elementwise:
        return None
    if not all(params[name].is_contiguous() for name, grad in grads.items() if grad is not None):
        return None
    return Packing(grads)
