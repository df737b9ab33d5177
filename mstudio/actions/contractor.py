"""VPT contractor recordings (one parsed ``.jsonl`` segment) -> env actions, as MineStudio's converter does.

Per line, in order (``vpt_data_spec.md`` 1.5-1.6): the "attack stuck at start" fix, keyboard/mouse -> the
env buttons, mouse motion -> camera degrees (``0.15`` degrees per mouse count; pitch from ``dy``, yaw from
``dx``), then hotbar tracking (a change of the ``hotbar`` field presses that slot's key, catching scroll-wheel
changes). Null lines are kept and flagged, never dropped. MineStudio's float camera is the default;
``camera="vpt_int"`` truncates toward zero as VPT's public scripts do, and two fixes that no public loader
applies are opt-in: GUI mouse scaling by recorder version, and ESC read as ``inventory`` while a GUI is open.
"""

from __future__ import annotations

import json
import math
import numbers
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from mstudio.actions.mapping import BUTTONS

__all__ = [
    "CAMERA_MODES",
    "DEGREES_PER_COUNT",
    "EXTRA_BUTTONS",
    "GUI_MOUSE_SCALE",
    "KEYS",
    "MOUSE_BUTTONS",
    "MAX_MOUSE_COUNTS",
    "ContractorActions",
    "check_line",
    "check_lines",
    "contractor_to_env",
]

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
#: Largest mouse motion (``dx``, ``dy``) accepted in one line, in counts; recorded values stay in the thousands,
#: and anything past about 1e38 would overflow the stored float32 degrees.
MAX_MOUSE_COUNTS = 1e6


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


def _is_count(value: Any) -> bool:
    return _is_number(value) and abs(value) <= MAX_MOUSE_COUNTS


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(v) for v in value)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


#: What the converter reads from a line: ``(device, key) -> (check, what is allowed)``; ``null`` is always allowed.
_LINE_FIELDS = {
    ("mouse", "x"): (_is_number, "a finite number"),
    ("mouse", "y"): (_is_number, "a finite number"),
    ("mouse", "dx"): (_is_count, f"a finite number at most {MAX_MOUSE_COUNTS:g} in size"),
    ("mouse", "dy"): (_is_count, f"a finite number at most {MAX_MOUSE_COUNTS:g} in size"),
    ("mouse", "buttons"): (_is_int_list, "a list of integers"),
    ("mouse", "newButtons"): (_is_int_list, "a list of integers"),
    ("keyboard", "keys"): (_is_str_list, "a list of strings"),
    (None, "isGuiOpen"): (lambda v: isinstance(v, (bool, np.bool_)), "true or false"),
    (None, "hotbar"): (lambda v: _is_int(v) and 0 <= v <= 8, "an integer 0-8"),
}


def _found(value: Any) -> str:
    """``value`` as JSON (NaN and Infinity print as such; numpy scalars as numbers), cut to 40 characters."""
    text = json.dumps(value, default=lambda v: v.item() if isinstance(v, np.generic) else repr(v))
    return text if len(text) <= 40 else text[:37] + "..."


def check_line(line: Any, where: str) -> None:
    """Check that one parsed contractor line holds what :func:`contractor_to_env` reads, with the allowed types.

    Args:
        line: a line parsed from a jsonl file.
        where: the line, for the message (``"x.jsonl line 3"``, ``"lines[2]"``).

    Raises:
        ValueError: ``"<where>: '<key>' must be <allowed> or null, got <found>"`` for the first bad value.
    """
    if not isinstance(line, Mapping):
        raise ValueError(f"{where}: must be a JSON object, got {_found(line)}")
    for device in ("mouse", "keyboard"):
        if line.get(device) is not None and not isinstance(line[device], Mapping):
            raise ValueError(f"{where}: '{device}' must be an object or null, got {_found(line[device])}")
    for (device, key), (ok, allowed) in _LINE_FIELDS.items():
        value = (line if device is None else (line.get(device) or {})).get(key)
        if value is not None and not ok(value):
            name = key if device is None else f"{device}.{key}"
            raise ValueError(f"{where}: '{name}' must be {allowed} or null, got {_found(value)}")


def check_lines(lines: Iterable[Any], name: str = "jsonl", *, first: int = 1) -> None:
    """:func:`check_line` for every line of ``lines``, named ``"<name> line <n>"`` from ``n = first``."""
    for number, line in enumerate(lines, start=first):
        check_line(line, f"{name} line {number}")


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
    lines: Iterable[Mapping[str, Any]],
    *,
    camera: str = "float",
    gui_scaling_version: str | None = None,
    esc_as_inventory: bool = False,
) -> ContractorActions:
    """Convert one segment's parsed jsonl lines, in order, to env actions.

    Args:
        lines: the segment's lines in order (a list, or any iterable but a str or mapping), each a dict parsed from
            one jsonl line; every value the converter reads is checked first (:func:`check_line`).
        camera: ``"float"`` (MineStudio) or ``"vpt_int"`` (VPT's scripts truncate degrees toward zero).
        gui_scaling_version: the recorder version (``"6.9"``, ...; the first part of a segment's relpath) to
            scale dx/dy by while a GUI is open; ``None`` for no scaling (MineStudio and VPT do none).
        esc_as_inventory: read ESC as ``inventory`` while a GUI is open (VPT's original training did).

    Raises:
        TypeError: ``lines`` is a str, a mapping or not iterable.
        ValueError: an unknown ``camera`` mode, or a line holding a value of the wrong type or range
            (``"lines[<i>]: '<key>' must be <allowed> or null, got <found>"``).
    """
    gui_scale = _gui_scale(camera, gui_scaling_version)
    lines = _checked(lines)
    out = _empty_actions(len(lines))
    pressed = {name: out.env[name] for name in BUTTONS} | out.extra  # button -> its uint8 (N,) array in out
    attack_stuck, last_hotbar = False, 0
    for i, line in enumerate(lines):
        mouse, keyboard = _field(line, "mouse"), _field(line, "keyboard")
        buttons, attack_stuck, out.attack_stuck_removed[i] = _release_stuck_attack(i, mouse, attack_stuck)
        out.gui_open[i] = bool(line.get("isGuiOpen", False))
        active = _press(pressed, i, keyboard.get("keys") or [], buttons)
        scale = gui_scale if out.gui_open[i] else 1.0
        moved, out.env["camera"][i] = _camera_degrees(mouse, scale, camera)
        out.null[i] = not active and not moved
        if esc_as_inventory and out.gui_open[i] and pressed["ESC"][i]:
            pressed["inventory"][i] = 1
        out.cursor[i] = (float(mouse.get("x", 0.0) or 0.0), float(mouse.get("y", 0.0) or 0.0))
        last_hotbar = _track_hotbar(pressed, out.hotbar_synthesized, i, line.get("hotbar"), last_hotbar)
    return out


def _checked(lines: Iterable[Any]) -> list[Mapping[str, Any]]:
    """``lines`` as a list, every line checked (:func:`check_line`); ``TypeError`` if it is no sequence of lines."""
    if isinstance(lines, (str, bytes, Mapping)) or not isinstance(lines, Iterable):
        raise TypeError(f"lines must be a sequence of parsed jsonl lines (dicts); got {type(lines).__name__}")
    lines = list(lines)
    for i, line in enumerate(lines):
        check_line(line, f"lines[{i}]")
    return lines


def _gui_scale(camera: str, gui_scaling_version: str | None) -> float:
    """The dx/dy factor while a GUI is open (1 without a known version), after checking the ``camera`` mode."""
    if camera not in CAMERA_MODES:
        raise ValueError(f"camera must be one of {CAMERA_MODES}, got {camera!r}")
    if gui_scaling_version is None:
        return 1.0
    return GUI_MOUSE_SCALE.get(str(gui_scaling_version), 1.0)


def _empty_actions(n: int) -> ContractorActions:
    """All-zero actions for ``n`` lines: nothing pressed, no camera motion, every flag False."""
    env: dict[str, np.ndarray] = {name: np.zeros(n, dtype=np.uint8) for name in BUTTONS}
    env["camera"] = np.zeros((n, 2), dtype=np.float64)
    return ContractorActions(
        env=env,
        extra={name: np.zeros(n, dtype=np.uint8) for name in EXTRA_BUTTONS},
        null=np.zeros(n, dtype=bool),
        gui_open=np.zeros(n, dtype=bool),
        hotbar_synthesized=np.zeros(n, dtype=bool),
        attack_stuck_removed=np.zeros(n, dtype=bool),
        cursor=np.zeros((n, 2), dtype=np.float64),
    )


def _release_stuck_attack(i: int, mouse: Mapping[str, Any], attack_stuck: bool) -> tuple[list, bool, bool]:
    """The mouse buttons held on line ``i`` once the "attack stuck at start" fix is applied.

    An attack held from the first line (``newButtons == [0]`` there) is ignored until it is pressed anew;
    the line that presses it anew keeps it.

    Returns:
        ``(buttons, attack_stuck, removed)``: the held buttons, whether attack is still stuck for the next
        line, and whether a held attack was removed from this line.
    """
    new_buttons = list(mouse.get("newButtons") or [])
    if i == 0:
        attack_stuck = new_buttons == [0]
    elif attack_stuck and 0 in new_buttons:
        attack_stuck = False
    buttons = list(mouse.get("buttons") or [])
    if attack_stuck and 0 in buttons:
        return [b for b in buttons if b != 0], attack_stuck, True
    return buttons, attack_stuck, False


def _press(pressed: dict[str, np.ndarray], i: int, keys: Sequence[str], buttons: Sequence[int]) -> bool:
    """Set line ``i`` of the env buttons the mapped keyboard ``keys`` and mouse ``buttons`` stand for.

    Returns:
        whether any key or mouse button was mapped (unmapped ones are ignored, as VPT does).
    """
    active = False
    for key in keys:
        if key in KEYS:
            pressed[KEYS[key]][i] = 1
            active = True
    for button in buttons:
        if button in MOUSE_BUTTONS:
            pressed[MOUSE_BUTTONS[button]][i] = 1
            active = True
    return active


def _camera_degrees(mouse: Mapping[str, Any], scale: float, camera: str) -> tuple[bool, tuple[float, float]]:
    """Mouse motion (``dx``, ``dy`` counts, times ``scale``) -> ``(moved, (pitch, yaw))`` in degrees."""
    dx, dy = float(mouse.get("dx", 0.0) or 0.0), float(mouse.get("dy", 0.0) or 0.0)
    dx, dy = dx * scale, dy * scale
    pitch, yaw = dy * DEGREES_PER_COUNT, dx * DEGREES_PER_COUNT
    if camera == "vpt_int":
        pitch, yaw = float(math.trunc(pitch)), float(math.trunc(yaw))
    return not (dx == 0 and dy == 0), (pitch, yaw)


def _track_hotbar(
    pressed: dict[str, np.ndarray], synthesized: np.ndarray, i: int, hotbar: Any, last_hotbar: Any
) -> Any:
    """Press the slot's key on line ``i`` when the ``hotbar`` field changed (catching scroll-wheel changes).

    Returns:
        the hotbar slot to compare the next line with (``last_hotbar`` when the line has no ``hotbar`` field,
        as recorders before 6.11 write none: no tracking on that line).
    """
    if hotbar is None:
        return last_hotbar
    if hotbar != last_hotbar:
        pressed[f"hotbar.{int(hotbar) + 1}"][i] = 1
        synthesized[i] = True
    return hotbar
