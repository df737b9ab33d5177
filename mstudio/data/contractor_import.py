"""Import OpenAI VPT contractor recordings (``.mp4`` + ``.jsonl`` per segment) into an EpisodeStore.

Segments are grouped into episodes by session (``alias-session-date`` of the stem) and real time: a segment
continues the previous one when it starts at most ``max_gap`` after the previous one ended (MineStudio compares
HHMMSS as integers, which splits episodes at every hour boundary). Per segment: the jsonl is parsed, the video
decoded with PyAV (RGB), frame and line counts checked (``n_lines <= n_frames <= n_lines + 1``; the extra
trailing frame is dropped), actions converted as MineStudio does (:func:`mstudio.actions.contractor_to_env`),
the mouse cursor drawn where a GUI is open (the recorder does not capture it, but the game renders one), the
frames resized, and the joint indices and flags computed (null: ``buttons == 0``, after mapping).

A segment that cannot be read is skipped and reported with the reason, and its episode is split there;
everything else is imported. Episodes already in the store are skipped, so re-running resumes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Iterable

import av
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mstudio.actions import contractor_to_env, env_to_agent
from mstudio.actions.contractor import EXTRA_BUTTONS
from mstudio.actions.mapping import BUTTONS
from mstudio.data.store import EpisodeStore

__all__ = [
    "CURSOR_ALPHA",
    "CURSOR_RGB",
    "ENV_BUTTON_BITS",
    "FLAG_ATTACK_STUCK_REMOVED",
    "FLAG_GUI_OPEN",
    "FLAG_HOTBAR_SYNTHESIZED",
    "FLAG_NULL",
    "FLAG_SEGMENT_START",
    "SOURCE_SIZE",
    "ImportSummary",
    "Segment",
    "convert_segment",
    "discover",
    "draw_cursor",
    "import_vpt",
    "resize",
]

#: Bits of ``env_buttons``: the 20 policy buttons in ``BUTTONS`` order, then ESC, swapHands, pickItem.
ENV_BUTTON_BITS = {name: bit for bit, name in enumerate((*BUTTONS, *EXTRA_BUTTONS))}
#: Bits of ``flags``.
FLAG_NULL, FLAG_GUI_OPEN, FLAG_HOTBAR_SYNTHESIZED, FLAG_ATTACK_STUCK_REMOVED, FLAG_SEGMENT_START = (1, 2, 4, 8, 16)
SOURCE_SIZE = (360, 640)  # contractor video, height x width; cursor coordinates are in a 720x1280 window


@dataclass
class Segment:
    relpath: str  # "<version>/<stem>"
    mp4: Path
    jsonl: Path
    session: str
    start: datetime

    @property
    def version(self) -> str:
        return self.relpath.split("/")[0] if "/" in self.relpath else ""


@dataclass
class ImportSummary:
    """What an import did: episode ids written, ids already present, and ``(file, reason)`` of skipped segments."""

    imported: list[str] = field(default_factory=list)
    already_present: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    frames: int = 0


def _parse_stem(stem: str) -> tuple[str, datetime] | None:
    parts = stem.rsplit("-", 2)
    if len(parts) != 3:
        return None
    try:
        return parts[0], datetime.strptime(f"{parts[1]}-{parts[2]}", "%Y%m%d-%H%M%S")
    except ValueError:
        return None


def discover(src: str | Path) -> tuple[list[Segment], list[tuple[str, str]]]:
    """Segments under a directory, or listed by a VPT index JSON (``basedir`` + ``relpaths``, local files).

    Returns the segments sorted by session and time, and ``(file, reason)`` for what could not be used.
    """
    src = Path(src)
    skipped: list[tuple[str, str]] = []
    if src.is_file():
        index = json.loads(src.read_text())
        base = index.get("basedir", "")
        base_dir = Path(base.removeprefix("file://")) if base.startswith(("file://", "/")) else src.parent
        relpaths = list(index["relpaths"])
    else:
        base_dir = src
        relpaths = sorted(str(p.relative_to(src).with_suffix("")) for p in src.rglob("*.jsonl"))
    segments = []
    for relpath in relpaths:
        jsonl, mp4 = base_dir / f"{relpath}.jsonl", base_dir / f"{relpath}.mp4"
        parsed = _parse_stem(Path(relpath).name)
        if parsed is None:
            skipped.append((str(jsonl), "file name is not <alias>-<session>-<YYYYMMDD>-<HHMMSS>"))
        elif not jsonl.exists() or not mp4.exists():
            skipped.append((str(mp4 if jsonl.exists() else jsonl), "missing (needs both .mp4 and .jsonl)"))
        else:
            segments.append(Segment(relpath, mp4, jsonl, *parsed))
    segments.sort(key=lambda s: (s.session, s.start))
    return segments, skipped


def _read_lines(path: Path) -> list[dict]:
    lines = []
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if text.strip():
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError as error:
                raise ValueError(f"line {number} is not valid JSON ({error.msg})") from None
    if not lines:
        raise ValueError("no action lines")
    return lines


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    if not frames:
        raise ValueError("no video frames")
    return np.stack(frames)


def _cursor() -> tuple[np.ndarray, np.ndarray]:
    """A 16x16 white arrow with a black outline, hotspot at its top-left: (RGB uint8, alpha float)."""
    alpha = np.zeros((16, 16))
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    for y in range(16):
        width = min(y + 1, 11 - max(0, y - 10))  # a triangle that narrows into a stem
        if width > 0:
            alpha[y, :width] = 1
            rgb[y, 1:max(1, width - 1)] = 255
    rgb[-1] = 0
    return rgb, alpha


CURSOR_RGB, CURSOR_ALPHA = _cursor()


def draw_cursor(frame: np.ndarray, x: float, y: float) -> None:
    """Alpha-blend the cursor into ``frame`` (uint8 ``(360, 640, 3)``) at window pixel ``(x, y)``, clipped."""
    scale = frame.shape[0] / 720
    left, top = int(x * scale), int(y * scale)
    h = max(0, min(16, frame.shape[0] - top))
    w = max(0, min(16, frame.shape[1] - left))
    if h == 0 or w == 0 or left < 0 or top < 0:
        return
    region = frame[top:top + h, left:left + w].astype(np.float64)
    a = CURSOR_ALPHA[:h, :w, None]
    frame[top:top + h, left:left + w] = (a * CURSOR_RGB[:h, :w] + (1 - a) * region).round().astype(np.uint8)


def resize(frames: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize (half-pixel centres, no antialiasing, as OpenCV's ``INTER_LINEAR``) to ``size``^2."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def convert_segment(segment: Segment, resolution: int, camera: str) -> dict[str, np.ndarray]:
    """One segment's arrays in the store's layout; raises ``ValueError`` with the reason it cannot be used."""
    lines = _read_lines(segment.jsonl)
    try:
        frames = _decode(segment.mp4)
    except (av.FFmpegError, OSError) as error:
        raise ValueError(f"video cannot be decoded ({error})") from None
    if not len(lines) <= len(frames) <= len(lines) + 1:
        raise ValueError(f"{len(frames)} video frames for {len(lines)} action lines (needs n_lines or n_lines + 1)")
    if frames.shape[1:3] != SOURCE_SIZE:
        raise ValueError(f"video is {frames.shape[2]}x{frames.shape[1]}, contractor videos are 640x360")
    frames = frames[: len(lines)]
    actions = contractor_to_env(lines, camera=camera)
    for i in np.flatnonzero(actions.gui_open):
        draw_cursor(frames[i], *actions.cursor[i])
    agent = env_to_agent(actions.env)
    buttons = agent["buttons"][:, 0]
    env_buttons = np.zeros(len(lines), dtype=np.uint32)
    for name, values in {**{b: actions.env[b] for b in BUTTONS}, **actions.extra}.items():
        env_buttons |= values.astype(np.uint32) << ENV_BUTTON_BITS[name]
    flags = (
        (buttons == 0) * FLAG_NULL
        + actions.gui_open * FLAG_GUI_OPEN
        + actions.hotbar_synthesized * FLAG_HOTBAR_SYNTHESIZED
        + actions.attack_stuck_removed * FLAG_ATTACK_STUCK_REMOVED
    ).astype(np.uint8)
    flags[0] |= FLAG_SEGMENT_START
    return {
        "frames": resize(frames, resolution),
        "buttons": buttons.astype(np.int16),
        "camera": agent["camera"][:, 0].astype(np.uint8),
        "env_buttons": env_buttons,
        "env_camera": actions.env["camera"].astype(np.float32),
        "flags": flags,
    }


def _episodes(segments: list[Segment], max_gap: timedelta) -> Iterable[list[Segment]]:
    """Consecutive segments of a session whose starts are at most 5 minutes + ``max_gap`` apart."""
    group: list[Segment] = []
    for segment in segments:
        if group and (segment.session != group[-1].session or segment.start - group[-1].start > timedelta(minutes=5) + max_gap):
            yield group
            group = []
        group.append(segment)
    if group:
        yield group


def import_vpt(
    src: str | Path,
    store: EpisodeStore,
    *,
    resolution: int = 128,
    camera: str = "float",
    max_gap: timedelta = timedelta(seconds=60),
    progress: bool = True,
) -> ImportSummary:
    """Import every segment under ``src`` (a directory or a VPT index JSON) into ``store``.

    Args:
        src: where the segments are.
        store: an :class:`EpisodeStore` whose ``image_size`` is ``(resolution, resolution)``.
        resolution: frame side after resizing (VPT: 128).
        camera: ``"float"`` (MineStudio) or ``"vpt_int"`` (VPT's truncating scripts).
        max_gap: slack beyond the 5-minute segment length for consecutive segments of one episode.
        progress: show a tqdm progress bar over segments.

    Returns:
        an :class:`ImportSummary`. An episode's id is its first segment's relpath.
    """
    if tuple(store.image_size) != (resolution, resolution):
        raise ValueError(f"the store holds {store.image_size} frames but resolution={resolution} was asked for")
    segments, skipped = discover(src)
    summary = ImportSummary(skipped=skipped)
    bar = tqdm(total=len(segments), unit="segment", desc="import-vpt", disable=not progress)
    for group in _episodes(segments, max_gap):
        pending: list[tuple[Segment, dict]] = []
        done: set[str] = set()  # segments of episodes a previous run imported
        for segment in group:
            bar.update(1)
            if segment.relpath in done:
                continue
            if not pending and segment.relpath in store:  # resume: this episode is in the store already
                summary.already_present.append(segment.relpath)
                done.update(store.info(segment.relpath)["segments"])
                continue
            try:
                pending.append((segment, convert_segment(segment, resolution, camera)))
            except ValueError as error:
                summary.skipped.append((str(segment.mp4), str(error)))
                _append(store, pending, summary)  # the episode is split at the unreadable segment
                pending = []
        _append(store, pending, summary)
    bar.close()
    return summary


def _append(store: EpisodeStore, pending: list[tuple[Segment, dict]], summary: ImportSummary) -> None:
    if not pending:
        return
    episode_id = pending[0][0].relpath
    arrays = {key: np.concatenate([a[key] for _, a in pending]) for key in pending[0][1]}
    offsets = np.cumsum([0] + [len(a["buttons"]) for _, a in pending[:-1]]).tolist()
    store.append(episode_id, arrays, {
        "source": "vpt-contractor",
        "segments": [s.relpath for s, _ in pending],
        "segment_starts": offsets,
        "recorder_version": pending[0][0].version,
    })
    summary.imported.append(episode_id)
    summary.frames += len(arrays["buttons"])
