"""Validation: forward and objective with the train state's weights, no update, and a memory of its own.

MineStudio's validation shares the recurrent memory with training (one ``_make_memory`` cache for both), so a
validation pass corrupts the memory the next training batch continues from. Here validation carries an
:class:`EvalCarry` of its own, with the same reset rule as the train step.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, NamedTuple

import optree
import torch
from torch import Tensor, nn

from losses.api import Objective
from mstudio.batch import check_batch, normalize_batch
from mstudio.bridge import functionalize
from mstudio.train.memory import carry_memory, episode_starts
from mstudio.train.state import TrainState, check_memory, objective_batch

__all__ = ["EvalCarry", "evaluate", "init_eval_carry", "make_eval_step"]


class EvalCarry(NamedTuple):
    """Validation's own memory: the fields of :class:`~mstudio.train.TrainState` the carry reads."""

    memory: Any
    init_memory: Any
    last_timestamp: Tensor


def init_eval_carry(policy: nn.Module, batch_size: int) -> EvalCarry:
    """Fresh validation memory for ``batch_size`` rows on the policy's device."""
    init_memory = policy.initial_state(batch_size)
    check_memory(init_memory, batch_size, f"{type(policy).__name__}.initial_state({batch_size})")
    device = next(policy.parameters()).device
    last = torch.zeros(batch_size, dtype=torch.int64, device=device)
    return EvalCarry(optree.tree_map(torch.clone, init_memory), init_memory, last)


def make_eval_step(policy: nn.Module, objective: Objective):
    """``eval_step(state, carry, batch, *, use_ema=False) -> (carry, metrics)``: the objective's outputs on
    ``batch`` with ``state``'s parameters (or its EMA), under ``torch.no_grad``; ``state`` is only read.

    Args:
        policy: the policy module (called statelessly).
        objective: the train objective; it sees ``batch["step"]`` and ``batch["hyperparams"]`` as in training.
    """
    apply_fn, _, _ = functionalize(policy)

    @torch.no_grad()
    def eval_step(state: TrainState, carry: EvalCarry, batch: Mapping[str, Any], *, use_ema: bool = False):
        check_batch(batch, batch_size=carry.last_timestamp.shape[0], check_values=False)
        batch = normalize_batch(batch)
        timestamp = batch["timestamp"]
        params = state.ema if use_ema and state.ema is not None else state.params
        memory = carry_memory(carry.memory, carry.init_memory, episode_starts(timestamp, carry.last_timestamp))
        latents, state_out = apply_fn(params, state.buffers, batch, memory)
        out = objective(objective_batch(batch, state), latents, params)
        metrics = {key: torch.as_tensor(value) for key, value in out.items()}
        # A copy: a view would keep the caller's batch, which a loader may refill before the next call.
        return EvalCarry(state_out, carry.init_memory, timestamp[:, -1].clone()), metrics

    return eval_step


def evaluate(policy: nn.Module, objective: Objective, state: TrainState, batches: Iterable[Mapping[str, Any]], *,
             use_ema: bool = False) -> dict[str, float]:
    """The objective's metrics averaged over ``batches`` (no update), with a memory of their own that starts
    from ``policy.initial_state(B)`` (``B`` from the first batch) and follows the train step's reset rule.

    Metrics stay on the device until the end: one host sync for the whole pass.

    Raises:
        ValueError: ``batches`` is empty.
    """
    eval_step = make_eval_step(policy, objective)
    carry, totals, count = None, {}, 0
    for batch in batches:
        if carry is None:
            carry = init_eval_carry(policy, batch["timestamp"].shape[0])
        carry, metrics = eval_step(state, carry, batch, use_ema=use_ema)
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + value.detach().double()
        count += 1
    if count == 0:
        raise ValueError("evaluate: the batches to evaluate are empty (an exhausted iterator?)")
    names = list(totals)
    return dict(zip(names, (torch.stack([totals[n] for n in names]) / count).tolist()))
