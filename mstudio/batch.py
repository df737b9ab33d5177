"""The batch layout of ``design.md`` and its validation at the edge of the train step.

    image         uint8 (B, T, H, W, 3), B >= 1 and T >= 1
    agent_action  {"buttons": long (B, T, 1) in [0, 8641), "camera": long (B, T, 1) in [0, 121)}
    timestamp     long (B, T): frame index inside the episode (the memory carry reads it), increasing along T
    mask          optional (B, T), bool / integer / floating, values in [0, 1]: 0 on padding past an episode's end

Keys are strings; ``image`` and ``timestamp`` are required (every policy reads the frames), ``agent_action``
is what behaviour cloning reads (an objective that needs it says so).

Every tensor must be on ``timestamp``'s device, and none on the ``meta`` device (checked always: no sync).
With ``check_values`` the values are read in one device sync: action indices in range, ``mask`` in [0, 1]
(a negative mask would turn behaviour cloning into gradient ascent; NaN or inf would poison the loss),
``timestamp`` non-negative and strictly increasing along ``T`` (a window's frames in order).

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
            non-negative and increasing along T (reads the tensors: one device sync).

    Returns:
        ``(B, T)``.

    Raises:
        ValueError: a key that is not a string, a required key (``timestamp``, ``image``) missing, a key with the
            wrong type, dtype, shape or device, an empty window (``B`` or ``T`` 0), or a value out of range.
            Nothing is broadcast: every shape must match exactly.
    """
    _check_keys(batch)
    timestamp = batch["timestamp"]
    _expect(isinstance(timestamp, Tensor) and timestamp.dtype == torch.int64 and timestamp.dim() == 2,
            "'timestamp'", "long (B, T)", timestamp)
    B, T = timestamp.shape
    _expect(B > 0 and T > 0, "'timestamp'", "long (B, T) with at least one row and one step", timestamp)
    if batch_size is not None and B != batch_size:
        raise ValueError(
            f"batch['timestamp'] has batch size {B}, but the train state was made for batch_size={batch_size} "
            "(its recurrent memory has one row per batch row); make the state with init_state(..., batch_size="
            f"{B}) or batch the data in {batch_size}s"
        )
    _check_devices(batch, timestamp.device)
    image = batch["image"]
    ok = isinstance(image, Tensor) and image.dtype == torch.uint8 and image.dim() == 5
    _expect(ok and tuple(image.shape[:2]) == (B, T) and image.shape[-1] == 3,
            "'image'", f"uint8 (B, T, H, W, 3) with (B, T) = {(B, T)}", image)
    if "mask" in batch:
        mask = batch["mask"]
        _expect(isinstance(mask, Tensor) and tuple(mask.shape) == (B, T), "'mask'", f"a tensor of shape {(B, T)}", mask)
        _expect(mask.dtype.is_floating_point or mask.dtype in _INT_DTYPES, "'mask'", "real (bool, integer or floating) with values in [0, 1]", mask)
    if "agent_action" in batch:
        _check_actions(batch["agent_action"], B, T)
    if check_values:
        _check_values(batch)
    return B, T


def _check_keys(batch: Any) -> None:
    """``batch`` is a mapping with str keys and the required ones."""
    if not isinstance(batch, Mapping):
        raise ValueError(f"a batch must be a dict of tensors, got {type(batch).__name__}")
    keys = [key for key in batch if not isinstance(key, str)]
    if keys:
        raise ValueError(f"batch keys must be str, got {keys[0]!r} ({type(keys[0]).__name__})")
    for key, (layout, reader) in _REQUIRED.items():
        if key not in batch:
            raise ValueError(f"batch[{key!r}] ({layout}) is required by {reader}; batch has {sorted(batch)}")


def _check_actions(actions: Any, B: int, T: int) -> None:
    """``actions`` is ``{"buttons", "camera"}`` of long ``(B, T, 1)`` (other heads pass through)."""
    if not isinstance(actions, Mapping):
        raise ValueError(f"batch['agent_action'] must be a dict with 'buttons' and 'camera', got {_describe(actions)}")
    for head in ACTION_CLASSES:
        if head not in actions:
            raise ValueError(f"batch['agent_action'][{head!r}] is missing; agent_action has {sorted(actions)}")
        action = actions[head]
        ok = isinstance(action, Tensor) and action.dtype == torch.int64 and tuple(action.shape) == (B, T, 1)
        _expect(ok, f"'agent_action'][{head!r}", f"long {(B, T, 1)}", action)


#: Keys every batch has: name -> (layout, what reads it).
_REQUIRED = {"timestamp": ("long (B, T)", "the memory carry"), "image": ("uint8 (B, T, H, W, 3)", "the policy")}

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
    """Check action ranges, ``mask`` in [0, 1], ``timestamp >= 0`` and increasing along T with one device sync
    (one ``.tolist()``)."""
    timestamp = batch["timestamp"]
    # the smallest step from one frame to the next (1 for a window with one frame: nothing to order)
    smallest_step = timestamp.diff(dim=1).min() if timestamp.shape[1] > 1 else timestamp.new_ones(())
    stats = [timestamp.min().double().reshape(1), smallest_step.double().reshape(1)]
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
    if values[1] <= 0:
        raise ValueError(f"batch['timestamp'] must increase along T (a window's frames in order), got a step where "
                         f"it changes by {int(values[1])}")
    for i, head in enumerate(heads):
        low, high, classes = int(values[2 + 2 * i]), int(values[3 + 2 * i]), ACTION_CLASSES[head]
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
