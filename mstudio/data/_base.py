"""The surface every episode store offers: what windows, loaders, samplers, the Trainer and the importers use.

:class:`~mstudio.data.EpisodeStore` (one directory per episode) and :class:`~mstudio.data.ShardedStore`
(episodes packed into shard files) both derive from :class:`Store`, so code written against it takes either.
"""

from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["Store", "select_keys", "window_bounds"]


class Store(abc.ABC):
    """An append-only collection of whole episodes of one frame size, read by frame range.

    Attributes:
        root: the store's directory.
        manifest: the content of ``root/manifest.json`` (format, ``image_size``, action-space constants, ``meta``).
        image_size: ``(height, width)`` of every frame.
        checksums: whether reads check data against its recorded CRC-32 the first time a process reads it.

    A subclass keeps its visible episodes in ``_index`` (id -> entry holding at least ``length`` and ``info``, in
    append order); the id queries below read it.
    """

    root: Path
    manifest: dict
    image_size: tuple[int, int]
    checksums: bool
    _index: dict[str, dict]

    @classmethod
    @abc.abstractmethod
    def create(cls, path: str | os.PathLike, image_size: tuple[int, int], meta: Mapping[str, Any] | None = None):
        """A new, empty store at ``path`` (``FileExistsError`` naming what is there if that is not possible)."""

    @classmethod
    @abc.abstractmethod
    def open(cls, path: str | os.PathLike, *, checksums: bool = True):
        """The store at ``path``; ``ValueError`` naming the file if its manifest or index is invalid."""

    @property
    def episode_ids(self) -> list[str]:
        """Episode ids in append order."""
        return list(self._index)

    def __len__(self) -> int:
        """Number of episodes."""
        return len(self._index)

    def __contains__(self, episode_id: str) -> bool:
        """Whether the store holds ``episode_id``."""
        return episode_id in self._index

    def length(self, episode_id: str) -> int:
        """Number of frames of an episode (``KeyError`` naming it if it is not in the store)."""
        return self._entry(episode_id)["length"]

    def info(self, episode_id: str) -> dict:
        """The ``info`` dict the episode was appended with."""
        return self._entry(episode_id)["info"]

    def _entry(self, episode_id: str) -> dict:
        """The index entry of an episode (``KeyError`` naming it and the store if there is none)."""
        if episode_id not in self._index:
            raise KeyError(f"no episode {episode_id!r} in the store at {self.root} ({len(self)} episodes)")
        return self._index[episode_id]

    @abc.abstractmethod
    def append(self, episode_id: str, arrays: Mapping[str, np.ndarray], info: Mapping[str, Any] | None = None) -> None:
        """Add a whole episode atomically (arrays as in :func:`mstudio.data.store.array_spec`, ``N >= 1`` frames)."""

    @abc.abstractmethod
    def read(self, episode_id: str, start: int = 0, stop: int | None = None, *,
             keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Frames ``[start, stop)`` of an episode: a fresh array per key of ``keys`` (default: every key of
        :data:`mstudio.data._files.ARRAYS`)."""

    @abc.abstractmethod
    def verify(self, repair: bool = False) -> list[str]:
        """Problems a crash or damage left, one line each (empty: sound); ``repair`` removes a crash's leftovers."""

    def episodes_without_checksums(self) -> list[str]:
        """Ids of episodes whose data has no recorded checksum (only stores written before checksums have any)."""
        return []


def window_bounds(episode_id: str, length: int, start: Any, stop: Any) -> tuple[int, int]:
    """``(start, stop)`` as ints after checking ``0 <= start <= stop <= length`` (``stop=None``: ``length``).

    Raises:
        TypeError: ``start`` or ``stop`` is not an integer.
        IndexError: the range leaves the episode (the message names it and its length).
    """
    stop = length if stop is None else stop
    for name, value in (("start", start), ("stop", stop)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    if not 0 <= start <= stop <= length:
        raise IndexError(f"frames [{start}, {stop}) are outside episode {episode_id!r} of {length} frames")
    return int(start), int(stop)


def select_keys(keys: Sequence[str] | None, spec: Mapping[str, Any]) -> list[str]:
    """The arrays a read returns: ``keys`` checked against ``spec`` (an episode's arrays), or all of them.

    Raises:
        TypeError: ``keys`` is a single string or not a sequence.
        KeyError: a key is not an array of an episode (the message lists them).
    """
    if keys is None:
        return list(spec)
    if isinstance(keys, str) or not isinstance(keys, Sequence):
        raise TypeError(f"keys must be a sequence of array names, like ('flags',); got {type(keys).__name__} {keys!r}")
    unknown = [key for key in keys if key not in spec]
    if unknown:
        raise KeyError(f"keys {unknown} are not arrays of an episode; expected some of {list(spec)}")
    return list(keys)
