"""Import MineStudio's LMDB datasets (``minestudio-data-*``, or what its converter writes) into an EpisodeStore.

Layout (``vpt_data_spec.md`` 4.1): ``<src>/<folder>/<modality>-<N>/`` LMDB environments; video is read from the
folders named ``video`` or ``image``, actions from ``action`` (``contractor_info``, ``segment`` and ``event`` are
not needed). Each environment holds four pickled meta keys and one value per chunk under the key
``str((episode_idx, chunk_start))``: an MP4 for video, a pickled dict of numpy arrays for actions.

What lands in the store is what MineStudio 1.1.6's reader (``RawDataset`` over ``ImageKernelCallback`` and
``ActionKernelCallback``) yields as real, mask-1 frames:

- the episodes present in both modalities with equal ``num_frames``, in name order (the others are reported);
- frames ``[0, num_frames)`` of each: a last chunk may hold more frames than that (the reader never yields
  them), every other chunk holds exactly ``__chunk_size__`` frames;
- video decoded with PyAV from memory to RGB and, when its size differs, resized with bilinear interpolation
  (half-pixel centres, no antialiasing), within one level of the reader's OpenCV ``INTER_LINEAR``;
- actions read with a restricted unpickler (:func:`mstudio.data.safe_pickle.load_pickle`: numpy arrays and
  scalars and builtin containers only; any other global is refused before it can run, so a dataset cannot
  execute code) and mapped to the joint indices by :mod:`mstudio.actions`. As in MineStudio, a button a chunk
  lacks counts as unpressed and keys outside the action space are ignored; ``ESC``, ``swapHands`` and
  ``pickItem``, if present, are kept in ``env_buttons``.

A chunk that cannot be used (missing, undecodable, with the wrong number of frames, a refused pickle, invalid
actions) is skipped and reported as ``(where, reason)``, and its episode is split there: the frames before it
and after it become separate store episodes, never joined across the gap. Store ids are MineStudio's episode
names, with ``@<first frame>`` appended to a part that does not start at frame 0. Episodes already in the store
are skipped, so re-running resumes (and reports the same bad chunks again).

Each environment is opened once, read-only and without locking, and closed when the import ends (py-lmdb 3
refuses to open an environment twice in one process, which breaks MineStudio's ``RawDataModule.setup()``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import lmdb
import numpy as np
from tqdm.auto import tqdm

from mstudio.actions import env_to_agent
from mstudio.actions.contractor import EXTRA_BUTTONS
from mstudio.actions.mapping import BUTTONS
from mstudio.data.contractor_import import ENV_BUTTON_BITS, FLAG_NULL, FLAG_SEGMENT_START, ImportSummary, resize
from mstudio.data.safe_pickle import load_pickle
from mstudio.data.store import EpisodeStore
from mstudio.data.video_codec import decode_frames

__all__ = [
    "META_KEYS",
    "MODALITY_FOLDERS",
    "decode_action_chunk",
    "decode_video_chunk",
    "import_minestudio",
    "list_environments",
]

META_KEYS = ("__chunk_size__", "__chunk_infos__", "__num_episodes__", "__num_total_frames__")
#: Folder names (matched on the stem, as MineStudio does) read for each modality.
MODALITY_FOLDERS = {"video": ("video", "image"), "action": ("action",)}


def decode_action_chunk(data: bytes, where: str = "action chunk") -> dict[str, np.ndarray]:
    """One action chunk: ``camera`` float64 ``(n, 2)`` (finite degrees, pitch and yaw) and the 0/1 buttons.

    Keeps the 20 policy buttons (a missing one is all 0, as MineStudio's ``env2policy`` reads it) and ``ESC``,
    ``swapHands``, ``pickItem`` when present, as uint8 ``(n,)``; ignores other keys, as MineStudio does.

    Raises:
        UnsafePickleError: see :func:`mstudio.data.safe_pickle.load_pickle`.
        ValueError: not a dict of equally long numeric arrays with ``camera`` of shape ``(n, 2)`` (n >= 1).
    """
    chunk = load_pickle(data, where)
    if not isinstance(chunk, dict) or "camera" not in chunk:
        found = sorted(map(str, chunk)) if isinstance(chunk, dict) else type(chunk).__name__
        raise ValueError(f"{where}: an action chunk must be a dict with 'camera' and the button keys; found {found}")
    arrays = {}
    for key in ("camera", *BUTTONS, *EXTRA_BUTTONS):
        if key in chunk:
            value = np.asarray(chunk[key])
            if value.dtype.kind not in "biuf":
                raise ValueError(f"{where}: {key!r} must hold numbers; found dtype {value.dtype}")
            arrays[key] = value
    camera = arrays["camera"]
    n = len(camera) if camera.ndim else 0
    if camera.shape != (n, 2) or n == 0 or not np.isfinite(camera).all():
        raise ValueError(f"{where}: 'camera' must be finite degrees of shape (n, 2), n >= 1; found shape "
                         f"{camera.shape}" + ("" if np.isfinite(camera).all() else " with non-finite values"))
    for key, value in arrays.items():
        if key != "camera" and value.shape != (n,):
            raise ValueError(f"{where}: {key!r} must have shape ({n},) like 'camera'; found {value.shape}")
    out = {key: (arrays[key] != 0).astype(np.uint8) if key in arrays else np.zeros(n, np.uint8) for key in BUTTONS}
    out.update({key: (arrays[key] != 0).astype(np.uint8) for key in EXTRA_BUTTONS if key in arrays})
    out["camera"] = camera.astype(np.float64)
    return out


def decode_video_chunk(data: bytes, where: str = "video chunk") -> np.ndarray:
    """Decode one MP4 chunk from memory with PyAV: RGB uint8 ``(n, H, W, 3)`` in presentation order.

    PyAV's default colour conversion and threading, as MineStudio's reader decodes.

    Raises:
        ValueError: the bytes do not decode to at least one undamaged video frame.
    """
    return decode_frames(data, where)


def list_environments(src: str | Path) -> dict[str, list[Path]]:
    """Every entry in the video and action folders of the dataset ``src``, sorted, by modality.

    Raises:
        FileNotFoundError: ``src`` is not a directory.
        ValueError: it has no video (``video``/``image``) or no ``action`` folder.
    """
    root = Path(src)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory (a MineStudio dataset: video/ and action/ folders of "
                                f"LMDB environments)")
    found: dict[str, list[Path]] = {}
    for modality, names in MODALITY_FOLDERS.items():
        folders = [p for p in sorted(root.iterdir()) if p.is_dir() and p.stem in names]
        if not folders:
            present = sorted(p.name for p in root.iterdir())
            raise ValueError(f"{root} is not a MineStudio dataset: no {' or '.join(names)} folder "
                             f"(found {present[:10]})")
        found[modality] = sorted(entry for folder in folders for entry in folder.iterdir())
    return found


@dataclass(frozen=True)
class _Source:
    """One episode in one LMDB environment."""

    env: lmdb.Environment
    where: str  # the environment, relative to the dataset: "video/video-3"
    index: int  # episode_idx
    num_frames: int
    chunk_size: int


@dataclass(frozen=True)
class _Episode:
    name: str
    num_frames: int
    video: _Source
    action: _Source


def _is_count(value: Any, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _read_meta(env: lmdb.Environment, where: str) -> tuple[int, list[dict]]:
    """``(chunk_size, chunk_infos)`` of an environment; ``ValueError`` naming the key that is missing or invalid."""
    with env.begin() as txn:
        raw = {key: txn.get(key.encode()) for key in META_KEYS}
    missing = [key for key, value in raw.items() if value is None]
    if missing:
        raise ValueError(f"{where}: not a MineStudio LMDB environment: no meta key(s) {missing}")
    meta = {key: load_pickle(value, f"{where} key {key!r}") for key, value in raw.items()}
    for key in ("__chunk_size__", "__num_episodes__", "__num_total_frames__"):
        if not _is_count(meta[key], 1 if key == "__chunk_size__" else 0):
            raise ValueError(f"{where}: {key} must be a non-negative int (chunk size >= 1); found {meta[key]!r}")
    infos = meta["__chunk_infos__"]
    if not isinstance(infos, list):
        raise ValueError(f"{where}: __chunk_infos__ must be a list; found {type(infos).__name__}")
    for info in infos:
        if not (isinstance(info, dict) and isinstance(info.get("episode"), str) and _is_count(info.get("episode_idx"))
                and _is_count(info.get("num_frames"))):
            raise ValueError(f"{where}: each __chunk_infos__ entry must be a dict with 'episode' (str), "
                             f"'episode_idx' and 'num_frames' (non-negative ints); found {str(info)[:120]}")
    return meta["__chunk_size__"], infos


def _open_sources(root: Path, entries: list[Path], stack: contextlib.ExitStack,
                  skipped: list[tuple[str, str]]) -> dict[str, list[_Source]]:
    """Open each environment (read-only, no lock; closed by ``stack``): episode name -> where it is stored."""
    sources: dict[str, list[_Source]] = {}
    for path in entries:
        where = path.relative_to(root).as_posix()
        if not path.is_dir():
            skipped.append((where, "not an LMDB environment (a directory holding data.mdb)"))
            continue
        try:
            env = lmdb.open(str(path), readonly=True, lock=False, create=False, subdir=True)
        except lmdb.Error as error:
            skipped.append((where, f"cannot be opened as an LMDB environment ({error})"))
            continue
        stack.callback(env.close)
        try:
            chunk_size, infos = _read_meta(env, where)
        except (ValueError, lmdb.Error) as error:
            skipped.append((where, str(error)))
            continue
        for info in infos:
            source = _Source(env, where, info["episode_idx"], info["num_frames"], chunk_size)
            sources.setdefault(info["episode"], []).append(source)
    return sources


def _join(video: dict[str, list[_Source]], action: dict[str, list[_Source]],
          skipped: list[tuple[str, str]]) -> list[_Episode]:
    """The episodes MineStudio's reader would use (in both modalities, equal ``num_frames``), by name."""
    episodes = []
    for name in sorted(video.keys() | action.keys()):
        where = {m: [s.where for s in sources.get(name, [])] for m, sources in (("video", video), ("action", action))}
        if not where["video"] or not where["action"]:
            has = "video" if where["video"] else "action"
            skipped.append((name, f"only in {has} ({', '.join(where[has])}); MineStudio's reader uses an episode "
                                  f"only when every modality it reads has it"))
        elif len(where["video"]) > 1 or len(where["action"]) > 1:
            twice = [f"{m} ({', '.join(w)})" for m, w in where.items() if len(w) > 1]
            skipped.append((name, f"stored more than once in {' and '.join(twice)}; MineStudio's reader would "
                                  f"take whichever its directory listing gives last"))
        elif video[name][0].num_frames != action[name][0].num_frames:
            skipped.append((name, f"video has {video[name][0].num_frames} frames and action "
                                  f"{action[name][0].num_frames}; MineStudio's reader drops such episodes"))
        elif video[name][0].num_frames == 0:
            skipped.append((name, "has no frames"))
        else:
            episodes.append(_Episode(name, video[name][0].num_frames, video[name][0], action[name][0]))
    return episodes


class _BadChunk(Exception):
    def __init__(self, where: str, reason: str, stop: int):
        super().__init__(reason)
        self.where, self.reason, self.stop = where, reason, stop


def _chunk(source: _Source, start: int, decode: Callable[[bytes, str], Any], name: str) -> Any:
    """The decoded chunk of ``source`` at frame ``start``, its frame count checked; else :class:`_BadChunk`."""
    key = str((source.index, start))
    stop = min(start + source.chunk_size, source.num_frames)
    where = f"{source.where} key {key!r} ({name} frames {start}-{stop - 1})"
    try:
        with source.env.begin() as txn:
            data = txn.get(key.encode())
        if data is None:
            raise ValueError(f"{where}: the chunk is missing")
        value = decode(data, where)
        count = len(value["camera"] if isinstance(value, dict) else value)
        if count < stop - start or (count != source.chunk_size and start + source.chunk_size < source.num_frames):
            last = start + source.chunk_size >= source.num_frames
            raise ValueError(f"{where}: the chunk holds {count} frames; expected "
                             + (f"at least {stop - start} (the episode's last chunk)" if last else
                                f"{source.chunk_size} (__chunk_size__)"))
    except (ValueError, lmdb.Error) as error:
        raise _BadChunk(where, str(error), stop) from None
    return value


def _convert_actions(env: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Env actions of a chunk -> the store's action arrays (``buttons``, ``camera``, ``env_*``)."""
    agent = env_to_agent({key: env[key] for key in (*BUTTONS, "camera")})
    env_buttons = np.zeros(len(env["camera"]), dtype=np.uint32)
    for key in (*BUTTONS, *EXTRA_BUTTONS):
        if key in env:
            env_buttons |= env[key].astype(np.uint32) << ENV_BUTTON_BITS[key]
    return {
        "buttons": agent["buttons"][:, 0].astype(np.int16),
        "camera": agent["camera"][:, 0].astype(np.uint8),
        "env_buttons": env_buttons,
        "env_camera": env["camera"].astype(np.float32),
    }


class _Reader:
    """Frames and actions of one episode, span by span, each chunk decoded once (the last one is cached)."""

    def __init__(self, episode: _Episode, resolution: int):
        self.episode, self.resolution = episode, resolution
        self._cache: dict[str, tuple[int, Any]] = {}

    def _get(self, modality: str, start: int) -> Any:
        cached = self._cache.get(modality)
        if cached is None or cached[0] != start:
            source = getattr(self.episode, modality)
            try:
                value = _chunk(source, start, self._decode_video if modality == "video" else decode_action_chunk,
                               self.episode.name)
                value = _convert_actions(value) if modality == "action" else value
            except _BadChunk as bad:
                value = bad
            self._cache[modality] = cached = (start, value)
        if isinstance(cached[1], _BadChunk):
            raise cached[1]
        return cached[1]

    def _decode_video(self, data: bytes, where: str) -> np.ndarray:
        frames = decode_video_chunk(data, where)
        if frames.shape[1:3] != (self.resolution, self.resolution):
            frames = resize(frames, self.resolution)
        return frames

    def span(self, pos: int) -> tuple[int, dict[str, np.ndarray]]:
        """``(stop, arrays)`` for frames ``[pos, stop)``, up to the next chunk boundary; raises :class:`_BadChunk`."""
        video_start = pos - pos % self.episode.video.chunk_size
        action_start = pos - pos % self.episode.action.chunk_size
        stop = min(video_start + self.episode.video.chunk_size, action_start + self.episode.action.chunk_size,
                   self.episode.num_frames)
        frames = self._get("video", video_start)[pos - video_start:stop - video_start]
        actions = self._get("action", action_start)
        arrays = {key: value[pos - action_start:stop - action_start] for key, value in actions.items()}
        return stop, {"frames": frames, **arrays}


class _Part:
    """The frames of one store episode being gathered, in arrays sized for the rest of the source episode."""

    def __init__(self, start: int, capacity: int, resolution: int):
        self.start, self.length = start, 0
        self.arrays = {
            "frames": np.empty((capacity, resolution, resolution, 3), dtype=np.uint8),
            "buttons": np.empty(capacity, dtype=np.int16),
            "camera": np.empty(capacity, dtype=np.uint8),
            "env_buttons": np.empty(capacity, dtype=np.uint32),
            "env_camera": np.empty((capacity, 2), dtype=np.float32),
        }

    def put(self, data: dict[str, np.ndarray]) -> None:
        n = len(data["frames"])
        for key, value in data.items():
            self.arrays[key][self.length:self.length + n] = value
        self.length += n

    def append_to(self, store: EpisodeStore, episode: _Episode, summary: ImportSummary) -> None:
        if self.length == 0:
            return
        arrays = {key: value[:self.length] for key, value in self.arrays.items()}
        flags = ((arrays["buttons"] == 0) * FLAG_NULL).astype(np.uint8)
        flags[0] |= FLAG_SEGMENT_START
        part_id = _part_id(episode.name, self.start)
        store.append(part_id, {**arrays, "flags": flags}, {
            "source": "minestudio-lmdb",
            "episode": episode.name,
            "frames": [self.start, self.start + self.length],
            "num_frames": episode.num_frames,
            "video": episode.video.where,
            "action": episode.action.where,
        })
        summary.imported.append(part_id)
        summary.frames += self.length


def _part_id(name: str, start: int) -> str:
    return name if start == 0 else f"{name}@{start}"


def _import_episode(episode: _Episode, store: EpisodeStore, summary: ImportSummary, resolution: int,
                    bar: tqdm) -> None:
    """Append one MineStudio episode, split at every chunk that cannot be used (see the module docstring)."""
    reader = _Reader(episode, resolution)
    pos, part = 0, None
    while pos < episode.num_frames:
        if part is None:
            part_id = _part_id(episode.name, pos)
            if part_id in store:  # resume: a previous run imported this part
                summary.already_present.append(part_id)
                stop = pos + store.length(part_id)
                bar.update(stop - pos)
                pos = stop
                continue
            part = _Part(pos, episode.num_frames - pos, resolution)
        try:
            stop, data = reader.span(pos)
            part.put(data)
        except _BadChunk as bad:
            summary.skipped.append((bad.where, bad.reason))
            part.append_to(store, episode, summary)
            part, stop = None, bad.stop
        bar.update(stop - pos)
        pos = stop
    if part is not None:
        part.append_to(store, episode, summary)


@contextlib.contextmanager
def _open_dataset(src: Path, skipped: list[tuple[str, str]]) -> Iterator[list[_Episode]]:
    """The joinable episodes of ``src``, with every environment open until the block ends."""
    entries = list_environments(src)
    with contextlib.ExitStack() as stack:
        video = _open_sources(src, entries["video"], stack, skipped)
        action = _open_sources(src, entries["action"], stack, skipped)
        yield _join(video, action, skipped)


def import_minestudio(src: str | Path, store: EpisodeStore, *, resolution: int = 128,
                      progress: bool = True) -> ImportSummary:
    """Import a MineStudio LMDB dataset into ``store`` (see the module docstring for what is kept).

    Args:
        src: the dataset directory, holding ``video/`` (or ``image/``) and ``action/`` folders of
            ``<modality>-<N>`` LMDB environments.
        store: an :class:`EpisodeStore` whose ``image_size`` is ``(resolution, resolution)``.
        resolution: frame side after resizing (MineStudio's reader and VPT: 128).
        progress: show a tqdm progress bar over frames.

    Returns:
        an :class:`~mstudio.data.contractor_import.ImportSummary`: the store ids written (MineStudio's episode
        name, ``@<first frame>`` appended for a part after a bad chunk), the ids already present, ``(where,
        reason)`` for every environment, episode or chunk skipped, and the number of frames written.

    Raises:
        ValueError: ``resolution`` < 1 or a store of another image size, or ``src`` without a video or an action
            folder (checked before anything is read).
        FileNotFoundError: ``src`` is not a directory.
    """
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be an integer >= 1, got {resolution!r}")
    if tuple(store.image_size) != (resolution, resolution):
        raise ValueError(f"the store holds {tuple(store.image_size)} frames but resolution={resolution} was asked "
                         f"for; create the store with image_size=({resolution}, {resolution})")
    src = Path(src)
    summary = ImportSummary()
    with _open_dataset(src, summary.skipped) as episodes:
        total = sum(e.num_frames for e in episodes)
        with tqdm(total=total, unit="frame", desc="import-minestudio", disable=not progress) as bar:
            for episode in episodes:
                _import_episode(episode, store, summary, resolution, bar)
    return summary
