"""Windows of ``T`` steps over the episodes of a store, as items in ``design.md``'s batch layout."""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from mstudio.actions import CAMERA_NULL
from mstudio.data._base import Store
from mstudio.data._checks import integer
from mstudio.data.contractor_import import FLAG_NULL

__all__ = ["WindowDataset"]

#: Steps whose frames lie at most this far apart are read as one span of the store (the frames between them
#: are read and dropped): a read call costs more than copying a few frames, and a compressed store decodes whole
#: chunks anyway. A longer gap (a run of null frames, a player idle for seconds) starts a new read instead, so a
#: window never reads more than ``_MAX_GAP - 1`` unused frames per step.
_MAX_GAP = 32
_READ = ("frames", "buttons", "camera")  # the arrays a window holds


class WindowDataset(torch.utils.data.Dataset):
    """Non-overlapping windows of every episode, MineStudio's ``RawDataset`` items with its bugs fixed.

    An episode's *steps* are its frames, less the null ones with ``drop_null``, then every ``s``-th of those
    (``s = skip_frame``; null frames are dropped first, as in MineStudio, whose optional null filter runs at
    conversion and its ``skip_frame`` when reading). Window ``k`` holds steps ``k*T ... k*T + T-1``; without
    ``drop_null`` those are frames ``k*T*s, k*T*s + s, ..., k*T*s + (T-1)*s``. Steps past the episode's end are
    padding: black frames, the null action (buttons 0, camera 60) and ``mask`` 0. ``timestamp`` counts *steps*
    (``k*T + arange(T)``), not frames, so consecutive windows of an episode continue (``timestamp[0] ==
    previous timestamp[-1] + 1``) for any ``skip_frame`` and with ``drop_null``: the train step's memory carry
    then works on filtered episodes too (MineStudio's frame-index timestamps jump by ``s`` and reset the memory
    every batch). :meth:`frame_numbers` gives the frames a window reads. An episode with no step (all of its
    frames null) has no window.

    Null frames: a frame is null when bit 0 of its ``flags`` is set (``contractor_import.FLAG_NULL``). mstudio's
    importers set it exactly when the joint buttons index is 0, which also fixes the camera at its "did not move"
    index 60: no button and no camera motion, VPT's null action checked in the policy's action space as the VPT
    paper does (VPT's ``agent.py``, ``check_if_null``: factored buttons all 0 and both camera bins at the zero
    bin; pressing forward and back together, or left and right, alone maps to that joint action and counts as
    null here). VPT's released ``data_loader.py`` instead drops raw lines with no mapped key, no mouse motion
    and no mouse button, always; MineStudio 1.1.x has no load-time filter, only an optional no-op filter when
    converting (``ActionConvertCallback.gen_frame_skip_flags``: camera exactly 0 and every button 0), off by
    default. ``drop_null`` is therefore off by default (MineStudio parity). ``fill_store`` episodes have no
    flag set, so nothing is dropped from them.

    An item holds only tensors, so batches of them stay tensors through collation and ``pin_memory``:
    ``image`` uint8 ``(T, H, W, 3)``, ``agent_action = {"buttons": long (T, 1), "camera": long (T, 1)}``,
    ``timestamp`` long ``(T,)``, ``mask`` uint8 ``(T,)`` and ``episode_index`` long ``()``, the position of
    the window's episode in :attr:`episodes` (``dataset.episodes[int(item["episode_index"])]`` is its id).

    Args:
        store: the episodes (an :class:`~mstudio.data.EpisodeStore` or :class:`~mstudio.data.ShardedStore`).
        window: ``T``, steps per window (an integer >= 1).
        episodes: the episode ids to use, in this order, each once (default: all, in store order).
        skip_frame: ``s`` above (an integer >= 1).
        drop_null: leave out null frames (see above). The kept frames are found once, here, from the ``flags``
            array alone (``int32``, 4 bytes per kept frame, shared with forked loader workers); a window then
            reads the span from its first to its last frame (split where null runs leave gaps over 32 frames).
    """

    def __init__(self, store: Store, window: int, episodes: Sequence[str] | None = None, skip_frame: int = 1,
                 *, drop_null: bool = False):
        if not isinstance(store, Store):
            raise TypeError(f"store must be an EpisodeStore or a ShardedStore (open one with open_store(path)); got "
                            f"{type(store).__name__} {store!r:.80}")
        window, skip_frame = integer("window", window, 1), integer("skip_frame", skip_frame, 1)
        if not isinstance(drop_null, (bool, np.bool_)):
            raise TypeError(f"drop_null must be a bool; got {type(drop_null).__name__} {drop_null!r}")
        self.store, self.window, self.skip_frame, self.drop_null = store, window, skip_frame, bool(drop_null)
        self.episodes = _episode_list(store, episodes)
        if self.drop_null:
            self._kept, self._kept_start = _kept_frames(store, self.episodes)
            counts = np.diff(self._kept_start).tolist()
        else:
            counts = [store.length(e) for e in self.episodes]
        steps = [math.ceil(n / skip_frame) for n in counts]
        #: windows per episode, and (episode position, window number) of every item
        self.windows_per_episode = [math.ceil(n / window) for n in steps]
        self.items = [(i, k) for i, count in enumerate(self.windows_per_episode) for k in range(count)]
        self.first_item = np.concatenate([[0], np.cumsum(self.windows_per_episode)[:-1]]).astype(int).tolist()

    def __len__(self) -> int:
        return len(self.items)

    def frame_numbers(self, index: int) -> np.ndarray:
        """The frames (numbers inside its episode, int64 ``(n,)``, ``n <= T``, increasing) window ``index`` reads."""
        return self._frames(*self.items[self._check(index)])

    def _check(self, index: int) -> int:
        index = integer("index", index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"window {index} is outside the dataset, which has {len(self)} windows")
        return index

    def _frames(self, position: int, k: int) -> np.ndarray:
        """The frame numbers of the steps of window ``k`` of episode ``self.episodes[position]``."""
        T, s = self.window, self.skip_frame
        if not self.drop_null:
            return np.arange(k * T * s, min((k + 1) * T * s, self.store.length(self.episodes[position])), s)
        kept = self._kept[self._kept_start[position]:self._kept_start[position + 1]]
        return kept[k * T * s:(k + 1) * T * s:s].astype(np.int64)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
        """Window ``index`` (negative counts from the end) as a dict of tensors (layout in the class docstring)."""
        position, k = self.items[self._check(index)]
        T = self.window
        frames = self._frames(position, k)
        n = len(frames)
        image = np.zeros((T, *self.store.image_size, 3), dtype=np.uint8)
        buttons = np.zeros(T, dtype=np.int64)
        camera = np.full(T, CAMERA_NULL, dtype=np.int64)
        # one read per run of nearby frames (see _MAX_GAP); a plain skip_frame window is a single run
        breaks = np.flatnonzero(np.diff(frames) > max(_MAX_GAP, self.skip_frame)) + 1
        for lo, hi in zip([0, *breaks.tolist()], [*breaks.tolist(), n]):
            first = int(frames[lo])
            data = self.store.read(self.episodes[position], first, int(frames[hi - 1]) + 1, keys=_READ)
            rows = frames[lo:hi] - first
            buttons[lo:hi], camera[lo:hi] = data["buttons"][rows], data["camera"][rows]
            _gather(image[lo:hi], data["frames"], rows, self.skip_frame)
        mask = np.zeros(T, dtype=np.uint8)
        mask[:n] = 1
        return {
            "image": torch.from_numpy(image),
            "agent_action": {"buttons": torch.from_numpy(buttons)[:, None], "camera": torch.from_numpy(camera)[:, None]},
            "timestamp": torch.arange(k * T, k * T + T, dtype=torch.int64),
            "mask": torch.from_numpy(mask),
            "episode_index": torch.tensor(position, dtype=torch.int64),
        }


def _gather(out: np.ndarray, source: np.ndarray, rows: np.ndarray, step: int) -> None:
    """``out[i] = source[rows[i]]`` for increasing ``rows``: one slice copy per stretch of rows ``step`` apart.

    A slice copies frames about twice as fast as a fancy-index gather, which builds a temporary first; a window
    without null frames is a single stretch.
    """
    cuts = (np.flatnonzero(np.diff(rows) != step) + 1).tolist()
    for lo, hi in zip([0, *cuts], [*cuts, len(rows)]):
        out[lo:hi] = source[rows[lo]:rows[hi - 1] + 1:step]


def _kept_frames(store: Store, episodes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The non-null frames of ``episodes``, read from their ``flags`` alone (no frame is read or decoded).

    Returns:
        ``kept``: int32 ``(K,)``, the kept frame numbers of every episode in turn (int64 for episodes of 2**31
        frames or more); ``start``: int64 ``(E + 1,)``, episode ``i``'s are ``kept[start[i]:start[i + 1]]``.
        Two flat arrays rather than a list of them: forked loader workers share their pages copy-on-write.
    """
    dtype = np.int32 if max((store.length(e) for e in episodes), default=0) < 2**31 else np.int64
    parts = [np.flatnonzero((store.read(e, keys=("flags",))["flags"] & FLAG_NULL) == 0).astype(dtype)
             for e in tqdm(episodes, desc="drop_null: reading flags", unit="episode", disable=None, leave=False)]
    start = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in parts], out=start[1:])
    return (np.concatenate(parts) if parts else np.zeros(0, dtype)), start


def _episode_list(store: Store, episodes: Sequence[str] | None) -> list[str]:
    """The episode ids to use: all of ``store``'s, or ``episodes`` checked (a sequence of known ids, none twice)."""
    if episodes is None:
        return store.episode_ids
    if isinstance(episodes, str) or not isinstance(episodes, Sequence):
        raise TypeError(f"episodes must be a sequence of episode ids (a list); got {type(episodes).__name__} "
                        f"{episodes!r:.80}")
    missing = [e for e in episodes if e not in store]
    if missing:
        raise KeyError(f"episodes not in the store: {missing[:5]}")
    repeated = sorted(e for e, count in Counter(episodes).items() if count > 1)
    if repeated:
        raise ValueError(f"episodes must name each episode once; {repeated[:5]} appear twice or more")
    return list(episodes)
