"""Pytree flatten, unflatten and map for code the compiled train step traces.

Eagerly these are optree's own functions. While ``torch.compile`` traces, optree's C++ is out of reach and dynamo
runs a Python stand-in for it that costs about 1.4 s of tracing per flatten of a 97-tensor dict: 24 of the 26 s
dynamo took to trace VPT ``tiny``'s step went there. So under tracing the containers a train state is made of
(``dict``, ``list``, ``tuple``, ``NamedTuple``, ``None``) around tensors are walked here in plain Python, which
dynamo traces as constants; a tree holding anything else (an ``OrderedDict``, a custom optree node) goes to
optree.

Both paths put the leaves in optree's order (dict entries by sorted key, the rest in position order) and rebuild
dicts in their own key order, so a structure never changes from one step to the next (it would recompile).
Specs are opaque: compare them with ``==`` and hand them back to :func:`tree_unflatten`, never mix the paths'.
"""

from __future__ import annotations

from typing import Any, Callable

import optree
import torch

__all__ = ["tree_flatten", "tree_leaves", "tree_map", "tree_unflatten"]


def tree_flatten(tree: Any, *, none_is_leaf: bool = False) -> tuple[list[Any], Any]:
    """``(leaves, spec)`` as ``optree.tree_flatten(tree, none_is_leaf=...)`` returns them (see the module)."""
    if torch.compiler.is_compiling():
        leaves: list[Any] = []
        node = _flatten_into(tree, leaves, none_is_leaf)
        if node is not None:
            return leaves, _Spec(node)
    return optree.tree_flatten(tree, none_is_leaf=none_is_leaf)


def tree_unflatten(spec: Any, leaves: list[Any]) -> Any:
    """The tree of structure ``spec`` (from :func:`tree_flatten`) holding ``leaves``."""
    if not isinstance(spec, _Spec):
        return optree.tree_unflatten(spec, leaves)
    rest = iter(leaves)
    return _build(spec.node, rest)


def tree_leaves(tree: Any, *, none_is_leaf: bool = False) -> list[Any]:
    """The leaves of ``tree`` in :func:`tree_flatten`'s order."""
    return tree_flatten(tree, none_is_leaf=none_is_leaf)[0]


def tree_map(fn: Callable[..., Any], tree: Any, *rests: Any, none_is_leaf: bool = False) -> Any:
    """``fn`` applied leaf by leaf across ``tree`` and ``rests`` (same structure), as ``optree.tree_map``.

    Raises:
        ValueError: a tree of ``rests`` has another structure than ``tree``.
    """
    leaves, spec = tree_flatten(tree, none_is_leaf=none_is_leaf)
    others = []
    for rest in rests:
        rest_leaves, rest_spec = tree_flatten(rest, none_is_leaf=none_is_leaf)
        if rest_spec != spec:
            raise ValueError(f"tree_map: trees of different structures: {rest_spec} vs {spec}")
        others.append(rest_leaves)
    return tree_unflatten(spec, [fn(*args) for args in zip(leaves, *others)])


class _Spec:
    """The structure of a tree walked in Python: nested tuples of constants (see :func:`_flatten_into`)."""

    __slots__ = ("node",)

    def __init__(self, node: tuple) -> None:
        self.node = node

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Spec) and self.node == other.node

    def __hash__(self) -> int:
        return hash(self.node)

    def __repr__(self) -> str:
        return f"_Spec({self.node!r})"


_LEAF = ("leaf",)
_NONE = ("none",)


def _is_namedtuple(node: Any) -> bool:
    return isinstance(node, tuple) and hasattr(type(node), "_fields")


def _flatten_into(node: Any, leaves: list[Any], none_is_leaf: bool) -> tuple | None:
    """Append ``node``'s leaves to ``leaves`` and return its structure; ``None`` when ``node`` holds anything but
    ``dict``, ``list``, ``tuple`` and ``NamedTuple`` (exact types) and ``None`` around tensors and Python scalars
    (an ``OrderedDict``, a structseq, an object a custom optree node might be): the caller then asks optree.
    (Plain loops: dynamo traces ``all()`` over a generator far more slowly.)"""
    if node is None and not none_is_leaf:
        return _NONE
    kind = type(node)
    if kind is dict:
        order = tuple(node)
        keys = tuple(sorted(order))
        children = _flatten_children([node[key] for key in keys], leaves, none_is_leaf)
        return None if children is None else ("dict", keys, order, children)
    if kind is list or kind is tuple or _is_namedtuple(node):
        children = _flatten_children(node, leaves, none_is_leaf)
        return None if children is None else ("seq", kind, children)
    if node is None or isinstance(node, (torch.Tensor, bool, int, float, complex, str)):
        leaves.append(node)
        return _LEAF
    return None


def _flatten_children(values: Any, leaves: list[Any], none_is_leaf: bool) -> tuple | None:
    """The structures of a container's ``values`` (:func:`_flatten_into` of each), or ``None`` as it gives."""
    children = []
    for value in values:
        if isinstance(value, torch.Tensor):  # the common case, without a call (each costs dynamo ~1 ms)
            leaves.append(value)
            children.append(_LEAF)
            continue
        child = _flatten_into(value, leaves, none_is_leaf)
        if child is None:
            return None
        children.append(child)
    return tuple(children)


def _build(node: tuple, leaves: Any) -> Any:
    if node == _LEAF:
        return next(leaves)
    if node == _NONE:
        return None
    if node[0] == "dict":
        _, keys, order, children = node
        values = {key: next(leaves) if child == _LEAF else _build(child, leaves) for key, child in zip(keys, children)}
        return {key: values[key] for key in order}
    _, kind, children = node
    values = [next(leaves) if child == _LEAF else _build(child, leaves) for child in children]
    if kind is list:
        return values
    if kind is tuple:
        return tuple(values)
    return kind(*values)
