"""VPT contractor recordings (one parsed ``.jsonl`` segment) -> env actions, as MineStudio's converter does.

Per line, in order (``vpt_data_spec.md`` 1.5-1.6): the "attack stuck at start" fix, keyboard/mouse -> the
env buttons, mouse motion -> camera degrees (``0.15`` degrees per mouse count; pitch from ``dy``, yaw from
``dx``), then hotbar tracking (a change of the ``hotbar`` field presses that slot's key, catching scroll-wheel
changes). Null lines are kept and flagged, never dropped. MineStudio's float camera is the default;
``camera="vpt_int"`` truncates toward zero as VPT's public scripts do, and two fixes that no public loader
applies are opt-in: GUI mouse scaling by recorder version, and ESC read as ``inventory`` while a GUI is open.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from mstudio.actions.mapping import BUTTONS

DEGREES_PER_COUNT = 360.0 / 2400.0  # MineRL's mouse sensitivity: 0.15
KEYS = {
    "key.keyboard.escape": "ESC",
    "key.keyboard.w": "forward",
    "key.keyboard.s": "back",
    "key.keyboard.a": "left",
    "key.keyboard.d": "right",
    "key.keyboard.space": "jump",
    "key.keyboard.left.shift": "sneak",
    "key.keyboard.left.control": "sprint",
    "key.keyboard.q": "drop",
    "key.keyboard.e": "inventory",
    "key.keyboard.f": "swapHands",
    **{f"key.keyboard.{i}": f"hotbar.{i}" for i in range(1, 10)},
}
MOUSE_BUTTONS = {0: "attack", 1: "use", 2: "pickItem"}
#: Env buttons outside the policy's action space, kept so nothing recorded is lost.
EXTRA_BUTTONS = ("ESC", "swapHands", "pickItem")
#: dx/dy scale while a GUI is open, by recorder version (defined, unused, in VPT's and MineStudio's loaders).
GUI_MOUSE_SCALE = {"5.7": 0.5, "5.8": 0.5, "6.7": 2.0, "6.8": 2.0, "6.9": 2.0}
CAMERA_MODES = ("float", "vpt_int")


class ContractorActions(NamedTuple):
    """One segment's actions, ``N`` = number of jsonl lines (nothing is dropped).

    Attributes:
        env: the 20 policy buttons -> uint8 ``(N,)`` and ``camera`` -> float64 ``(N, 2)`` degrees (pitch, yaw).
        extra: ``ESC``, ``swapHands``, ``pickItem`` -> uint8 ``(N,)``.
        null: bool ``(N,)``, VPT's null-line flag (no mapped key, no mouse motion, no mouse button), taken
            before hotbar tracking as VPT does.
        gui_open: bool ``(N,)``, ``isGuiOpen``.
        hotbar_synthesized: bool ``(N,)``, a hotbar key was set because the ``hotbar`` field changed.
        attack_stuck_removed: bool ``(N,)``, a held attack was removed by the stuck-attack fix.
        cursor: float64 ``(N, 2)``, ``mouse.x, mouse.y`` in 1280x720 window pixels (0 where absent).
    """

    env: dict[str, np.ndarray]
    extra: dict[str, np.ndarray]
    null: np.ndarray
    gui_open: np.ndarray
    hotbar_synthesized: np.ndarray
    attack_stuck_removed: np.ndarray
    cursor: np.ndarray


def _field(line: Mapping[str, Any], device: str) -> Mapping[str, Any]:
    """``line[device]`` as a dict; a missing or ``null`` device (older recorders) means no input."""
    value = line.get(device)
    return value if isinstance(value, Mapping) else {}


def contractor_to_env(
    lines: Sequence[Mapping[str, Any]],
    *,
    camera: str = "float",
    gui_scaling_version: str | None = None,
    esc_as_inventory: bool = False,
) -> ContractorActions:
    """Convert one segment's parsed jsonl lines, in order, to env actions.

    Args:
        lines: the segment's lines, each a dict parsed from one jsonl line.
        camera: ``"float"`` (MineStudio) or ``"vpt_int"`` (VPT's scripts truncate degrees toward zero).
        gui_scaling_version: the recorder version (``"6.9"``, ...; the first part of a segment's relpath) to
            scale dx/dy by while a GUI is open; ``None`` for no scaling (MineStudio and VPT do none).
        esc_as_inventory: read ESC as ``inventory`` while a GUI is open (VPT's original training did).

    Raises:
        ValueError: an unknown ``camera`` mode, or a line that is not a dict (with its index).
    """
    if camera not in CAMERA_MODES:
        raise ValueError(f"camera must be one of {CAMERA_MODES}, got {camera!r}")
    gui_scale = 1.0
    if gui_scaling_version is not None:
        gui_scale = GUI_MOUSE_SCALE.get(str(gui_scaling_version), 1.0)
    n = len(lines)
    names = (*BUTTONS, *EXTRA_BUTTONS)
    pressed = {name: np.zeros(n, dtype=np.uint8) for name in names}
    degrees = np.zeros((n, 2), dtype=np.float64)
    null = np.zeros(n, dtype=bool)
    gui_open = np.zeros(n, dtype=bool)
    hotbar_synthesized = np.zeros(n, dtype=bool)
    stuck_removed = np.zeros(n, dtype=bool)
    cursor = np.zeros((n, 2), dtype=np.float64)

    attack_stuck = False
    last_hotbar = 0
    for i, line in enumerate(lines):
        if not isinstance(line, Mapping):
            raise ValueError(f"jsonl line {i} must be a JSON object, got {type(line).__name__}")
        mouse, keyboard = _field(line, "mouse"), _field(line, "keyboard")
        new_buttons = list(mouse.get("newButtons") or [])
        # Attack stuck from the first line: ignore it until it is pressed anew (that line keeps it).
        if i == 0:
            attack_stuck = new_buttons == [0]
        elif attack_stuck and 0 in new_buttons:
            attack_stuck = False
        buttons = list(mouse.get("buttons") or [])
        if attack_stuck and 0 in buttons:
            buttons = [b for b in buttons if b != 0]
            stuck_removed[i] = True

        gui_open[i] = bool(line.get("isGuiOpen", False))
        active = False
        for key in keyboard.get("keys") or []:
            if key in KEYS:
                pressed[KEYS[key]][i] = 1
                active = True
        for button in buttons:
            if button in MOUSE_BUTTONS:
                pressed[MOUSE_BUTTONS[button]][i] = 1
                active = True
        dx, dy = float(mouse.get("dx", 0.0) or 0.0), float(mouse.get("dy", 0.0) or 0.0)
        if gui_open[i]:
            dx, dy = dx * gui_scale, dy * gui_scale
        pitch, yaw = dy * DEGREES_PER_COUNT, dx * DEGREES_PER_COUNT
        if camera == "vpt_int":
            pitch, yaw = float(math.trunc(pitch)), float(math.trunc(yaw))
        degrees[i] = (pitch, yaw)
        null[i] = not active and dx == 0 and dy == 0
        if esc_as_inventory and gui_open[i] and pressed["ESC"][i]:
            pressed["inventory"][i] = 1
        cursor[i] = (float(mouse.get("x", 0.0) or 0.0), float(mouse.get("y", 0.0) or 0.0))

        hotbar = line.get("hotbar")  # absent before recorder 6.11: no tracking on that line
        if hotbar is not None:
            if hotbar != last_hotbar:
                pressed[f"hotbar.{int(hotbar) + 1}"][i] = 1
                hotbar_synthesized[i] = True
            last_hotbar = hotbar

    env = {name: pressed[name] for name in BUTTONS}
    env["camera"] = degrees
    return ContractorActions(
        env=env,
        extra={name: pressed[name] for name in EXTRA_BUTTONS},
        null=null,
        gui_open=gui_open,
        hotbar_synthesized=hotbar_synthesized,
        attack_stuck_removed=stuck_removed,
        cursor=cursor,
    )
