"""Schedules: pure functions ``step -> value`` of a long scalar step tensor.

They compute in float64, as ``torch.optim.lr_scheduler`` does in Python floats, so a learning rate matches
torch's to the last bit before it is cast to the parameters' dtype. Being tensor functions, they trace into a
compiled step without recompiling as the step advances. ``step`` counts updates already done: the first
update sees ``step = 0``.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from mstudio.optim.checks import FINITE, check_int, check_number, describe

__all__ = ["Schedule", "constant", "cosine_decay", "join", "linear_warmup"]

Schedule = Callable[[Tensor], Tensor]


def _as_float64(step: Tensor) -> Tensor:
    return torch.as_tensor(step).to(torch.float64)


def constant(value: float) -> Schedule:
    """``step -> value`` (a finite number)."""
    value = check_number(value, "constant: value", FINITE)

    def schedule(step: Tensor) -> Tensor:
        return torch.full((), value, dtype=torch.float64, device=torch.as_tensor(step).device)

    return schedule


def linear_warmup(value: float | Schedule, warmup_steps: int) -> Schedule:
    """``step -> value * min((step + 1) / warmup_steps, 1)``: MineStudio's warmup.

    MineStudio steps ``LambdaLR(lambda k: min((k + 1) / warmup_steps, 1))`` once per update, so the very first
    update already uses ``value / warmup_steps``. ``value`` may itself be a schedule (e.g. a cosine decay),
    which is then scaled by the warmup factor. ``warmup_steps = 0`` means no warmup.
    """
    warmup_steps = check_int(warmup_steps, "linear_warmup: warmup_steps", minimum=0)
    base = value if callable(value) else constant(check_number(value, "linear_warmup: value", FINITE))
    if warmup_steps == 0:
        return base

    def schedule(step: Tensor) -> Tensor:
        factor = torch.clamp((_as_float64(step) + 1) / warmup_steps, max=1.0)
        return base(step) * factor

    return schedule


def cosine_decay(value: float, decay_steps: int, alpha: float = 0.0) -> Schedule:
    """``step -> value * ((1 - alpha) * 0.5 * (1 + cos(pi * min(step, decay_steps) / decay_steps)) + alpha)``.

    Decays from ``value`` at step 0 to ``alpha * value`` at ``decay_steps`` and stays there (as optax's
    ``cosine_decay_schedule``).
    """
    value = check_number(value, "cosine_decay: value", FINITE)
    decay_steps = check_int(decay_steps, "cosine_decay: decay_steps", minimum=1)
    alpha = check_number(alpha, "cosine_decay: alpha", FINITE)

    def schedule(step: Tensor) -> Tensor:
        progress = torch.clamp(_as_float64(step), max=decay_steps) / decay_steps
        return value * ((1 - alpha) * 0.5 * (1 + torch.cos(math.pi * progress)) + alpha)

    return schedule


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Run ``schedules[i]`` from ``boundaries[i - 1]`` on; each sees the step counted from its own start.

    ``len(boundaries)`` must be ``len(schedules) - 1`` and increasing. Every schedule is evaluated and the
    right one selected with ``torch.where``, so the result is branch-free inside a compiled step.
    """
    for i, schedule in enumerate(schedules):
        if not callable(schedule):
            raise TypeError(f"join: schedules[{i}] must be callable (step -> value), got {describe(schedule)}")
    boundaries = [check_int(b, f"join: boundaries[{i}]", minimum=0) for i, b in enumerate(boundaries)]
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(f"join needs len(schedules) - 1 boundaries; got {len(schedules)} schedules, {len(boundaries)} boundaries")
    if any(b1 >= b2 for b1, b2 in zip(boundaries, boundaries[1:])):
        raise ValueError(f"join boundaries must increase, got {list(boundaries)}")

    def schedule(step: Tensor) -> Tensor:
        step = torch.as_tensor(step)
        value = schedules[0](step)
        for boundary, later in zip(boundaries, schedules[1:]):
            value = torch.where(step >= boundary, later(step - boundary), value)
        return value

    return schedule
