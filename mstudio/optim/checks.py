"""Checks for the numbers optimizers, schedules and loss weights are built from, with errors that name them.

A hyper-parameter is checked once, in Python, where it enters (a factory, ``set_hyperparams``), never inside
a step. What a schedule returns is checked by type and shape only (no values: that would be a host sync), so
the check traces into a compiled step for free.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

__all__ = ["FINITE", "NONNEGATIVE", "POSITIVE", "UNIT_INTERVAL", "Rule", "check_int", "check_number",
           "check_schedule_value", "describe"]


class Rule(NamedTuple):
    """What a number must be: ``text`` for the error message, ``ok`` to test it."""

    text: str
    ok: Callable[[float], bool]


FINITE = Rule("a finite number", math.isfinite)
NONNEGATIVE = Rule("a finite number >= 0", lambda x: math.isfinite(x) and x >= 0)
POSITIVE = Rule("a finite number > 0", lambda x: math.isfinite(x) and x > 0)
UNIT_INTERVAL = Rule("a number in [0, 1)", lambda x: 0 <= x < 1)  # NaN fails both comparisons


def describe(value: Any) -> str:
    """``value`` for an error message: a tensor's dtype and shape, or anything else's type and (short) repr."""
    if isinstance(value, Tensor):
        return f"tensor {value.dtype} {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r:.60}"


def check_number(value: Any, name: str, rule: Rule = NONNEGATIVE, *, alternatives: str = "", hint: str = "") -> float:
    """``value`` as a float, if it is a real number (``int``, ``float``, numpy scalars) that satisfies ``rule``.

    Bools and tensors are refused: ``True`` as a learning rate is a typo, and a tensor would be a constant
    baked into a compiled graph (settable values belong in the state, see :mod:`mstudio.optim.hyperparams`).

    Args:
        value: the number to check.
        name: what it is, as the error should name it (``"adamw: lr"``).
        rule: what it must be.
        alternatives: other things the argument may be, for the message (``" or a schedule"``).
        hint: appended to the message of a ``ValueError`` (why the rule exists, how to fix it).

    Raises:
        TypeError: ``value`` is not a real number.
        ValueError: it breaks ``rule``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {rule.text}{alternatives}, got {describe(value)}")
    number = float(value)
    if not rule.ok(number):
        raise ValueError(f"{name} must be {rule.text}{alternatives}, got {number!r}{hint}")
    return number


def check_int(value: Any, name: str, *, minimum: int) -> int:
    """``value`` as an int (``int``, numpy integers, integer 0-d tensors) that is ``>= minimum``.

    Raises:
        TypeError: ``value`` is a bool or not integral (``1.5``, ``nan``, ``"10"``).
        ValueError: it is below ``minimum``.
    """
    rule = f"an int >= {minimum}"
    if isinstance(value, bool):
        raise TypeError(f"{name} must be {rule}, got {describe(value)}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be {rule}, got {describe(value)}") from None
    if number < minimum:
        raise ValueError(f"{name} must be {rule}, got {number}")
    return number


def check_schedule_value(value: Any, name: str) -> Tensor | float:
    """``value``, what a schedule returned for ``name``, if it is a real number or a real 0-d tensor.

    Only the type and shape are checked (static under ``torch.compile``); a NaN value is left to the step's
    non-finite guard.

    Raises:
        TypeError: neither a number nor a tensor of a real dtype.
        ValueError: a tensor that is not 0-d (one value per step).
    """
    if isinstance(value, Tensor):
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name}: a schedule must return a number or a real 0-d tensor, got {describe(value)}")
        if value.dim() != 0:
            raise ValueError(f"{name}: a schedule must return a 0-d tensor (one value per step), got {describe(value)}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: a schedule must return a number or a real 0-d tensor, got {describe(value)}")
    return value
