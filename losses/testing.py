"""A test kit for objectives: :func:`check_objective` says precisely how an objective breaks the contract.

Needs only torch (``losses`` alone, no trainer). An objective must (see :mod:`losses.api`) return a dict with a
float 0-d ``"loss"``, be finite with finite gradients on good inputs, leave its inputs untouched, give the same
values when called twice, and work under ``torch.func.vmap`` and ``torch.compile(fullgraph=True)``, since the
train step runs it inside both::

    from losses.testing import check_objective
    check_objective(my_objective, batch, latents, params)   # raises ObjectiveCheckError on the first failure
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import optree
import torch
from torch import Tensor

from losses.api import Objective, objective_name

__all__ = ["ObjectiveCheckError", "check_objective"]


class ObjectiveCheckError(AssertionError):
    """An objective broke its contract; the message names the objective, the check and what was found."""


def _paths(tree: Any) -> list[tuple[str, Any]]:
    """``(path, leaf)`` for every leaf of ``tree``, the path written as ``['a']['b']``."""
    paths, leaves, _ = optree.tree_flatten_with_path(tree, none_is_leaf=True)
    return [("".join(f"[{key!r}]" for key in path), leaf) for path, leaf in zip(paths, leaves)]


def _snapshot(tree: Any) -> list[tuple[str, Tensor, int]]:
    """Every tensor leaf with a copy of its value and its in-place version counter."""
    return [(path, leaf.detach().clone(), leaf._version) for path, leaf in _paths(tree) if isinstance(leaf, Tensor)]


def _same(a: Tensor, b: Tensor) -> bool:
    """Bitwise the same values (NaN equals NaN), shape and dtype."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
                                                               and torch.equal(a.isnan(), b.isnan()))


def _check_untouched(name: str, label: str, tree: Any, before: list[tuple[str, Tensor, int]]) -> None:
    tensors = [(path, leaf) for path, leaf in _paths(tree) if isinstance(leaf, Tensor)]
    for (path, leaf), (_, value, version) in zip(tensors, before):
        if leaf._version != version or not _same(leaf.detach(), value):
            raise ObjectiveCheckError(f"objective {name} mutated {label}{path} in place; objectives must be pure "
                                      "(build new tensors instead of writing into their inputs)")


def _loss(out: Any, name: str, how: str) -> Tensor:
    """The ``"loss"`` of one call's output, after the checks of its form."""
    if not isinstance(out, Mapping):
        raise ObjectiveCheckError(f"objective {name} must return a dict with a 'loss' entry; {how}it returned a "
                                  f"{type(out).__name__}")
    if "loss" not in out:
        raise ObjectiveCheckError(f"objective {name} must return a dict with a 'loss' entry; {how}it returned "
                                  f"keys {sorted(map(str, out))}")
    loss = out["loss"]
    if not isinstance(loss, Tensor):
        raise ObjectiveCheckError(f"objective {name}: 'loss' must be a tensor; {how}it is a {type(loss).__name__}")
    if loss.dim() != 0:
        raise ObjectiveCheckError(f"objective {name}: 'loss' must be a 0-d (scalar) tensor; {how}it has shape "
                                  f"{tuple(loss.shape)} (reduce it, e.g. with .mean())")
    if not loss.is_floating_point():
        raise ObjectiveCheckError(f"objective {name}: 'loss' must be a float tensor; {how}it is {loss.dtype}")
    return loss


def _check_finite(name: str, out: Mapping[str, Any]) -> None:
    for key, value in out.items():
        if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ObjectiveCheckError(f"objective {name}: {key!r} is not finite ({value.detach().flatten()[:4].tolist()}) "
                                      "on these inputs")


def _check_gradients(objective: Objective, name: str, batch: Any, latents: Any, params: Any) -> None:
    """Finite gradients of the loss with respect to every float tensor of ``latents`` and ``params``."""
    def leaf(t: Any) -> Any:
        return t.detach().requires_grad_() if isinstance(t, Tensor) and t.is_floating_point() else t

    latents, params = optree.tree_map(leaf, latents, none_is_leaf=True), optree.tree_map(leaf, params)
    inputs = [(f"latents{p}", t) for p, t in _paths(latents)] + [(f"params{p}", t) for p, t in _paths(params)]
    inputs = [(path, t) for path, t in inputs if isinstance(t, Tensor) and t.requires_grad]
    with torch.enable_grad():
        loss = _loss(objective(batch, latents, params), name, "with gradients on, ")
    if not loss.requires_grad:
        raise ObjectiveCheckError(f"objective {name}: the loss depends on no float tensor of latents or params, "
                                  "so training it changes nothing")
    grads = torch.autograd.grad(loss, [t for _, t in inputs], allow_unused=True)
    for (path, _), grad in zip(inputs, grads):
        if grad is not None and not bool(torch.isfinite(grad).all()):
            raise ObjectiveCheckError(f"objective {name}: the gradient with respect to {path} is not finite")


def _check_pure(name: str, first: Mapping[str, Any], second: Mapping[str, Any]) -> None:
    if sorted(map(str, first)) != sorted(map(str, second)):
        raise ObjectiveCheckError(f"objective {name} is not pure: a second call returned keys {sorted(second)}, "
                                  f"the first {sorted(first)}")
    for key, value in first.items():
        other = second[key]
        if isinstance(value, Tensor) and not (isinstance(other, Tensor) and _same(value.detach(), other.detach())):
            raise ObjectiveCheckError(f"objective {name} is not pure: {key!r} was {value.detach().flatten()[:4].tolist()} "
                                      f"on the first call and {torch.as_tensor(other).flatten()[:4].tolist()} on a "
                                      "second call with the same inputs (state kept between calls, or randomness)")


def _stack_two(tree: Any) -> tuple[Any, Any]:
    """``tree`` with every tensor stacked twice on a new dim 0, and the matching ``in_dims`` (``None`` elsewhere)."""
    stacked = optree.tree_map(lambda t: torch.stack([t, t]) if isinstance(t, Tensor) else t, tree, none_is_leaf=True)
    dims = optree.tree_map(lambda t: 0 if isinstance(t, Tensor) else None, tree, none_is_leaf=True)
    return stacked, dims


def _check_vmap(objective: Objective, name: str, batch: Any, latents: Any, params: Any, loss: Tensor) -> None:
    """``vmap`` over two stacked copies of ``batch`` and ``latents`` gives the unbatched loss twice."""
    (batch2, batch_dims), (latents2, latent_dims) = _stack_two(batch), _stack_two(latents)
    try:
        losses = torch.func.vmap(lambda b, z: objective(b, z, params)["loss"], in_dims=(batch_dims, latent_dims))(
            batch2, latents2)
    except Exception as error:  # any failure inside vmap is the finding, reported with its own message
        raise ObjectiveCheckError(f"objective {name} fails under torch.func.vmap (the sweep and per-sample tools "
                                  f"vmap it): {type(error).__name__}: {error}") from error
    expected = loss.detach().expand(2)
    if not torch.allclose(losses.detach(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()) + 1e-12):
        raise ObjectiveCheckError(f"objective {name} gives {losses.tolist()} under torch.func.vmap over two copies of "
                                  f"its inputs, but {loss.item()} unbatched (it must not mix rows of a vmapped dim)")


def _check_compiles(objective: Objective, name: str, batch: Any, latents: Any, params: Any, loss: Tensor) -> None:
    """``torch.compile(fullgraph=True)`` traces it without a graph break and agrees with eager."""
    torch._dynamo.reset()
    try:
        compiled = torch.compile(objective, fullgraph=True)(batch, latents, params)["loss"]
    except Exception as error:  # a graph break raises here under fullgraph=True
        raise ObjectiveCheckError(f"objective {name} does not compile into one graph (torch.compile fullgraph=True): "
                                  f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from error
    finally:
        torch._dynamo.reset()
    if not torch.allclose(compiled.detach(), loss.detach(), rtol=1e-4, atol=1e-6):
        raise ObjectiveCheckError(f"objective {name} compiled gives loss {compiled.item()}, eager {loss.item()}")


def check_objective(objective: Callable, batch: Mapping[str, Any], latents: Mapping[str, Any],
                    params: Mapping[str, Tensor], *, vmap: bool = True, compile: bool = True) -> dict[str, Tensor]:
    """Check that ``objective`` keeps the contract of :mod:`losses.api` on these inputs; raise on the first breach.

    In order: it returns a dict with a float 0-d ``"loss"``; every float output is finite; the gradients of the
    loss with respect to every float tensor of ``latents`` and ``params`` are finite and the loss depends on at
    least one; it mutates none of ``batch``, ``latents``, ``params`` (values and in-place version counters);
    a second call returns bitwise the same values (pure); under ``torch.func.vmap`` over two stacked copies of
    ``batch`` and ``latents`` it returns the loss twice; ``torch.compile(fullgraph=True)`` traces it without a
    graph break and agrees with eager (``compile=False`` skips this check, the only slow one: 5-30 s on a CPU).

    Args:
        objective: ``(batch, latents, params) -> {"loss", **metrics}``.
        batch, latents, params: inputs on which the objective is well-defined (e.g. a synthetic batch, the
            policy's latents for it, its ``state_dict``); add ``batch["step"]`` / ``batch["hyperparams"]`` if the
            objective reads them.
        vmap: run the vmap check.
        compile: run the compile check.

    Returns:
        The objective's output on the inputs.

    Raises:
        ObjectiveCheckError: naming the objective, the check that failed and what was found.
    """
    name = objective_name(objective)
    before = [_snapshot(batch), _snapshot(latents), _snapshot(params)]
    out = objective(batch, latents, params)
    loss = _loss(out, name, "")
    for label, tree, snapshot in zip(("batch", "latents", "params"), (batch, latents, params), before):
        _check_untouched(name, label, tree, snapshot)
    _check_finite(name, out)
    _check_pure(name, out, objective(batch, latents, params))
    _check_gradients(objective, name, batch, latents, params)
    if vmap:
        _check_vmap(objective, name, batch, latents, params, loss)
    if compile:
        _check_compiles(objective, name, batch, latents, params, loss)
    return dict(out)
