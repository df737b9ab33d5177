"""The batch layout of ``design.md`` and its validation at the edge of the train step.

    image         uint8 (B, T, H, W, 3)
    agent_action  {"buttons": long (B, T, 1) in [0, 8641), "camera": long (B, T, 1) in [0, 121)}
    timestamp     long (B, T): frame index inside the episode (the memory carry reads it)
    mask          optional (B, T), bool / integer / floating, values in [0, 1]: 0 on padding past an episode's end

Every tensor must be on ``timestamp``'s device, and none on the ``meta`` device (checked always: no sync).
With ``check_values`` the values are read in one device sync: action indices in range, ``mask`` in [0, 1]
(a negative mask would turn behaviour cloning into gradient ascent; NaN or inf would poison the loss) and
``timestamp`` non-negative.

Other keys (``env_action``, ...) pass through unchecked. Checks run in Python before a step, never inside it,
and every error names the key, what was expected and what came. :func:`normalize_batch` gives every batch of
a run one structure: optional keys are filled in (a missing ``mask`` is all ones, as MineStudio's callbacks
read it) and entries that are not tensors (episode ids as strings, text) are dropped before the step.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from mstudio.actions import N_BUTTONS, N_CAMERA

__all__ = ["ACTION_CLASSES", "check_batch", "normalize_batch"]

ACTION_CLASSES = {"buttons": N_BUTTONS, "camera": N_CAMERA}


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} {tuple(value.shape)}"
    return type(value).__name__


def _expect(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"batch[{key}] must be {expected}, got {_describe(value)}")


def check_batch(batch: Mapping[str, Any], *, batch_size: int | None = None, check_values: bool = True) -> tuple[int, int]:
    """Validate ``batch`` against the layout above.

    Args:
        batch: the batch.
        batch_size: the ``B`` it must have (the train state's), or ``None`` to take it from the batch.
        check_values: also check that action indices lie in range, ``mask`` in [0, 1] and ``timestamp`` is
            non-negative (reads the tensors: one device sync).

    Returns:
        ``(B, T)``.

    Raises:
        ValueError: a required key (``timestamp``) is missing, or a key has the wrong type, dtype, shape or
            device, or a value is out of range. Nothing is broadcast: every shape must match exactly.
    """
    if not isinstance(batch, Mapping):
        raise ValueError(f"a batch must be a dict of tensors, got {type(batch).__name__}")
    if "timestamp" not in batch:
        raise ValueError(f"batch['timestamp'] (long (B, T)) is required by the memory carry; batch has {sorted(batch)}")
    timestamp = batch["timestamp"]
    _expect(isinstance(timestamp, Tensor) and timestamp.dtype == torch.int64 and timestamp.dim() == 2,
            "'timestamp'", "long (B, T)", timestamp)
    B, T = timestamp.shape
    if batch_size is not None and B != batch_size:
        raise ValueError(
            f"batch['timestamp'] has batch size {B}, but the train state was made for batch_size={batch_size} "
            "(its recurrent memory has one row per batch row); make the state with init_state(..., batch_size="
            f"{B}) or batch the data in {batch_size}s"
        )
    _check_devices(batch, timestamp.device)
    if "image" in batch:
        image = batch["image"]
        ok = isinstance(image, Tensor) and image.dtype == torch.uint8 and image.dim() == 5
        _expect(ok and tuple(image.shape[:2]) == (B, T) and image.shape[-1] == 3,
                "'image'", f"uint8 (B, T, H, W, 3) with (B, T) = {(B, T)}", image)
    if "mask" in batch:
        mask = batch["mask"]
        _expect(isinstance(mask, Tensor) and tuple(mask.shape) == (B, T), "'mask'", f"a tensor of shape {(B, T)}", mask)
        _expect(mask.dtype.is_floating_point or mask.dtype in _INT_DTYPES, "'mask'", "real (bool, integer or floating) with values in [0, 1]", mask)
    if "agent_action" in batch:
        actions = batch["agent_action"]
        if not isinstance(actions, Mapping):
            raise ValueError(f"batch['agent_action'] must be a dict with 'buttons' and 'camera', got {_describe(actions)}")
        for head, classes in ACTION_CLASSES.items():
            if head not in actions:
                raise ValueError(f"batch['agent_action'][{head!r}] is missing; agent_action has {sorted(actions)}")
            action = actions[head]
            ok = isinstance(action, Tensor) and action.dtype == torch.int64 and tuple(action.shape) == (B, T, 1)
            _expect(ok, f"'agent_action'][{head!r}", f"long {(B, T, 1)}", action)
    if check_values and B * T > 0:
        _check_values(batch)
    return B, T


#: Dtypes a mask may have besides the floating ones.
_INT_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _tensor_leaves(value: Any, name: str) -> list[tuple[str, Tensor]]:
    """``(name, tensor)`` for every tensor in ``value`` (a tensor or nested mappings of them)."""
    if isinstance(value, Tensor):
        return [(name, value)]
    if isinstance(value, Mapping):
        return [leaf for key, v in value.items() for leaf in _tensor_leaves(v, f"{name}[{key!r}]")]
    return []


def _check_devices(batch: Mapping[str, Any], device: torch.device) -> None:
    """Raise ``ValueError`` for a tensor on the meta device (no data) or on another device than ``device``."""
    leaves = _tensor_leaves(dict(batch), "batch")
    leaves.sort(key=lambda leaf: leaf[0] != "batch['timestamp']")  # timestamp's own device first
    for name, tensor in leaves:
        if tensor.device.type == "meta":
            raise ValueError(f"{name} is on the meta device (it has a shape but no data); load the data onto "
                             f"a real device, got {_describe(tensor)} on {tensor.device}")
        if tensor.device != device:
            raise ValueError(f"{name} must be on batch['timestamp']'s device {device}, got {_describe(tensor)} on "
                             f"{tensor.device}; move the whole batch with one .to(device)")


def _check_values(batch: Mapping[str, Any]) -> None:
    """Check action ranges, ``mask`` in [0, 1] and ``timestamp >= 0`` with one device sync (one ``.tolist()``)."""
    stats = [batch["timestamp"].min().double().reshape(1)]
    heads = list(ACTION_CLASSES) if "agent_action" in batch else []
    stats += [torch.stack(torch.aminmax(batch["agent_action"][h])).double() for h in heads]
    if "mask" in batch:
        mask = batch["mask"].double()
        finite = torch.isfinite(mask)
        bad = (~finite).sum().double().reshape(1)
        stats += [torch.stack(torch.aminmax(torch.where(finite, mask, 0.5))), bad]  # one sync for all
    values = torch.cat(stats).tolist()
    if values[0] < 0:
        raise ValueError(f"batch['timestamp'] must be a non-negative frame index, got a minimum of {int(values[0])}")
    for i, head in enumerate(heads):
        low, high, classes = int(values[1 + 2 * i]), int(values[2 + 2 * i]), ACTION_CLASSES[head]
        if low < 0 or high >= classes:
            raise ValueError(
                f"batch['agent_action'][{head!r}] holds indices in [{low}, {high}], outside [0, {classes}) "
                f"({head} has {classes} classes)"
            )
    if "mask" in batch:
        low, high, bad = values[-3:]
        if bad:
            raise ValueError(f"batch['mask'] must be finite with values in [0, 1], got {int(bad)} NaN or inf value(s)")
        if low < 0 or high > 1:
            why = "; a negative mask would turn the loss into gradient ascent" if low < 0 else ""
            raise ValueError(f"batch['mask'] must hold values in [0, 1] (0 on padding), got values in "
                             f"[{low:g}, {high:g}]{why}")


def _is_tensor_tree(value: Any) -> bool:
    if isinstance(value, Tensor):
        return True
    return isinstance(value, Mapping) and bool(value) and all(_is_tensor_tree(v) for v in value.values())


def normalize_batch(batch: Mapping[str, Any], *, mask_dtype: torch.dtype = torch.uint8) -> dict[str, Any]:
    """``batch`` with one structure for the whole run, ready for the step (the input is not modified).

    - ``mask`` missing: filled with ones ``(B, T)`` of ``mask_dtype`` (the train step passes the dtype of
      the run's first mask) on ``timestamp``'s device, which is what every objective reads for a missing
      mask, so an optional mask appearing or disappearing mid-run changes nothing and recompiles nothing.
    - entries that are not tensors or dicts of tensors (a list of episode ids, text) are dropped: a compiled
      step takes tensors only, and objectives read none of them.

    Call after :func:`check_batch` (it reads ``timestamp``).
    """
    out = {key: value for key, value in batch.items() if _is_tensor_tree(value)}
    if "mask" not in out:
        timestamp = batch["timestamp"]
        out["mask"] = torch.ones(timestamp.shape, dtype=mask_dtype, device=timestamp.device)
    return out
