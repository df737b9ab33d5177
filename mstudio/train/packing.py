"""The optimizer's tensors packed into one flat buffer per dtype inside a compiled step.

A VPT policy has ~100 parameter tensors and AdamW with its guard takes ~15 element-wise operations per tensor:
traced per tensor, that is ~1,500 graph nodes, which inductor fuses, generates and compiles kernel by kernel.
An :attr:`~mstudio.optim.GradientTransformation.elementwise` optimizer gives the same numbers on the
concatenation of the tensors, so the compiled step concatenates the gradients, the parameters and every
parameter-shaped part of the optimizer state into one vector per dtype and device (a tensor of
:data:`ALONE_FROM` elements or more is instead a group of its own, as it is), runs the optimizer, the update
norm and the guard once over each, and copies the results back out into tensors of the parameters' shapes.
The copies are cheap (the small tensors only) and what keeps tracing cheap: had the new tensors been views of
the buffers, AOTAutograd's functionalization would replay their view chains as it syncs each output (VPT
``tiny``'s step: 20 s of AOT tracing with views, 3 s with copies).
Measured on 2 cores: cold compile of VPT ``tiny``'s and ``small``'s steps 147 / 148 s per tensor, 105 / 105 s
packed into views (``mstudio bench``, fresh processes), 84 / 84 s packed and copied out (one fresh process each);
the steps, interleaved with the per-tensor ones in one process (``benchmarks/bench_compiled_variants.py``), tiny
15.22 vs 15.71 ms and small 179.5 vs 180.7 ms. Packing the large tensors too compiles a little faster, but
copying ``tiny``'s head three times a step made it ~1 ms slower in the bench's rounds (see :data:`ALONE_FROM`).

What differs: clipping takes one norm over each buffer instead of the norm of per-tensor norms (the same
number up to float rounding).

Only the parameters with a gradient are packed; the rest, and their moments, pass through as they are.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from mstudio.optim import GradientTransformation
from mstudio.train.skip import keep_if

__all__ = ["ALONE_FROM", "Packing", "packing_for"]


#: Tensors of at least this many elements are a group of their own, updated as they are (not copied): packing is for
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
        group: that tensor itself)."""
        return {key: tree[names[0]] if len(names) == 1 else
                torch.cat([tree[name].reshape(-1) for name in names]) for key, names in self.groups.items()}

    def unpack(self, flat: Mapping[str, Tensor], like: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``like`` (a parameter-shaped dict, in its key order) with each packed entry replaced by its part of
        ``flat``: a copy in the parameter's shape (a tensor alone in its group: ``flat``'s entry itself)."""
        out = dict(like)
        for key, names in self.groups.items():
            if len(names) == 1:
                out[names[0]] = flat[key]
                continue
            # Copies, not views of flat: see the module's docstring.
            pieces = torch.split_with_sizes_copy(flat[key], [like[name].numel() for name in names])
            for name, piece in zip(names, pieces):
                out[name] = piece.view(like[name].shape)
        return out

    def pack_state(self, tree: Any) -> Any:
        """``tree`` (an optimizer state) with every parameter-shaped dict in it packed."""
        return self._map_parts(tree, self.pack, lambda leaf: leaf, tree)

    def unpack_state(self, packed: Any, like: Any) -> Any:
        """The inverse of :meth:`pack_state`: ``packed``'s values in ``like``'s structure."""
        return self._map_parts(like, self.unpack, lambda new, _: new, packed, like)

    def keep_state_if(self, ok: Tensor, new: Any, old: Any, like: Any) -> Any:
        """:func:`~mstudio.train.skip.keep_if` over packed optimizer states ``new`` and ``old`` (``like``, the
        unpacked state, tells which parts are packed): the packed buffers are written in place (the optimizer's
        new tensors, made this step), the other leaves get a ``where``."""
        return self._map_parts(like, lambda n, o: keep_if(ok, n, o, writable=True), lambda n, o: keep_if(ok, n, o),
                               new, old)

    def _map_parts(self, like: Any, on_packed: Callable[..., Any], on_leaf: Callable[..., Any], *trees: Any) -> Any:
        """Walk ``trees`` (the structure of ``like``, the unpacked state, except where packed) together:
        ``on_packed`` of their parts where ``like`` is parameter-shaped, ``on_leaf`` of their leaves elsewhere,
        rebuilt as ``like`` is (plain recursion: traced, optree's walk costs dynamo seconds)."""
        if isinstance(like, dict) and like.keys() == self.names:
            return on_packed(*trees)
        if not isinstance(like, (dict, tuple, list)):
            return on_leaf(*trees)
        parts = zip(_children(like), *(_children(tree) for tree in trees))
        return _rebuilt(like, [self._map_parts(child, on_packed, on_leaf, *rest) for child, *rest in parts])


def _children(tree: dict | tuple | list) -> list[Any]:
    return list(tree.values()) if isinstance(tree, dict) else list(tree)


def _rebuilt(like: dict | tuple | list, children: list[Any]) -> Any:
    """``children`` in a container of ``like``'s kind (and keys)."""
    if isinstance(like, dict):
        return dict(zip(like, children))
    if isinstance(like, tuple) and hasattr(like, "_fields"):
        return type(like)(*children)
    return type(like)(children)


def packing_for(optimizer: GradientTransformation, grads: Mapping[str, Tensor | None],
                params: Mapping[str, Tensor]) -> Packing | None:
    """The packing for one step, or ``None`` when the update must run tensor by tensor: the optimizer is not
    :attr:`~mstudio.optim.GradientTransformation.elementwise`, or a parameter with a gradient is not
    contiguous (its copy out of a flat buffer would be contiguous: the next state would have other strides, and
    the compiled step would recompile)."""
    if not optimizer.elementwise:
        return None
    if not all(params[name].is_contiguous() for name, grad in grads.items() if grad is not None):
        return None
    return Packing(grads)
