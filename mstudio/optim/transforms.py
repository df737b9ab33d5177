"""Gradient transformations in the manner of optax: pairs of pure functions over pytrees of tensors.

A :class:`GradientTransformation` is ``init(params) -> state`` and
``update(grads, state, params) -> (updates, new_state)``; :func:`chain` composes them and
:func:`apply_updates` adds the result to the parameters. Nothing is modified in place: every function returns
new tensors, so a train step built from them is pure.

**Donation.** Inside ``with donated():`` the caller hands over ``grads``, ``state`` and ``params``: the blocks
of this package then overwrite them with ``torch._foreach_*_`` ops instead of allocating new tensors (one
pass and one allocation less per op), and :func:`apply_updates` writes the new parameters into ``params``.
The results are the same numbers (up to a rounding); the inputs must not be read afterwards. A transformation
may also write the new parameters itself and return ``None`` updates (``adamw`` does, with torch's fused AdamW
kernel on CPU and CUDA, so it equals ``torch.optim.AdamW(fused=True)`` bit for bit). A transformation that knows
nothing of donation stays pure, which is always correct. The eager train step uses this when called with
``donate=True``; a compiled step never does (its graph already fuses the update).

**No gradient means no update.** A ``None`` leaf in ``grads`` marks a parameter the loss does not reach (the
value head under behaviour cloning). Its update is ``None``, its moments are passed through untouched, and
:func:`apply_updates` returns the parameter itself: no weight decay, exactly as ``torch.optim.AdamW`` skips
parameters whose ``.grad`` is ``None``. Which leaves are ``None`` is fixed when a step is traced (it is
structure, not data), so this costs nothing inside a compiled step.

The arithmetic uses ``torch._foreach_*`` kernels over the flat list of gradient-carrying leaves (one kernel
launch per op per device and dtype rather than one per tensor), following the operation order of
``torch.optim.AdamW`` and ``torch.nn.utils.clip_grad_norm_``.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator, NamedTuple, Optional

import optree
import torch
from torch import Tensor

from mstudio import trees
from mstudio.optim.checks import POSITIVE, check_number

__all__ = [
    "GradientTransformation",
    "PyTree",
    "apply_updates",
    "chain",
    "clip_by_global_norm",
    "donated",
    "global_norm",
    "identity",
    "is_donated",
    "known_global_norm",
]

PyTree = Any

_DONATED = contextvars.ContextVar("mstudio_optim_donated", default=False)


@contextlib.contextmanager
def donated() -> Iterator[None]:
    """Within this block, optimizer updates may overwrite their ``grads``, ``state`` and ``params`` (see the
    module docstring): the caller owns them and never reads them again."""
    token = _DONATED.set(True)
    try:
        yield
    finally:
        _DONATED.reset(token)


def is_donated() -> bool:
    """Whether the current update runs inside :func:`donated` (may write its inputs in place); always
    ``False`` while ``torch.compile`` traces (a compiled step is pure, and dynamo cannot read a ContextVar)."""
    return not torch.compiler.is_compiling() and _DONATED.get()


class GradientTransformation(NamedTuple):
    """An optimizer or one of its building blocks.

    Attributes:
        init: ``params -> state`` (a pytree of tensors).
        update: ``(grads, state, params) -> (updates, new_state)``; ``grads`` has ``params``' structure with
            ``None`` leaves for parameters that get no gradient.
        learning_rate: ``state -> lr``, the learning rate (float64 0-d tensor) the next update applies, for
            transformations that have one, so a train step can report it without knowing the optimizer.
        elementwise: the update treats every element alike, so that run on the leaves concatenated into one
            vector (and the parameter-shaped parts of the state likewise) it gives the concatenation of its
            results: per-element arithmetic and global norms qualify, per-tensor statistics (LARS, LAMB,
            Shampoo) do not. A compiled step then updates one flat buffer per dtype instead of every tensor
            (:mod:`mstudio.train.packing`). ``False``, the default, is always correct.
    """

    init: Callable[[PyTree], PyTree]
    update: Callable[[PyTree, PyTree, PyTree], tuple[PyTree, PyTree]]
    learning_rate: Optional[Callable[[PyTree], Tensor]] = None
    elementwise: bool = False


def _flatten(tree: PyTree):
    return trees.tree_flatten(tree, none_is_leaf=True)  # traced cheaply inside a compiled step (mstudio.trees)


def _with_grad(grads: PyTree) -> tuple[list[int], list[Tensor], list, Any]:
    """Positions and values of the non-``None`` leaves of ``grads``, all leaves, and the tree structure."""
    leaves, treedef = _flatten(grads)
    present = [i for i, g in enumerate(leaves) if g is not None]
    return present, [leaves[i] for i in present], leaves, treedef


def _rebuild(treedef, fill: list, present: list[int], values: list) -> PyTree:
    """The leaves ``fill`` with ``values`` put at positions ``present``, as a tree of structure ``treedef``."""
    out = list(fill)
    for i, value in zip(present, values):
        out[i] = value
    return trees.tree_unflatten(treedef, out)


def _scalar_for(values: list[Tensor], scalar: Any) -> Any:
    """``scalar`` (e.g. a float64 0-d learning rate) cast once to ``values``' dtype when they share one of float32
    or float64, the dtype a ``torch._foreach_*`` op computes in then: the same results, but the op no longer
    converts the scalar once per tensor (a copy per parameter per op in the eager step)."""
    if isinstance(scalar, Tensor) and values:
        dtype = values[0].dtype
        if dtype in (torch.float32, torch.float64) and scalar.dtype != dtype and all(v.dtype == dtype for v in values):
            return scalar.to(dtype)
    return scalar


def _leaves_matching(tree: PyTree, treedef, what: str) -> list:
    leaves, other = _flatten(tree)
    if other != treedef:
        raise ValueError(f"{what} does not have the parameters' structure: {other} vs {treedef}")
    return leaves


_KNOWN_NORM = contextvars.ContextVar("mstudio_optim_known_norm", default=None)
#: The same while dynamo traces, which cannot set a ContextVar: a stack it mutates as a side effect (traced code
#: runs in one thread at a time, under dynamo's compile lock).
_TRACED_KNOWN_NORMS: list = []


@contextlib.contextmanager
def known_global_norm(tree: PyTree, norm: Tensor) -> Iterator[None]:
    """Within this block :func:`global_norm` of the same leaves as ``tree``'s, none written since, is ``norm``.

    The train step takes the gradients' norm for its metrics, and clipping then needs the same one: one pass over
    the gradients less (~0.4 ms a step on VPT ``tiny``'s eager step). Compiled, the norm taken twice also shaped
    the optimizer's kernel: inductor does not merge the two reductions, fused the second into the update's loop,
    and that loop could then not take the update's norm as well, which took a loop of its own reading the update
    back. Traced, "none written since" is not checked (dynamo cannot compare an unknown tensor's ``_version``):
    the same tensor objects are enough, since a :class:`GradientTransformation` does not write into its inputs."""
    leaves = [g for g in trees.tree_leaves(tree, none_is_leaf=True) if g is not None]
    if torch.compiler.is_compiling():
        # No versions: dynamo reads an unknown tensor's _version as data-dependent and cannot compare it
        _TRACED_KNOWN_NORMS.append(([(leaf, None) for leaf in leaves], norm))
        try:
            yield
        finally:
            _TRACED_KNOWN_NORMS.pop()
        return
    token = _KNOWN_NORM.set(([(leaf, leaf._version) for leaf in leaves], norm))
    try:
        yield
    finally:
        _KNOWN_NORM.reset(token)


def _known_norm(leaves: list[Tensor]) -> Tensor | None:
    """The norm :func:`known_global_norm` gave for exactly these tensors, unwritten since; else ``None``."""
    if torch.compiler.is_compiling():
        known = _TRACED_KNOWN_NORMS[-1] if _TRACED_KNOWN_NORMS else None
    else:
        known = _KNOWN_NORM.get()
    if known is None or len(known[0]) != len(leaves):
        return None
    for leaf, (was, version) in zip(leaves, known[0]):
        if leaf is not was or (version is not None and leaf._version != version):
            return None
    return known[1]


def global_norm(tree: PyTree) -> Tensor:
    """L2 norm of all non-``None`` leaves together (float32 scalar; 0 for a tree without leaves).

    The norm of the per-leaf norms, as ``torch.nn.utils.clip_grad_norm_`` computes it.
    """
    leaves = [g for g in trees.tree_leaves(tree, none_is_leaf=True) if g is not None]
    if not leaves:
        return torch.zeros(())
    known = _known_norm(leaves)
    if known is not None:
        return known
    if torch.compiler.is_compiling():
        # Inductor runs _foreach_norm as one library call per tensor (the step takes three norms: ~300 calls, over
        # 1 ms a step on VPT tiny); per-tensor norms it fuses into the kernels that produce the tensors.
        norms = [torch.linalg.vector_norm(leaf) for leaf in leaves]
    else:
        norms = torch._foreach_norm(leaves)
    return torch.linalg.vector_norm(torch.stack(norms))


def identity() -> GradientTransformation:
    """Passes gradients through unchanged."""
    return GradientTransformation(lambda params: (), lambda grads, state, params=None: (grads, state), elementwise=True)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale all gradients by ``min(max_norm / (global_norm + 1e-6), 1)``, as ``clip_grad_norm_`` does.

    Lightning's ``gradient_clip_val`` clips this way over the parameters that have gradients.

    Args:
        max_norm: the largest global norm let through, a finite number > 0.
    """
    max_norm = check_number(max_norm, "clip_by_global_norm: max_norm", POSITIVE)

    def update(grads, state, params=None):
        present, values, leaves, treedef = _with_grad(grads)
        if not values:
            return grads, state
        coef = torch.clamp(max_norm / (global_norm(values) + 1e-6), max=1.0)
        if is_donated():
            torch._foreach_mul_(values, coef)
            return grads, state
        return _rebuild(treedef, leaves, present, torch._foreach_mul(values, coef)), state

    return GradientTransformation(lambda params: (), update, elementwise=True)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` in order; the state is the tuple of their states.

    Raises:
        TypeError: one of ``transforms`` is not a :class:`GradientTransformation`.
        ValueError: more than one of them has a learning rate.
    """
    for i, transform in enumerate(transforms):
        if not isinstance(transform, GradientTransformation):
            raise TypeError(f"chain: transforms[{i}] must be a GradientTransformation (e.g. mstudio.optim.adamw(lr)), "
                            f"got {type(transform).__name__}")
    with_lr = [i for i, t in enumerate(transforms) if t.learning_rate is not None]
    if len(with_lr) > 1:
        raise ValueError("chain got more than one transformation with a learning rate; chain one optimizer")

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(grads, state, params=None):
        if len(state) != len(transforms):  # zip would silently drop the extra transforms or states
            raise ValueError(f"chain of {len(transforms)} transformations got a state of {len(state)} entries; "
                             "use the state its own init(params) made")
        new_states = []
        for transform, sub_state in zip(transforms, state):
            grads, sub_state = transform.update(grads, sub_state, params)
            new_states.append(sub_state)
        return grads, tuple(new_states)

    learning_rate = None
    if with_lr:
        index = with_lr[0]
        learning_rate = lambda state: transforms[index].learning_rate(state[index])  # noqa: E731
    return GradientTransformation(init, update, learning_rate=learning_rate,
                                  elementwise=all(t.elementwise for t in transforms))


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """``params + updates`` leaf by leaf; a ``None`` update leaves its parameter as it is (same tensor).

    Inside :func:`donated`, the sums are written into ``params``' tensors, which are returned."""
    present, u, leaves, treedef = _with_grad(updates)
    p = _leaves_matching(params, treedef, "params")
    if not u:
        return params
    if is_donated():
        torch._foreach_add_([p[i] for i in present], u)
        return params
    new = torch._foreach_add([p[i] for i in present], u)
    return _rebuild(treedef, p, present, new)


def _device_of(params: PyTree) -> torch.device:
    leaves = optree.tree_leaves(params)
    return leaves[0].device if leaves else torch.device("cpu")
