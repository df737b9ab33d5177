"""Gradients of single loss terms: per objective from one forward pass, per sample, and curvature.

Every function here is pure (``torch.func``), reads the policy through :func:`mstudio.functionalize` with a
:class:`~mstudio.TrainState`'s tensors, and sees the batch exactly as the train step does: the memory carried by
the reset rule, and ``batch["step"]`` / ``batch["hyperparams"]`` added for the objectives. Nothing is updated.
Gradients are dicts ``parameter name -> tensor`` over ``state.params`` (zeros for parameters a loss does not reach).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import optree
import torch
from torch import Tensor, nn

from losses.api import Objective, check_output, objective_name
from mstudio.bridge import functionalize
from mstudio.train.memory import carry_memory, episode_starts
from mstudio.train.state import TrainState, objective_batch

__all__ = [
    "Forward",
    "curvature",
    "hessian_vector_product",
    "loss_function",
    "objective_gradients",
    "per_sample_gradients",
    "term",
]

Grads = dict[str, Tensor]


class Forward:
    """The policy's forward as the train step runs it on ``batch`` from ``state``: ``params -> latents``.

    Attributes:
        batch: what objectives receive (``batch`` plus ``"step"`` and ``"hyperparams"``).
        memory: the memory the forward starts from (``state.memory``, rows at an episode start reset).
    """

    def __init__(self, policy: nn.Module, state: TrainState, batch: Mapping[str, Any]):
        self._apply, _, _ = functionalize(policy)
        self._buffers = state.buffers
        self._batch = batch
        self.batch = objective_batch(batch, state)
        self.memory = carry_memory(state.memory, state.init_memory,
                                   episode_starts(batch["timestamp"], state.last_timestamp))

    def __call__(self, params: Mapping[str, Tensor]) -> dict[str, Any]:
        return self.latents(params, self._batch, self.memory)

    def latents(self, params: Mapping[str, Tensor], batch: Mapping[str, Any], memory: Any) -> dict[str, Any]:
        """The policy's latents for ``batch`` from ``memory`` with ``params`` (the state's buffers)."""
        latents, _ = self._apply(params, self._buffers, batch, memory)
        return latents


def loss_function(policy: nn.Module, objective: Objective, state: TrainState,
                  batch: Mapping[str, Any]) -> Callable[[Grads], Tensor]:
    """``params -> objective's loss`` on ``batch`` from ``state``: the function every tool here differentiates."""
    forward = Forward(policy, state, batch)
    return lambda params: check_output(objective(forward.batch, forward(params), params), objective)["loss"]


def term(objective: Objective, key: str) -> Objective:
    """An objective whose loss is ``objective``'s output ``key``, to study one part of a loss on its own.

    ``term(losses.behavior_clone, "camera_loss")`` is BC's camera part (``camera_loss`` is differentiable: the
    mean over the batch of the camera head's negative log-likelihood). The output must depend on the
    parameters: a detached metric gives a zero gradient, which :func:`objective_gradients` would report as 0.
    """
    def selected(batch: Mapping[str, Any], latents: Mapping[str, Any], params: Mapping[str, Tensor]) -> dict:
        out = objective(batch, latents, params)
        if key not in out:
            raise KeyError(f"term({objective_name(objective)}, {key!r}): the objective returns {sorted(out)}")
        return {"loss": out[key]}

    selected.__name__ = f"{objective_name(objective)}[{key}]"
    return selected


def _split_float(tree: Any) -> tuple[list[Tensor], Callable[[list[Tensor]], Any]]:
    """The float tensor leaves of ``tree`` and a function that puts new values for them back into it."""
    leaves, treedef = optree.tree_flatten(tree)
    slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor) and leaf.is_floating_point()]

    def rebuild(values: list[Tensor]) -> Any:
        new = list(leaves)
        for i, value in zip(slots, values):
            new[i] = value
        return optree.tree_unflatten(treedef, new)

    return [leaves[i] for i in slots], rebuild


def objective_gradients(policy: nn.Module, objectives: Mapping[str, Objective], state: TrainState,
                        batch: Mapping[str, Any]) -> tuple[dict[str, Grads], dict[str, dict[str, Tensor]]]:
    """The gradient of each objective's loss, from **one** forward pass of the policy.

    The forward runs once under ``torch.func.vjp``; each objective then costs its own gradient with respect to
    the latents (cheap: the heads' log-softmax outputs) and one backward pass through the policy, plus its direct
    dependence on the parameters (e.g. an L2 penalty on the weights).

    Args:
        policy: the policy (its tensors are not read: ``state``'s are).
        objectives: ``name -> objective``; the names key the results.
        state: a train state of the policy; ``batch``: one batch (as the train step takes it).

    Returns:
        ``(grads, outputs)``: ``grads[name]`` maps parameter name to the gradient of that objective's loss;
        ``outputs[name]`` is that objective's output dict, detached.
    """
    forward = Forward(policy, state, batch)
    params = dict(state.params)
    latents, pullback = torch.func.vjp(forward, params)
    float_latents, rebuild = _split_float(latents)
    grads: dict[str, Grads] = {}
    outputs: dict[str, dict[str, Tensor]] = {}
    for name, objective in objectives.items():
        def loss(values: list[Tensor], params: Grads, objective=objective) -> tuple[Tensor, dict[str, Tensor]]:
            out = check_output(objective(forward.batch, rebuild(values), params), objective)
            return out["loss"], out

        (d_latents, d_params), out = torch.func.grad(loss, argnums=(0, 1), has_aux=True)(float_latents, params)
        through_policy = pullback(rebuild(d_latents) if d_latents else _zeros_like_floats(latents))[0]
        grads[name] = {key: through_policy[key] + d_params[key] for key in params}
        outputs[name] = {key: torch.as_tensor(value).detach() for key, value in out.items()}
    return grads, outputs


def _zeros_like_floats(tree: Any) -> Any:
    """``tree`` with zeros in place of its float tensors (a cotangent for a loss that reads no latent)."""
    return optree.tree_map(lambda t: torch.zeros_like(t) if isinstance(t, Tensor) and t.is_floating_point() else t,
                           tree)


def _rows(tree: Any, batch_size: int) -> Any:
    """``in_dims`` for ``tree``: 0 for tensors with ``batch_size`` rows, ``None`` for everything else."""
    return optree.tree_map(
        lambda t: 0 if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == batch_size else None, tree,
        none_is_leaf=True)


def per_sample_gradients(policy: nn.Module, objective: Objective, state: TrainState, batch: Mapping[str, Any], *,
                         over_time: bool = False, chunk_size: int | None = None) -> Grads:
    """The gradient of the objective on each row of the batch alone, by ``torch.func.vmap`` over rows.

    Row ``b``'s gradient is the gradient of ``objective`` on the one-row batch ``batch[b:b+1]`` (with row ``b``'s
    memory), exactly what a Python loop of single-row calls gives, for any objective. With ``over_time``, it is
    split further by time step: entry ``[b, t]`` is the gradient with ``batch["mask"]`` zero except at step
    ``t`` of row ``b``; for objectives that sum masked per-step terms (behaviour cloning) the ``T`` entries add up
    to row ``b``'s gradient (the recurrent forward still sees every step; ``t``'s loss reaches back through
    the memory). The forward runs once per row, the ``T`` backward passes are vmapped.

    Args:
        over_time: also split by time step (needs an objective that reads ``batch["mask"]``).
        chunk_size: rows (and steps) vmapped at once; bounds memory at the cost of speed (``None``: all).

    Returns:
        parameter name -> gradients ``(B, *shape)``, or ``(B, T, *shape)`` with ``over_time``.
    """
    forward = Forward(policy, state, batch)
    batch_size = state.batch_size
    params = dict(state.params)
    rows_of_batch, rows_of_memory = _rows(forward.batch, batch_size), _rows(forward.memory, batch_size)

    def one_row(row_batch: Mapping[str, Any], row_memory: Any) -> Grads:
        seen = optree.tree_map(lambda t, d: t.unsqueeze(0) if d == 0 else t, row_batch, rows_of_batch,
                               none_is_leaf=True)
        memory = optree.tree_map(lambda t: t.unsqueeze(0), row_memory)

        def loss(p: Grads, mask: Tensor | None = None) -> Tensor:
            latents = forward.latents(p, seen, memory)
            inputs = seen if mask is None else {**seen, "mask": mask}
            return check_output(objective(inputs, latents, p), objective)["loss"]

        if not over_time:
            return torch.func.grad(loss)(params)
        steps = seen["timestamp"].shape[1]
        if "mask" not in seen:
            raise ValueError("per_sample_gradients(over_time=True) splits the loss by batch['mask'], which this "
                             "batch does not have; add a mask of ones (B, T)")
        masks = seen["mask"] * torch.eye(steps, dtype=seen["mask"].dtype, device=seen["mask"].device)[:, None, :]
        return torch.func.vmap(lambda m: torch.func.grad(loss)(params, m), chunk_size=chunk_size)(masks)

    return torch.func.vmap(one_row, in_dims=(rows_of_batch, rows_of_memory), chunk_size=chunk_size)(
        forward.batch, forward.memory)


def hessian_vector_product(loss: Callable[[Grads], Tensor], params: Grads, vector: Grads) -> Grads:
    """``H v`` for the Hessian ``H`` of ``loss`` at ``params``: forward-mode over reverse (``jvp`` of ``grad``)."""
    return torch.func.jvp(torch.func.grad(loss), (params,), (vector,))[1]


def _dot(a: Grads, b: Grads) -> Tensor:
    return sum((a[k].double() * b[k].double()).sum() for k in a)


def curvature(loss: Callable[[Grads], Tensor], params: Grads, direction: Grads | None = None) -> dict[str, Tensor]:
    """The loss's curvature along ``direction`` (default: its gradient), ``v^T H v / v^T v``, by one HVP.

    Along the gradient ``g`` this is how fast the gradient changes where a step of SGD goes: ``1 / curvature`` is
    the step size that minimises the local quadratic model, so a learning rate far above it overshoots.

    Returns:
        ``{"curvature": float64 0-d, "grad_norm": float64 0-d}`` (the norm of the gradient at ``params``).
    """
    grad = torch.func.grad(loss)(params)
    v = grad if direction is None else direction
    hv = hessian_vector_product(loss, params, v)
    return {"curvature": _dot(v, hv) / _dot(v, v), "grad_norm": _dot(grad, grad).sqrt()}
