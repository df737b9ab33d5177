"""Windows of ``T`` steps over the episodes of a store, as items in ``design.md``'s batch layout."""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import numpy as np
import torch

from mstudio.actions import CAMERA_NULL
from mstudio.data._checks import integer
from mstudio.data.store import EpisodeStore

__all__ = ["WindowDataset"]


class WindowDataset(torch.utils.data.Dataset):
    """Non-overlapping windows of every episode, MineStudio's ``RawDataset`` items with its bugs fixed.

    Window ``k`` of an episode reads frames ``k*T*s, k*T*s + s, ..., k*T*s + (T-1)*s`` (``s = skip_frame``).
    Steps past the episode's end are padding: black frames, the null action (buttons 0, camera 60) and
    ``mask`` 0. ``timestamp`` counts *steps* (``k*T + arange(T)``), not frames, so consecutive windows of an
    episode continue (``timestamp[0] == previous timestamp[-1] + 1``) for any ``skip_frame``: the train step's
    memory carry then works with skipped frames too (MineStudio's frame-index timestamps jump by ``s`` and
    reset the memory every batch).

    An item holds only tensors, so batches of them stay tensors through collation and ``pin_memory``:
    ``image`` uint8 ``(T, H, W, 3)``, ``agent_action = {"buttons": long (T, 1), "camera": long (T, 1)}``,
    ``timestamp`` long ``(T,)``, ``mask`` uint8 ``(T,)`` and ``episode_index`` long ``()``, the position of
    the window's episode in :attr:`episodes` (``dataset.episodes[int(item["episode_index"])]`` is its id).

    Args:
        store: an :class:`EpisodeStore`.
        window: ``T``, steps per window (an integer >= 1).
        episodes: the episode ids to use, in this order, each once (default: all, in store order).
        skip_frame: ``s`` above (an integer >= 1).
    """

    def __init__(self, store: EpisodeStore, window: int, episodes: Sequence[str] | None = None, skip_frame: int = 1):
        if not isinstance(store, EpisodeStore):
            raise TypeError(f"store must be an EpisodeStore (open one with EpisodeStore.open(path)); got "
                            f"{type(store).__name__} {store!r:.80}")
        window, skip_frame = integer("window", window, 1), integer("skip_frame", skip_frame, 1)
        self.store, self.window, self.skip_frame = store, window, skip_frame
        self.episodes = _episode_list(store, episodes)
        steps = [math.ceil(store.length(e) / skip_frame) for e in self.episodes]
        #: windows per episode, and (episode position, window number) of every item
        self.windows_per_episode = [math.ceil(n / window) for n in steps]
        self.items = [(i, k) for i, count in enumerate(self.windows_per_episode) for k in range(count)]
        self.first_item = np.concatenate([[0], np.cumsum(self.windows_per_episode)[:-1]]).astype(int).tolist()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
        """Window ``index`` (negative counts from the end) as a dict of tensors (layout in the class docstring)."""
        index = integer("index", index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"window {index} is outside the dataset, which has {len(self)} windows")
        position, k = self.items[index]
        episode = self.episodes[position]
        T, s = self.window, self.skip_frame
        start = k * T * s
        stop = min(start + T * s, self.store.length(episode))
        data = self.store.read(episode, start, stop)
        n = len(range(start, stop, s))
        frames = np.zeros((T, *data["frames"].shape[1:]), dtype=np.uint8)
        frames[:n] = data["frames"][::s]
        buttons = np.zeros(T, dtype=np.int64)
        buttons[:n] = data["buttons"][::s]
        camera = np.full(T, CAMERA_NULL, dtype=np.int64)
        camera[:n] = data["camera"][::s]
        mask = np.zeros(T, dtype=np.uint8)
        mask[:n] = 1
        return {
            "image": torch.from_numpy(frames),
            "agent_action": {"buttons": torch.from_numpy(buttons)[:, None], "camera": torch.from_numpy(camera)[:, None]},
            "timestamp": torch.arange(k * T, k * T + T, dtype=torch.int64),
            "mask": torch.from_numpy(mask),
            "episode_index": torch.tensor(position, dtype=torch.int64),
        }


def _episode_list(store: EpisodeStore, episodes: Sequence[str] | None) -> list[str]:
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
