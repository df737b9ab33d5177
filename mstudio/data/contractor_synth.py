"""Synthetic VPT contractor data in the real format, to test the importer end to end without downloads.

Each segment is ``<version>/<alias>-<12 hex>-<YYYYMMDD>-<HHMMSS>`` with a ``.mp4`` (640x360, 20 fps,
H.264), a ``.jsonl`` (one action per frame), an ``-options.json``, and a sidecar ``.expected.json`` holding,
per line, the joint indices and null flag the importer must produce. The sidecar comes from a scalar
reference written here from ``vpt_data_spec.md`` (not from :mod:`mstudio.actions`), so the two check each
other. Every frame carries its line number as a barcode: 16 black/white 40x40 blocks along the top edge.
``index.json`` lists the segments as VPT's index files do (``basedir`` + ``relpaths``).
"""

from __future__ import annotations

import json
import math
import random
from datetime import datetime, timedelta
from pathlib import Path

import av
import numpy as np

__all__ = [
    "BITS", "BLOCK", "FPS", "HEIGHT", "VERSION", "WIDTH", "barcode", "read_barcode", "synthesize_contractor",
]

WIDTH, HEIGHT, FPS = 640, 360, 20
BLOCK, BITS = 40, 16
VERSION = "10.0"

_KEYS = {"forward": "w", "back": "s", "left": "a", "right": "d", "jump": "space", "sneak": "left.shift",
         "sprint": "left.control", "drop": "q", "inventory": "e", "ESC": "escape", "swapHands": "f",
         **{f"hotbar.{i}": str(i) for i in range(1, 10)}}
_THRESHOLD_COUNTS = [0, 1, 2, 6, 7, 8, 15, 16, 29, 30, 51, 52, 54, 67, 500]


def barcode(index: int) -> np.ndarray:
    """The top ``BLOCK`` rows of a frame that encode ``index`` (bit 0 leftmost): uint8 ``(40, 640, 3)``."""
    row = np.zeros((BLOCK, WIDTH, 3), dtype=np.uint8)
    for bit in range(BITS):
        if index >> bit & 1:
            row[:, bit * BLOCK:(bit + 1) * BLOCK] = 255
    return row


def read_barcode(frame: np.ndarray) -> int:
    """Decode :func:`barcode` from an RGB frame of any size (the blocks scale with it)."""
    height, width = frame.shape[:2]
    band = frame[: max(1, height * BLOCK // HEIGHT // 2)].astype(np.float64).mean(axis=(0, 2))
    value = 0
    for bit in range(BITS):
        lo, hi = bit * width // BITS, (bit + 1) * width // BITS
        if band[lo + (hi - lo) // 4: hi - (hi - lo) // 4].mean() > 127:
            value |= 1 << bit
    return value


# --- the independent reference (spec 2-3 for one line, scalar) ---------------------------------------------------

def _bin(degrees: float) -> int:
    x = max(-10.0, min(10.0, degrees)) / 10.0
    encoded = 10.0 * math.copysign(math.log(1 + 10 * abs(x)) / math.log(11), x) if x else 0.0
    return int(np.round((encoded + 10.0) / 2.0))


def _reference_indices(pressed: set[str], pitch: float, yaw: float) -> tuple[int, int]:
    if "inventory" in pressed:
        return 8640, 60
    hotbar = max([i for i in range(1, 10) if f"hotbar.{i}" in pressed], default=0)
    fore = 0 if {"forward", "back"} <= pressed else 1 if "forward" in pressed else 2 if "back" in pressed else 0
    side = 0 if {"left", "right"} <= pressed else 1 if "left" in pressed else 2 if "right" in pressed else 0
    speed = 2 if "sneak" in pressed else 1 if "sprint" in pressed else 0
    bins = (_bin(pitch), _bin(yaw))
    moved = int(bins != (5, 5))
    buttons = (864 * hotbar + 288 * fore + 96 * side + 32 * speed + 16 * ("use" in pressed)
               + 8 * ("drop" in pressed) + 4 * ("attack" in pressed) + 2 * ("jump" in pressed) + moved)
    return buttons, 11 * bins[0] + bins[1] if moved else 60


# --- scripted lines -------------------------------------------------------------------------------------------------

def _line(i, keys=(), buttons=(), new_buttons=(), dx=0, dy=0, hotbar=0, gui=False, x=640.0, y=360.0):
    return {
        "mouse": {"x": x, "y": y, "dx": float(dx), "dy": float(dy), "scaledX": x - 640, "scaledY": y - 360,
                  "dwheel": 0.0, "buttons": list(buttons), "newButtons": list(new_buttons)},
        "keyboard": {"keys": [f"key.keyboard.{_KEYS.get(k, k)}" for k in keys], "newKeys": [], "chars": ""},
        "isGuiOpen": gui, "isGuiInventory": gui, "hotbar": hotbar, "yaw": 0.0, "pitch": 0.0,
        "xpos": 0.0, "ypos": 64.0, "zpos": 0.0, "tick": i, "milli": 1650000000000 + 50 * i,
        "serverTick": i, "serverTickDurationMs": 50.0, "inventory": [{"type": "dirt", "quantity": 3}],
        "stats": {"minecraft.custom:minecraft.jump": i // 10},
    }


def _script(n: int, rng: random.Random, first_segment: bool) -> list[dict]:
    """``n`` lines: the spec's scripted cases first (in the first segment), random actions after."""
    lines: list[dict] = []
    if first_segment:
        cases = [dict(buttons=[0], new_buttons=[0]), dict(buttons=[0]), dict(buttons=[0], new_buttons=[0]), {}, {},
                 dict(hotbar=3), dict(keys=["hotbar.7"], hotbar=3), dict(hotbar=6),
                 dict(keys=["forward", "back", "left", "right", "sprint", "sneak"], hotbar=6),
                 dict(keys=["hotbar.2", "hotbar.4"], hotbar=6), dict(keys=["t", "f3"], hotbar=6),
                 dict(keys=["ESC"], hotbar=6), dict(keys=["swapHands"], hotbar=6), dict(buttons=[2], hotbar=6),
                 dict(keys=["inventory"], gui=True, x=1279.0, y=719.0, hotbar=6),
                 dict(gui=True, x=0.0, y=0.0, hotbar=6), dict(gui=True, x=1275.0, y=5.0, dx=3, hotbar=6)]
        cases += [dict(dx=c * s, hotbar=6) for c in _THRESHOLD_COUNTS for s in (1, -1)]
        cases += [dict(dy=c, hotbar=6) for c in _THRESHOLD_COUNTS]
        lines = [_line(i, **case) for i, case in enumerate(cases[:n])]
    hotbar = lines[-1]["hotbar"] if lines else 0
    for i in range(len(lines), n):
        keys = rng.sample(sorted(k for k in _KEYS if k not in ("ESC", "inventory")), rng.randint(0, 3))
        lines.append(_line(i, keys=keys, buttons=[0] if rng.random() < 0.3 else [],
                           dx=rng.choice([0, 0, 3, -9, 20, -40, 70]), dy=rng.choice([0, 0, 2, -16, 31]), hotbar=hotbar))
    if n > 5 and first_segment is False:
        lines[2]["mouse"], lines[2]["keyboard"] = None, None  # 6.x style null devices
        del lines[3]["hotbar"]
    return lines


def _expected(lines: list[dict]) -> list[dict]:
    """Per line: joint indices (float camera) and null flag, by the scalar reference above."""
    out, stuck, last_hotbar = [], False, 0
    for i, line in enumerate(lines):
        mouse = line.get("mouse") or {}
        keyboard = line.get("keyboard") or {}
        new = mouse.get("newButtons") or []
        stuck = (new == [0]) if i == 0 else (stuck and 0 not in new)
        buttons = [b for b in mouse.get("buttons") or [] if not (stuck and b == 0)]
        names = {v: k for k, v in _KEYS.items()}
        pressed = {names[k.removeprefix("key.keyboard.")] for k in keyboard.get("keys") or []
                   if k.removeprefix("key.keyboard.") in names}
        pressed |= {{0: "attack", 1: "use", 2: "pickItem"}[b] for b in buttons if b in (0, 1, 2)}
        dx, dy = mouse.get("dx", 0.0), mouse.get("dy", 0.0)
        null = not pressed and dx == 0 and dy == 0
        if "hotbar" in line:
            if line["hotbar"] != last_hotbar:
                pressed.add(f"hotbar.{line['hotbar'] + 1}")
            last_hotbar = line["hotbar"]
        b, c = _reference_indices(pressed, dy * 0.15, dx * 0.15)
        out.append({"buttons": b, "camera": c, "null": null})
    return out


def _write_video(path: Path, count: int, colours: list[tuple[int, int, int]]) -> None:
    with av.open(str(path), "w") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for i in range(count):
            frame = np.empty((HEIGHT, WIDTH, 3), dtype=np.uint8)
            frame[:] = colours[min(i, len(colours) - 1)]
            frame[:BLOCK] = barcode(i)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def synthesize_contractor(dest: str | Path, *, episodes: int = 2, frames: int = 60, seed: int = 0) -> Path:
    """Write ``episodes`` contractor sessions of two segments (5 minutes apart) of ``frames`` lines each.

    The first segment of the first session holds the scripted cases and one extra trailing video frame;
    the second segment of each session has null devices and a line without ``hotbar``; the first session's
    segments straddle an hour boundary (09:56 -> 10:01). A last segment continues the last session 30 minutes
    after it ended, so it must become an episode of its own.

    Returns:
        the path of ``index.json``; its ``basedir`` is a ``file://`` URI (percent-encoded, as VPT's are URLs).

    Raises:
        ValueError: ``episodes`` < 0, ``frames`` outside ``[1, 2**BITS - 2]`` (the barcode numbers every frame), or
            ``dest`` a file.
    """
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 0:
        raise ValueError(f"episodes must be an integer >= 0, got {episodes!r}")
    if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames < 2**BITS - 1:
        raise ValueError(f"frames must be an integer in [1, {2**BITS - 2}] (the barcode numbers them), got {frames!r}")
    rng = random.Random(seed)
    root = Path(dest)
    if root.exists() and not root.is_dir():
        raise ValueError(f"dest must be a directory (new or existing); {root} is a file")
    (root / VERSION).mkdir(parents=True, exist_ok=True)
    relpaths = []
    start = datetime(2022, 4, 21, 9, 56, 0)
    for e in range(episodes + 1):
        if e < episodes or e == 0:  # the last one continues the previous session after a 30-minute gap
            session = f"synthetic-{e}-{rng.getrandbits(48):012x}"
        segments = 2 if e < episodes else 1
        begin = start + timedelta(minutes=40 * e + (30 if e == episodes else 0))
        for s in range(segments):
            stem = f"{session}-{(begin + timedelta(minutes=5 * s)):%Y%m%d-%H%M%S}"
            lines = _script(frames, rng, first_segment=(e == 0 and s == 0))
            (root / VERSION / f"{stem}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
            (root / VERSION / f"{stem}-options.json").write_text("{}")
            expected = _expected(lines)
            (root / VERSION / f"{stem}.expected.json").write_text(json.dumps(expected))
            colours = [((x["buttons"] * 37) % 200 + 40, (x["camera"] * 53) % 200 + 40, 128) for x in expected]
            _write_video(root / VERSION / f"{stem}.mp4", frames + (e == 0 and s == 0), colours)
            relpaths.append(f"{VERSION}/{stem}")
    index = root / "index.json"
    index.write_text(json.dumps({"basedir": root.resolve().as_uri() + "/", "relpaths": relpaths}, indent=1))
    return index
