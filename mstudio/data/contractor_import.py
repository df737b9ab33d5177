"""Import OpenAI VPT contractor recordings (``.mp4`` + ``.jsonl`` per segment) into an EpisodeStore.

Segments are grouped into episodes by session (``alias-session-date`` of the stem) and real time: a segment
continues the previous one when it starts at most ``max_gap`` after the previous one ended (MineStudio compares
HHMMSS as integers, which splits episodes at every hour boundary). Per segment: the jsonl is parsed, the video
decoded with PyAV (RGB), frame and line counts checked (``n_lines <= n_frames <= n_lines + 1``; the extra
trailing frame is dropped), actions converted as MineStudio does (:func:`mstudio.actions.contractor_to_env`),
the mouse cursor drawn where a GUI is open (the recorder does not capture it, but the game renders one), the
frames resized, and the joint indices and flags computed (null: ``buttons == 0``, after mapping).

Every jsonl line is checked before conversion (:func:`~mstudio.actions.contractor.check_line`: types,
``hotbar`` 0-8, finite mouse numbers of sane size). A segment that cannot be used (unreadable or invalid jsonl,
a video without a video stream or with the wrong frame count, ...) is skipped and reported as ``(mp4 path,
reason)``, the reason naming the file, line and key; its session is split there: the segments before it and
those after it become separate episodes, never joined across the gap. Everything else is imported. Episodes
already in the store are skipped, so re-running resumes (and skips the same bad segments again); so is an
episode another import of the same data added meanwhile.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any, Iterable
from urllib.parse import unquote, urlparse

import av
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mstudio.actions import contractor_to_env, env_to_agent
from mstudio.actions.contractor import CAMERA_MODES, EXTRA_BUTTONS, check_line, check_lines
from mstudio.actions.mapping import BUTTONS
from mstudio.data._base import Store
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
    "check_lines",
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


def _base_dir(base: Any, index_path: Path) -> Path:
    """The local directory a VPT index's ``basedir`` names: a ``file://`` URI (percent-decoded), or a path
    (absolute, or relative to the index file's directory; ``""`` is that directory). Any other URL (VPT's own
    ``https://`` basedir) means the segments were downloaded next to the index file."""
    if not isinstance(base, str):
        raise ValueError(f"{index_path}: 'basedir' must be a string, got {type(base).__name__}")
    if base.startswith("file://"):
        return Path(unquote(urlparse(base).path))
    return index_path.parent if "://" in base else index_path.parent / base


def _read_index(path: Path) -> tuple[Path, list[str]]:
    """``(base directory, relpaths)`` of a VPT index JSON; raises ``ValueError`` saying what is wrong with it."""
    try:
        index = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a VPT index JSON (a directory of segments or an index.json with "
                         f"'basedir' and 'relpaths' is expected): {error}") from None
    relpaths = index.get("relpaths") if isinstance(index, dict) else None
    if not isinstance(relpaths, list) or not all(isinstance(r, str) and r for r in relpaths):
        raise ValueError(f"{path}: 'relpaths' must be a list of non-empty strings, "
                         f"got {type(relpaths).__name__ if relpaths is not None else 'no relpaths'}")
    if not relpaths:
        raise ValueError(f"{path} lists no segments: 'relpaths' is empty")
    return _base_dir(index.get("basedir", ""), path), relpaths


def _clean_relpaths(relpaths: list[str], base_dir: Path, skipped: list[tuple[str, str]]) -> list[str]:
    """``relpaths`` normalised (``a/./b`` is ``a/b``), in order, without repeats and without paths that leave
    ``base_dir``; each repeat (imported once) and each path outside is reported in ``skipped``."""
    inside = []
    for relpath in relpaths:
        path = PurePosixPath(relpath)
        if path.is_absolute() or ".." in path.parts:
            skipped.append((str(base_dir / f"{relpath}.mp4"),
                            f"relpath must be a relative path inside basedir, without '..'; got {relpath!r}"))
        else:
            inside.append(path.as_posix())
    for relpath, count in Counter(inside).items():
        if count > 1:
            skipped.append((str(base_dir / f"{relpath}.mp4"), f"listed {count} times in the index; imported once"))
    return list(dict.fromkeys(inside))


def _drop_repeats(segments: list[Segment], skipped: list[tuple[str, str]]) -> list[Segment]:
    """``segments`` (sorted by session and start) without a second segment of the same session and start time
    (one recording under two relpaths, e.g. two recorder-version folders); each one dropped is reported."""
    kept: list[Segment] = []
    for segment in segments:
        if kept and (segment.session, segment.start) == (kept[-1].session, kept[-1].start):
            skipped.append((str(segment.mp4), f"same session and start time as {kept[-1].relpath} (one recording "
                                              f"listed twice); imported once"))
        else:
            kept.append(segment)
    return kept


def discover(src: str | Path) -> tuple[list[Segment], list[tuple[str, str]]]:
    """Segments under a directory, or listed by a VPT index JSON (``basedir`` + ``relpaths``, local files).

    Returns the segments sorted by session and time, and ``(file, reason)`` for what could not be used: a
    relpath listed more than once or leading outside ``basedir``, a stem that is not a contractor name, an
    ``.mp4`` or ``.jsonl`` without its partner (or that is not a file), a second copy of one recording.

    Raises:
        FileNotFoundError: ``src`` does not exist.
        ValueError: ``src`` is a file but not a readable VPT index JSON listing segments, or a directory without
            any ``.mp4`` or ``.jsonl`` file.
    """
    src = Path(src)
    skipped: list[tuple[str, str]] = []
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist (a directory of segments or a VPT index JSON is expected)")
    if src.is_file():
        base_dir, relpaths = _read_index(src)
        relpaths = _clean_relpaths(relpaths, base_dir, skipped)
    else:
        base_dir = src
        stems = {p.relative_to(src).with_suffix("").as_posix() for p in (*src.rglob("*.jsonl"), *src.rglob("*.mp4"))}
        relpaths = sorted(stems)
        if not relpaths:
            raise ValueError(f"{src} holds no contractor segments: expected <version>/<alias>-<session>-<YYYYMMDD>-"
                             f"<HHMMSS>.mp4 files, each with its .jsonl, or give a VPT index JSON")
    segments = []
    for relpath in relpaths:
        jsonl, mp4 = base_dir / f"{relpath}.jsonl", base_dir / f"{relpath}.mp4"
        parsed = _parse_stem(Path(relpath).name)
        if parsed is None:
            name = jsonl if jsonl.exists() else mp4
            skipped.append((str(name), "file name is not <alias>-<session>-<YYYYMMDD>-<HHMMSS>"))
        elif not jsonl.is_file() or not mp4.is_file():
            bad = [p for p in (mp4, jsonl) if not p.is_file()]
            what = "is not a file" if bad[0].exists() else "missing"
            skipped.append((str(bad[0]), f"{what} (a segment needs both a .mp4 and a .jsonl file)"))
        else:
            segments.append(Segment(relpath, mp4, jsonl, *parsed))
    segments.sort(key=lambda s: (s.session, s.start))
    return _drop_repeats(segments, skipped), skipped


def _read_lines(path: Path) -> list[dict]:
    """The parsed, checked lines of a segment's jsonl; raises ``ValueError`` naming the file and line."""
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a byte-order mark, if an editor added one, is not a line
    except OSError as error:
        raise ValueError(f"{path.name} cannot be read ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path.name} is not UTF-8 text (byte {error.start}: {error.reason})") from None
    lines = []
    for number, text_line in enumerate(text.splitlines(), start=1):
        if text_line.strip():
            try:
                lines.append(json.loads(text_line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path.name} line {number} is not valid JSON ({error.msg})") from None
            check_line(lines[-1], f"{path.name} line {number}")
    if not lines:
        raise ValueError(f"{path.name} has no action lines")
    return lines


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path.name} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    if not frames:
        raise ValueError(f"{path.name} has no video frames")
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
        raise ValueError(f"{segment.mp4.name}: video cannot be decoded ({error})") from None
    if not len(lines) <= len(frames) <= len(lines) + 1:
        raise ValueError(f"{segment.mp4.name} has {len(frames)} video frames for {len(lines)} action lines in "
                         f"{segment.jsonl.name}; expected as many frames as lines, or one more")
    if frames.shape[1:3] != SOURCE_SIZE:
        raise ValueError(f"{segment.mp4.name} is {frames.shape[2]}x{frames.shape[1]}; contractor videos are 640x360")
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

    Raises:
        TypeError: ``store`` is not an :class:`EpisodeStore` or ``max_gap`` not a ``timedelta``.
        ValueError: ``resolution`` < 1, an unknown ``camera``, a negative ``max_gap``, a store of another image
            size, or ``src`` a file that is not a VPT index JSON or a directory without segments (all checked
            before any segment is read).
        FileNotFoundError: ``src`` does not exist.
    """
    _check_arguments(store, resolution, camera, max_gap)
    segments, skipped = discover(src)
    summary = ImportSummary(skipped=skipped)
    bar = tqdm(total=len(segments), unit="segment", desc="import-vpt", disable=not progress)
    for group in _episodes(segments, max_gap):
        _import_episode(group, store, summary, resolution, camera, bar)
    bar.close()
    return summary


def _check_arguments(store: EpisodeStore, resolution: int, camera: str, max_gap: timedelta) -> None:
    """Raise ``TypeError``/``ValueError`` for arguments every segment would fail on, before anything is read."""
    if not isinstance(store, Store):
        raise TypeError(f"store must be an EpisodeStore or a ShardedStore (open_store(path) or create_store(path, "
                        f"(resolution, resolution))); got {type(store).__name__} {store!r}")
    if not isinstance(max_gap, timedelta):
        raise TypeError(f"max_gap must be a datetime.timedelta; got {type(max_gap).__name__} {max_gap!r}")
    if max_gap < timedelta(0):
        raise ValueError(f"max_gap must be >= 0; got {max_gap} ({max_gap.total_seconds():g} s)")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be an integer >= 1, got {resolution!r}")
    if camera not in CAMERA_MODES:
        raise ValueError(f"camera must be one of {CAMERA_MODES}, got {camera!r}")
    if tuple(store.image_size) != (resolution, resolution):
        raise ValueError(f"the store holds {store.image_size} frames but resolution={resolution} was asked for")


def _import_episode(
    group: list[Segment], store: EpisodeStore, summary: ImportSummary, resolution: int, camera: str, bar: tqdm
) -> None:
    """Append one session's consecutive segments as episodes, split at every segment that cannot be used.

    A bad segment is reported in ``summary.skipped`` and never bridged: the segments before it form one
    episode, those after it another (its id is its first segment's relpath, its first frame flagged
    ``FLAG_SEGMENT_START``). A segment already in the store (a previous run) also ends the pending episode.
    """
    pending: list[tuple[Segment, dict]] = []
    done: set[str] = set()  # segments of episodes a previous run imported
    for segment in group:
        bar.update(1)
        if segment.relpath in done:
            continue
        if segment.relpath in store:  # resume: this episode is in the store already
            _append(store, pending, summary)
            pending = []
            summary.already_present.append(segment.relpath)
            done.update(_segments_of(store, segment.relpath))
            continue
        try:
            pending.append((segment, convert_segment(segment, resolution, camera)))
        except ValueError as error:
            summary.skipped.append((str(segment.mp4), str(error)))
            _append(store, pending, summary)  # the episode is split at the unusable segment
            pending = []
    _append(store, pending, summary)


def _segments_of(store: EpisodeStore, episode_id: str) -> list[str]:
    """The segment relpaths an episode already in ``store`` holds (just its id for one another tool wrote)."""
    segments = store.info(episode_id).get("segments")
    return [s for s in segments if isinstance(s, str)] if isinstance(segments, list) else [episode_id]


def _append(store: EpisodeStore, pending: list[tuple[Segment, dict]], summary: ImportSummary) -> None:
    """Append the converted segments ``pending`` as one episode (none: nothing) and count it in ``summary``."""
    if not pending:
        return
    episode_id = pending[0][0].relpath
    arrays = {key: np.concatenate([a[key] for _, a in pending]) for key in pending[0][1]}
    offsets = np.cumsum([0] + [len(a["buttons"]) for _, a in pending[:-1]]).tolist()
    try:
        store.append(episode_id, arrays, {
            "source": "vpt-contractor",
            "segments": [s.relpath for s, _ in pending],
            "segment_starts": offsets,
            "recorder_version": pending[0][0].version,
        })
    except ValueError:
        if episode_id not in store:  # append re-read the index: present now means another import added it
            raise
        summary.already_present.append(episode_id)
        return
    summary.imported.append(episode_id)
    summary.frames += len(arrays["buttons"])
