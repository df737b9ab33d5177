"""VPT's joint action indices (``CameraHierarchicalMapping``): env actions <-> ``{"buttons", "camera"}``.

Buttons are grouped; each group picks one option (index 0: none) and the joint index is the mixed-radix
number of the choices, last group fastest::

    buttons = 864*hotbar + 288*fore_back + 96*left_right + 32*sprint_sneak + 16*use + 8*drop + 4*attack
              + 2*jump + camera_moved                                           (in [0, 8640))

plus index 8640 for ``inventory``, which overrides everything (camera 60). ``camera = 11 * pitch_bin +
yaw_bin`` in ``[0, 121)``; 60 means the camera did not move. Both directions are vectorized over any leading
dims, for numpy arrays and torch tensors alike (you get back the kind you gave).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from mstudio.actions import camera as camera_quantizer
from mstudio.actions.space import CAMERA_NULL, INVENTORY_BUTTONS_INDEX, N_BUTTONS, N_CAMERA

__all__ = ["BUTTONS", "agent_to_env", "env_to_agent"]

#: The 20 policy buttons in VPT's ``Buttons.ALL`` order.
BUTTONS = (
    "attack", "back", "forward", "jump", "left", "right", "sneak", "sprint", "use", "drop", "inventory",
    *(f"hotbar.{i}" for i in range(1, 10)),
)
# (group options after "none", stride in the joint index), in joint-index order.
_GROUPS = (
    (tuple(f"hotbar.{i}" for i in range(1, 10)), 864),
    (("forward", "back"), 288),
    (("left", "right"), 96),
    (("sprint", "sneak"), 32),
    (("use",), 16),
    (("drop",), 8),
    (("attack",), 4),
    (("jump",), 2),
)
_OPPOSITES = {("forward", "back"), ("left", "right")}  # both pressed cancel out


def _to_int(x, like):
    if isinstance(like, torch.Tensor):
        return torch.as_tensor(x).to(torch.int64)
    return np.asarray(x).astype(np.int64)


def env_to_agent(env_action: Mapping[str, object]) -> dict:
    """Env action -> joint indices.

    Args:
        env_action: button name -> 0/1 array ``(...)`` (a missing button counts as 0) and ``camera`` -> float
            degrees ``(..., 2)`` as (pitch, yaw). numpy or torch.

    Returns:
        ``{"buttons": int64 (..., 1) in [0, 8641), "camera": int64 (..., 1) in [0, 121)}``, same kind as
        ``env_action["camera"]``.

    Within a group the option listed last wins (sprint + sneak -> sneak, hotbar.2 + hotbar.7 -> hotbar.7),
    except that forward + back and left + right cancel out.
    """
    if "camera" not in env_action:
        raise ValueError(f"env_action needs 'camera' (float degrees (..., 2)); it has {sorted(env_action)}")
    cam = env_action["camera"]
    if tuple(cam.shape[-1:]) != (2,):
        raise ValueError(f"env_action['camera'] must have shape (..., 2) (pitch, yaw), got {tuple(cam.shape)}")
    unknown = sorted(set(env_action) - set(BUTTONS) - {"camera"})
    if unknown:
        raise ValueError(f"env_action has unknown key(s) {unknown}; buttons are {list(BUTTONS)}")
    bins = camera_quantizer.discretize(cam)
    pitch, yaw = bins[..., 0], bins[..., 1]
    zeros = pitch * 0
    pressed = {name: _to_int(env_action[name], cam) != 0 if name in env_action else zeros != 0 for name in BUTTONS}

    moved = (pitch != camera_quantizer.NULL_BIN) | (yaw != camera_quantizer.NULL_BIN)
    buttons = _to_int(moved, cam)
    for options, stride in _GROUPS:
        choice = zeros
        for index, name in enumerate(options, start=1):
            choice = choice * (~pressed[name]) + index * pressed[name]  # a later option overrides an earlier one
        if options in _OPPOSITES:
            choice = choice * ~(pressed[options[0]] & pressed[options[1]])
        buttons = buttons + stride * choice
    camera_idx = camera_quantizer.N_BINS * pitch + yaw
    inventory = pressed["inventory"]
    buttons = buttons * ~inventory + INVENTORY_BUTTONS_INDEX * inventory
    camera_idx = camera_idx * ~inventory + CAMERA_NULL * inventory
    return {"buttons": buttons[..., None], "camera": camera_idx[..., None]}


def agent_to_env(agent_action: Mapping[str, object]) -> dict:
    """Joint indices -> env action: the 20 buttons as int64 0/1 ``(...)`` and ``camera`` float64 ``(..., 2)``.

    Args:
        agent_action: ``{"buttons": int (..., 1), "camera": int (..., 1)}``, numpy or torch.

    A buttons index whose camera option is "none" forces the camera to (0, 0); index 8640 (inventory) keeps
    the camera index it came with, as VPT's mapping does.
    """
    buttons, cam = agent_action["buttons"], agent_action["camera"]
    for name, value, high in (("buttons", buttons, N_BUTTONS), ("camera", cam, N_CAMERA)):
        if tuple(value.shape[-1:]) != (1,):
            raise ValueError(f"agent_action[{name!r}] must have shape (..., 1), got {tuple(value.shape)}")
        if value.size if isinstance(value, np.ndarray) else value.numel():
            low, top = int(value.min()), int(value.max())
            if low < 0 or top >= high:
                raise ValueError(f"agent_action[{name!r}] holds indices in [{low}, {top}], outside [0, {high})")
    buttons, cam = _to_int(buttons, buttons)[..., 0], _to_int(cam, buttons)[..., 0]
    inventory = buttons == INVENTORY_BUTTONS_INDEX
    env = {"inventory": _to_int(inventory, buttons)}
    for options, stride in _GROUPS:
        choice = (buttons // stride) % (len(options) + 1) * ~inventory
        for index, name in enumerate(options, start=1):
            env[name] = _to_int(choice == index, buttons)
    camera_off = ((buttons % 2) == 0) & ~inventory
    pitch = cam // camera_quantizer.N_BINS * ~camera_off + camera_quantizer.NULL_BIN * camera_off
    yaw = cam % camera_quantizer.N_BINS * ~camera_off + camera_quantizer.NULL_BIN * camera_off
    stack = torch.stack if isinstance(buttons, torch.Tensor) else np.stack
    env["camera"] = camera_quantizer.undiscretize(stack([pitch, yaw], -1))
    return {name: env[name] for name in (*BUTTONS, "camera")}
