"""Synthetic MineStudio LMDB datasets in the real format, to test the MineStudio importer without downloads.

MineStudio 1.1.6 stores a dataset as ``<dataset>/<modality folder>/<modality>-<N>/`` LMDB environments
(``vpt_data_spec.md`` 4.1): four pickled meta keys (``__chunk_size__``, ``__chunk_infos__``,
``__num_episodes__``, ``__num_total_frames__``) and one value per chunk under the key ``str((episode_idx,
chunk_start))``. Its converter writes 32-frame chunks: a video chunk is a complete small MP4 (224x224 H.264
with B-frames, 20 fps, made by PyAV), an action chunk is ``pickle.dumps`` of a dict of the 20 policy buttons
(int64 ``(n,)``) and ``camera`` (float64 ``(n, 2)``, degrees pitch/yaw). It drops the frames that do not fill a
last chunk, so an episode shorter than one chunk is not written at all.

:func:`synthesize_minestudio` writes such a dataset. Every frame carries its index in the episode as a
barcode (16 black/white blocks along the top, read back by :func:`~mstudio.data.contractor_synth.read_barcode`),
episode lengths are not multiples of the chunk size, the video episodes are split over two LMDB environments
and the action episodes are stored in one, in the reverse order (so a reader must join them by name), and
``expected.json`` records, per episode, what a reader must yield: the stored length, the env actions, and the
joint indices from the contractor synth's independent scalar reference (not from :mod:`mstudio.actions`).
The lower-level writers (:func:`encode_video_chunk`, :func:`encode_action_chunk`, :func:`write_lmdb`) let
tests build damaged datasets chunk by chunk.
"""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path
from typing import Mapping, Sequence

import lmdb
import numpy as np

from mstudio.actions.mapping import BUTTONS
from mstudio.data.contractor_synth import BITS, _reference_indices
from mstudio.data.video_codec import encode_frames

__all__ = [
    "CHUNK_SIZE",
    "FPS",
    "SIZE",
    "TAILS",
    "barcode_frames",
    "encode_action_chunk",
    "encode_video_chunk",
    "synthesize_minestudio",
    "synthetic_actions",
    "write_lmdb",
]

CHUNK_SIZE = 32  # frames per chunk, as MineStudio's converter writes
SIZE = 224  # side of MineStudio's stored video chunks
FPS = 20
TAILS = ("drop", "keep")
_THRESHOLD_COUNTS = (0, 1, 2, 6, 7, 8, 15, 16, 29, 30, 51, 52, 54, 67, 500)  # mouse counts; x 0.15 = degrees


def barcode_frames(indices: Sequence[int], height: int = SIZE, width: int = SIZE, episode: int = 0) -> np.ndarray:
    """RGB frames whose top eighth encodes each index as 16 black/white blocks (bit 0 leftmost).

    Below the barcode: an episode-coloured background with a diagonal wave that moves from frame to frame,
    so resizing and inter-frame (B-frame) coding have edges and motion to work on.

    Returns:
        uint8 ``(len(indices), height, width, 3)``.
    """
    index = np.asarray(indices, dtype=np.int64)
    y, x = np.mgrid[0:height, 0:width]
    wave = np.sin((x[None] + y[None] + 3.0 * index[:, None, None]) / 9.0)  # [N, H, W]
    colour = np.array([(40 + 70 * episode) % 180 + 40, 100, (150 + 45 * episode) % 180 + 40], dtype=np.float64)
    frames = np.clip(colour + 40.0 * wave[..., None], 0, 255).astype(np.uint8)
    band = -(-height // 8)
    bits = (index[:, None] >> np.arange(BITS)) & 1  # [N, 16]
    block = (np.arange(width) * BITS) // width  # which bit each column shows
    frames[:, :band] = (255 * bits[:, block]).astype(np.uint8)[:, None, :, None]
    return frames


def synthetic_actions(count: int, rng: random.Random, scripted: bool = False) -> dict[str, np.ndarray]:
    """``count`` env actions as MineStudio's action pickles hold them: 20 buttons int64 ``(n,)``, camera float64.

    With ``scripted``, the first steps are the edge cases: null, inventory (alone and with other buttons),
    forward+back, left+right, sprint+sneak, two hotbar keys, attack+use+drop+jump, then camera motions at the
    quantizer's bin edges (mouse counts x 0.15 degrees, both signs, on yaw and pitch). Random actions follow.
    """
    pressed: list[set[str]] = []
    camera: list[tuple[float, float]] = []
    if scripted:
        cases = [set(), {"inventory"}, {"inventory", "forward", "attack", "hotbar.3"}, {"forward", "back"},
                 {"left", "right", "jump"}, {"sprint", "sneak"}, {"hotbar.2", "hotbar.7"},
                 {"attack", "use", "drop", "jump"}]
        pressed += cases
        camera += [(0.0, 0.0)] * 2 + [(3.0, -4.5)] + [(0.0, 0.0)] * (len(cases) - 3)
        for c in _THRESHOLD_COUNTS:
            for sign in (1, -1):
                pressed.append(set())
                camera.append((0.0, sign * c * 0.15))
        for c in _THRESHOLD_COUNTS:
            pressed.append({"forward"})
            camera.append((c * 0.15, -c * 0.15))
    choices = (0.0, 0.0, 0.0, 0.45, -1.35, 3.0, -6.0, 10.5, -30.0)
    while len(pressed) < count:
        pressed.append({b for b in BUTTONS if rng.random() < (0.02 if b == "inventory" else 0.12)})
        camera.append((rng.choice(choices), rng.choice(choices)))
    actions = {b: np.array([int(b in p) for p in pressed[:count]], dtype=np.int64) for b in BUTTONS}
    actions["camera"] = np.array(camera[:count], dtype=np.float64).reshape(count, 2)
    return actions


def encode_video_chunk(frames: np.ndarray, fps: int = FPS) -> bytes:
    """One video chunk as MineStudio's converter writes it: an in-memory MP4 of H.264 (libx264 defaults, so
    with B-frames), yuv420p, at the frames' own size, on one encoder thread (see
    :func:`~mstudio.data.video_codec.encode_frames` on reproducibility).

    Args:
        frames: uint8 ``(n, H, W, 3)`` RGB, H and W even.
    """
    return encode_frames(frames, container="mp4", codec="h264", rate=fps)


def encode_action_chunk(actions: Mapping[str, np.ndarray]) -> bytes:
    """One action chunk as MineStudio's converter writes it: ``pickle.dumps`` of a dict of numpy arrays."""
    return pickle.dumps({key: np.ascontiguousarray(value) for key, value in actions.items()})


def write_lmdb(path: str | Path, episodes: Sequence[tuple[str, int, Mapping[int, bytes]]],
               chunk_size: int = CHUNK_SIZE) -> None:
    """Write one MineStudio LMDB environment: the chunks of ``episodes`` and the four meta keys.

    Args:
        path: the environment's directory (created; must not hold an environment yet).
        episodes: ``(name, num_frames, {chunk_start: value bytes})``; ``episode_idx`` is the position here.
        chunk_size: the ``__chunk_size__`` to record.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    size = sum(len(v) for _, _, chunks in episodes for v in chunks.values())
    infos = [{"episode": name, "episode_idx": idx, "num_frames": n} for idx, (name, n, _) in enumerate(episodes)]
    meta = {"__chunk_size__": chunk_size, "__chunk_infos__": infos, "__num_episodes__": len(episodes),
            "__num_total_frames__": sum(n for _, n, _ in episodes)}
    env = lmdb.open(str(path), map_size=2 * size + (16 << 20), subdir=True)
    try:
        with env.begin(write=True) as txn:
            for idx, (_, _, chunks) in enumerate(episodes):
                for start, value in chunks.items():
                    txn.put(str((idx, start)).encode(), value)
            for key, value in meta.items():
                txn.put(key.encode(), pickle.dumps(value))
    finally:
        env.close()


def _episode_lengths(episodes: int, frames: int, chunk_size: int) -> list[int]:
    """``episodes`` lengths ``frames + 37 i`` (never multiples of the chunk size), then one shorter than a chunk."""
    lengths = []
    for i in range(episodes):
        n = frames + 37 * i
        lengths.append(n + 1 if n % chunk_size == 0 else n)
    return lengths + [chunk_size // 2 + 1]


def _expected(actions: Mapping[str, np.ndarray], count: int) -> dict:
    """What a reader must yield for the first ``count`` steps: env actions and joint indices (scalar reference)."""
    joint = [_reference_indices({b for b in BUTTONS if actions[b][i]}, *map(float, actions["camera"][i]))
             for i in range(count)]
    return {
        "buttons": [b for b, _ in joint],
        "camera": [c for _, c in joint],
        "env": {key: value[:count].tolist() for key, value in actions.items()},
    }


def synthesize_minestudio(dest: str | Path, *, episodes: int = 3, frames: int = 100, seed: int = 0,
                          tail: str = "drop", chunk_size: int = CHUNK_SIZE) -> Path:
    """Write a MineStudio-format LMDB dataset of synthetic episodes under ``dest``.

    Episode ``i`` has ``frames + 37 i`` steps (one more if that is a multiple of ``chunk_size``) and one more
    episode has ``chunk_size // 2 + 1``; the first holds the scripted action cases. Episodes are named like
    MineStudio's (the stem of their first contractor segment), so name order is episode order.

    Args:
        dest: the dataset directory to write (``video/``, ``action/``, ``expected.json``).
        episodes: episodes of the lengths above, besides the short one.
        frames: length of the first episode.
        seed: seeds the random actions and the session ids.
        tail: ``"drop"``: as MineStudio's converter, frames that do not fill a last chunk are not written (the
            short episode is not written at all); ``"keep"``: the last chunk holds the remainder and
            ``num_frames`` is the episode's true length (MineStudio's reader reads that too).
        chunk_size: frames per chunk.

    Returns:
        the dataset directory.

    Raises:
        ValueError: an argument out of range (named with its value).
    """
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 0:
        raise ValueError(f"episodes must be an integer >= 0, got {episodes!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 2:
        raise ValueError(f"chunk_size must be an integer >= 2, got {chunk_size!r}")
    if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= 2**BITS - 38 * (episodes + 1):
        raise ValueError(f"frames must be an integer in [1, {2**BITS - 38 * (episodes + 1)}] (the barcode numbers "
                         f"every frame of every episode), got {frames!r}")
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    rng = random.Random(seed)
    root = Path(dest)
    video: list[tuple[str, int, dict[int, bytes]]] = []
    action: list[tuple[str, int, dict[int, bytes]]] = []
    expected = []
    for e, length in enumerate(_episode_lengths(episodes, frames, chunk_size)):
        name = f"synthetic-{e:03d}-{rng.getrandbits(48):012x}-20220421-{9 + e // 60:02d}{e % 60:02d}00"
        stored = length // chunk_size * chunk_size if tail == "drop" else length
        actions = synthetic_actions(length, rng, scripted=(e == 0))
        expected.append({"name": name, "source_frames": length, "frames": stored, **_expected(actions, stored)})
        if stored == 0:
            continue  # MineStudio's converter writes no episode shorter than one chunk
        starts = range(0, stored, chunk_size)
        video.append((name, stored, {
            s: encode_video_chunk(barcode_frames(range(s, min(s + chunk_size, stored)), episode=e)) for s in starts}))
        action.append((name, stored, {
            s: encode_action_chunk({k: v[s:min(s + chunk_size, stored)] for k, v in actions.items()}) for s in starts}))
    half = (len(video) + 1) // 2
    write_lmdb(root / "video" / f"video-{half}", video[:half], chunk_size)
    if video[half:]:
        write_lmdb(root / "video" / f"video-{len(video)}", video[half:], chunk_size)
    write_lmdb(root / "action" / f"action-{len(action)}", action[::-1], chunk_size)
    (root / "expected.json").write_text(json.dumps({"chunk_size": chunk_size, "tail": tail, "episodes": expected}))
    return root
