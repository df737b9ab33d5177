"""Reading the inputs objectives need, with errors that say which key is missing or malformed."""

from __future__ import annotations

import warnings
from typing import Any, Mapping

from torch import Tensor

from mstudio.optim.checks import describe


def require(container: Mapping[str, Any], key: str, where: str, objective: str) -> Any:
    """``container[key]``, or a ``ValueError`` naming the objective, the key and the keys that are there (or what
    ``container`` is, when it is not a dict)."""
    if not isinstance(container, Mapping):
        raise ValueError(f"{objective} needs {where} to be a dict with {key!r}, got {describe(container)}")
    if key not in container:
        raise ValueError(f"{objective} needs {where}[{key!r}], but {where} has only {sorted(container)}")
    return container[key]


def step_mask(batch: Mapping[str, Any], like: Tensor) -> Tensor:
    """``batch["mask"]`` ``(B, T)`` as a float tensor, or ones shaped like ``like`` when the batch has none.

    Any dtype is accepted (MineStudio's is uint8; bool and float work the same); the shape must be exactly
    ``like``'s, so a mask is never silently broadcast.
    """
    mask = batch.get("mask")
    if mask is None:
        return like.new_ones(like.shape)
    if tuple(mask.shape) != tuple(like.shape):
        raise ValueError(f"batch['mask'] must have shape {tuple(like.shape)} (B, T), got {tuple(mask.shape)}")
    return mask.to(like.dtype)


def deprecated_weight(weight: float | None, objective: str) -> float:
    """The ``weight=`` an objective still accepts (1 when not given), with a warning that points to ``weighted``."""
    if weight is None:
        return 1.0
    warnings.warn(f"{objective}(weight=w) is deprecated; use losses.weighted(losses.{objective}, w)",
                  DeprecationWarning, stacklevel=3)
    return weight
