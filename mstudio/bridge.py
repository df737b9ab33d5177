"""The torch bridge: an ``nn.Module`` as a pure function of its tensors.

``functionalize(policy)`` splits a module into ``(apply_fn, params, buffers)``, the role equinox's
``partition`` / ``filter_jit`` play for JAX models: ``params`` are what gradients flow into, ``buffers``
everything else, and ``apply_fn`` calls the module statelessly: it swaps the given tensors into the module's
parameter and buffer tables for the call and puts the module's own back after, as ``torch.func.functional_call``
does, but through a table of places built once (``functional_call`` walks the module tree on every call: ~3 ms a
step on VPT ``tiny`` eagerly, and ~2 s of dynamo's tracing of a compiled step).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import optree
from torch import Tensor, nn

__all__ = ["ApplyFn", "Params", "check_stateless_forward", "detach_tree", "functionalize"]

Params = dict[str, Tensor]
ApplyFn = Callable[[Mapping[str, Tensor], Mapping[str, Tensor], Mapping[str, Any], Any], tuple[dict, Any]]


def functionalize(module: nn.Module) -> tuple[ApplyFn, Params, Params]:
    """Split ``module`` into a pure function and its tensors.

    Args:
        module: a policy: ``forward(batch, state_in) -> (latents, state_out)``.

    Returns:
        ``apply_fn(params, buffers, batch, state_in) -> (latents, state_out)``, which runs ``module.forward``
        with the given tensors in place of its own and modifies neither the module nor its arguments;
        ``params``, the trainable parameters (``requires_grad=True``) keyed by their ``state_dict`` names;
        ``buffers``, everything else the forward reads: buffers and frozen parameters (``requires_grad=False``).
        The returned tensors are detached views of the module's own (no copy); :func:`mstudio.init_state`
        copies them.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"functionalize needs a torch.nn.Module, got {type(module).__name__}")
    params = {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}
    buffers = {name: p.detach() for name, p in module.named_parameters() if not p.requires_grad}
    buffers.update((name, b.detach()) for name, b in module.named_buffers())
    slots = _tensor_slots(module)
    names = frozenset(params) | frozenset(buffers)

    def apply_fn(params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], batch, state_in):
        tensors = {**params, **buffers}
        if tensors.keys() != names:
            raise RuntimeError(f"{type(module).__name__}: missing tensor(s) {sorted(names - tensors.keys())}, "
                               f"unexpected {sorted(tensors.keys() - names)}")
        own = [table[attr] for _, table, attr in slots]
        try:
            for name, table, attr in slots:
                table[attr] = tensors[name]
            return module(batch, state_in)
        finally:
            for (_, table, attr), tensor in zip(slots, own):
                table[attr] = tensor

    return apply_fn, params, buffers


def _tensor_slots(module: nn.Module) -> list[tuple[str, dict, str]]:
    """Where each of ``module``'s tensors lives: ``(name, table, attr)`` with ``table[attr]`` the tensor
    (``table`` a submodule's ``_parameters`` or ``_buffers``) and ``name`` its ``state_dict`` name; a tensor
    shared by several submodules (tied weights) has one slot per place under the name it is listed by.

    Writing ``table[attr]`` is what ``functional_call`` does too (no ``nn.Parameter`` wrapping, no hooks).
    """
    listed = {id(t): name for name, t in [*module.named_parameters(), *module.named_buffers()]}
    slots = []
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for table in (sub._parameters, sub._buffers):
            for attr, tensor in table.items():
                if tensor is not None:
                    slots.append((listed[id(tensor)], table, attr))
    return slots


def check_stateless_forward(module: nn.Module, tensors: Mapping[str, Tensor], run: Callable[[], Any]) -> Any:
    """Call ``run()``, which calls ``module`` with ``tensors``, and fail if it wrote to the module or to them.

    A functional policy must not keep state on itself: a compiled step would bake the first value in, and
    the eager step would leak it across calls (MineStudio's VPT stores its attention mask this way).
    Detects attributes that are set, replaced or deleted on any submodule, and in-place writes to buffers
    to ``tensors`` (e.g. BatchNorm's running statistics in training mode).

    Returns:
        whatever ``run()`` returned.
    """
    attributes = {name: dict(vars(sub)) for name, sub in module.named_modules()}
    versions = {name: t._version for name, t in tensors.items()}
    result = run()
    for name, sub in module.named_modules():
        before, after = attributes.get(name, {}), vars(sub)
        changed = sorted(k for k in set(before) | set(after) if before.get(k, _MISSING) is not after.get(k, _MISSING))
        if changed:
            where = f"{type(module).__name__}.{name}" if name else type(module).__name__
            raise RuntimeError(
                f"{where}.forward wrote attribute(s) {changed} on the module; mstudio calls policies "
                "statelessly, so forward must return all state through state_out instead"
            )
    written = sorted(name for name, t in tensors.items() if t._version != versions[name])
    if written:
        raise RuntimeError(
            f"{type(module).__name__}.forward wrote to buffer(s) {written} in place; mstudio calls policies "
            "statelessly (for BatchNorm, use eval mode or a norm without running statistics)"
        )
    return result


_MISSING = object()


def detach_tree(tree: Any) -> Any:
    """``tree`` with every tensor leaf detached from the autograd graph."""
    return optree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)
