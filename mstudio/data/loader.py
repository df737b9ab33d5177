"""The training loader: one epoch of batches per iteration, resumable at any batch.

A :class:`Loader` asks its sampler for the current epoch's batch list, hands the batches out (through a
``torch.utils.data.DataLoader``, so workers and pinned memory come from torch) and counts the batches its
consumer has received. Since samplers are deterministic in (seed, epoch, rank), that count is the whole data
position: :meth:`Loader.load_state_dict` slices the epoch's batch list and reads none of the skipped data.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from mstudio.data._base import Store
from mstudio.data._checks import integer
from mstudio.data.samplers import EpisodeContinuous, RandomWindows, Sampler
from mstudio.data.windows import WindowDataset

__all__ = ["Loader", "make_loader"]

Batch = dict[str, Any]  # tensors, and the nested ``agent_action`` dict of tensors


class _Plan:
    """The batch list the DataLoader reads at each ``iter``: the Loader sets it before every iteration, so
    one DataLoader (and its persistent workers) serves every epoch and every resume."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class Loader:
    """Batches of windows: each ``iter(loader)`` yields the rest of the current epoch, then moves to the next.

    The loader starts at epoch 0, batch 0. Once the last batch of epoch ``e`` has been handed out it stands at
    epoch ``e + 1``, batch 0, so ``for batch in loader`` runs one epoch per loop and reshuffles by itself. A
    loop left early keeps its place: the next ``iter`` continues with the next batch. Batches prefetched by
    workers but never handed out do not count. Iterate one loop at a time (they share the position).

    Each batch: ``image`` uint8 ``(B, T, H, W, 3)``, ``agent_action = {"buttons": long (B, T, 1), "camera": long
    (B, T, 1)}``, ``timestamp`` long ``(B, T)``, ``mask`` uint8 ``(B, T)`` (0 on padding past an episode's
    end) and ``episode_index`` long ``(B,)``: row ``b``'s episode is ``loader.episodes[episode_index[b]]``.

    Args:
        dataset: the windows.
        sampler: any :class:`~mstudio.data.samplers.Sampler` (:class:`RandomWindows`, :class:`EpisodeContinuous`
            or your own).
        num_workers: worker processes (persistent across epochs); each maps the store's files itself.
        pin_memory: pin batches for fast copies to the GPU; default ``torch.cuda.is_available()``.

    Iterating raises ``ValueError`` when the sampler gives no batch for the epoch (``len(loader) == 0``), so a
    loop over epochs never spins without data; :func:`make_loader` checks epoch 0 when it makes the loader.
    """

    def __init__(self, dataset: WindowDataset, sampler: Sampler, *, num_workers: int = 0,
                 pin_memory: bool | None = None):
        if not isinstance(dataset, WindowDataset):
            raise TypeError(f"dataset must be a WindowDataset; got {type(dataset).__name__}")
        if not isinstance(sampler, Sampler):
            raise TypeError(f"sampler must follow mstudio.data.Sampler (a batch_size attribute and a "
                            f"batches(dataset, epoch) method), got {type(sampler).__name__}")
        num_workers = integer("num_workers", num_workers, 0)
        self.dataset, self.sampler = dataset, sampler
        self._epoch, self._batch = 0, 0
        self._cache: tuple[int, list[list[int]]] | None = None  # (epoch, its batches): asked for once per epoch
        self._plan = _Plan()
        self._loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=self._plan, num_workers=num_workers,
            pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
            persistent_workers=num_workers > 0,
            # Each new iterator draws a base seed for its workers; from its own generator, not the global
            # RNG, so iterating (a validation pass, a resume) never shifts the caller's random stream.
            generator=torch.Generator().manual_seed(0))

    @property
    def episodes(self) -> list[str]:
        """Episode ids in dataset order; ``episode_index`` points into this list."""
        return self.dataset.episodes

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self._epoch

    def __len__(self) -> int:
        """Number of batches in the current epoch (all of them, including those already handed out)."""
        return len(self._batches(self._epoch))

    def _batches(self, epoch: int) -> list[list[int]]:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self.sampler.batches(self.dataset, epoch))
        return self._cache[1]

    def __iter__(self) -> Iterator[Batch]:
        epoch, start = self._epoch, self._batch
        batches = _nonempty(self.sampler, self.dataset, epoch, self._batches(epoch))
        self._plan.batches = batches[start:]
        for batch in self._loader:
            # counted before the consumer gets it: a checkpoint taken after this batch resumes past it
            self._batch += 1
            if self._batch == len(batches):
                self._epoch, self._batch = epoch + 1, 0
            yield batch

    def state_dict(self) -> dict[str, int]:
        """The position of the next batch to hand out: ``{"epoch": int, "batch": int}`` (JSON-serialisable)."""
        return {"epoch": self._epoch, "batch": self._batch}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from ``state`` (from :meth:`state_dict`): the next batch is batch ``state["batch"]`` of epoch
        ``state["epoch"]``, exactly the one an uninterrupted run would give, given the same sampler and data."""
        if not isinstance(state, Mapping):
            raise TypeError(f"a loader state is a dict {{'epoch': int >= 0, 'batch': int >= 0}}; got "
                            f"{type(state).__name__}")
        natural = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in state.values())
        if set(state) != {"epoch", "batch"} or not natural:
            raise ValueError(f"a loader state is {{'epoch': int >= 0, 'batch': int >= 0}}, got {dict(state)!r}")
        epoch, batch = int(state["epoch"]), int(state["batch"])
        count = len(self._batches(epoch))
        if batch > count:
            raise ValueError(f"state batch {batch} is past the end of epoch {epoch}, which has {count} batches "
                             f"here; was the state saved with another sampler, batch size, world size or store?")
        self._epoch, self._batch = (epoch + 1, 0) if batch == count else (epoch, batch)


def _nonempty(sampler: Sampler, dataset: WindowDataset, epoch: int, batches: list[list[int]]) -> list[list[int]]:
    """``batches``, unless empty: an empty epoch would make ``while True: for batch in loader`` spin forever."""
    if batches:
        return batches
    # the built-in samplers split the data over ranks; a sampler of your own may not say how
    ranks = getattr(sampler, "num_replicas", 1)
    episodes, windows = len(dataset.episodes), len(dataset)
    where = f" on rank {sampler.rank} of {ranks}" if ranks > 1 else ""
    per_rank = f", {episodes // ranks} episodes and {windows // ranks} windows per rank" if ranks > 1 else ""
    stepless = dataset.windows_per_episode.count(0)  # only drop_null leaves an episode without a step
    dropped = f" (drop_null left {stepless} episodes without a step: all their frames are null)" if stepless else ""
    raise ValueError(
        f"{type(sampler).__name__} gives no batches of {sampler.batch_size} for epoch {epoch}{where}: the dataset has "
        f"{windows} windows in {episodes} episodes{per_rank}{dropped}. EpisodeContinuous needs batch_size <= the "
        f"episodes per rank (each row follows an episode of its own); RandomWindows (drop_last=True) needs "
        f"batch_size <= the windows per rank. Use a smaller batch_size or more episodes")


def make_loader(store: Store, window: int, sampler: Sampler | int | None = None, *, skip_frame: int = 1,
                drop_null: bool = False, num_workers: int = 0, pin_memory: bool | None = None,
                **deprecated: Any) -> Loader:
    """A :class:`Loader` of ``window``-step windows of every episode of ``store``, batched by ``sampler``.

    Example::

        loader = make_loader(store, 32, EpisodeContinuous(8, seed=0))   # memory training
        for batch in loader:                                             # one epoch; the next loop reshuffles
            ...
        checkpoint["data"] = loader.state_dict()                         # later: loader.load_state_dict(...)

    Args:
        store: the episodes.
        window: ``T``, steps per window.
        sampler: a :class:`~mstudio.data.samplers.Sampler`: :class:`RandomWindows` (random windows),
            :class:`EpisodeContinuous` (rows that continue their episode) or your own.
        skip_frame: keep every ``skip_frame``-th frame (timestamps still count steps; see ``WindowDataset``).
        drop_null: leave out frames flagged null (no button, camera at rest) before ``skip_frame`` applies; off
            by default, as in MineStudio (see ``WindowDataset``).
        num_workers: worker processes.
        pin_memory: default ``torch.cuda.is_available()`` (uint8 frames go to the GPU 4x smaller than float).
        **deprecated: the old call ``make_loader(store, batch_size, window, continuous=False, seed=0,
            num_replicas=None, rank=None)`` still works (``batch_size`` positionally or by keyword) and warns
            with the call to write instead.

    Returns:
        The loader; its batches are described in :class:`Loader`.

    Raises:
        ValueError: the sampler gives no batch for epoch 0 (``batch_size`` larger than the episodes, or windows,
            per rank, or every frame null with ``drop_null``), or a bad ``window`` or ``skip_frame``.
        TypeError: ``store`` is not an :class:`EpisodeStore` or :class:`ShardedStore` (``open_store(path)``).
    """
    if sampler is None or isinstance(sampler, int) or deprecated:
        window, sampler = _legacy_sampler(window, sampler, deprecated)
    dataset = WindowDataset(store, window, skip_frame=skip_frame, drop_null=drop_null)
    loader = Loader(dataset, sampler, num_workers=num_workers, pin_memory=pin_memory)
    # refuse now, not at the first batch; not cached: a process group initialised later changes the world
    _nonempty(sampler, dataset, 0, sampler.batches(dataset, 0))
    return loader


_LEGACY = ("batch_size", "continuous", "seed", "num_replicas", "rank")


def _legacy_sampler(window: int, sampler: int | None, options: dict[str, Any]) -> tuple[int, Sampler]:
    """``(window, sampler)`` from the deprecated ``make_loader(store, batch_size, window, continuous=...)``."""
    unknown = sorted(set(options) - set(_LEGACY))
    if unknown:
        raise TypeError(f"make_loader() got unexpected keyword arguments {unknown}")
    if sampler is not None and not isinstance(sampler, int):
        raise TypeError(f"make_loader() got a sampler and the deprecated {sorted(options)}; give those to the "
                        f"sampler instead, e.g. EpisodeContinuous(batch_size, seed=...)")
    options = dict(options)
    if isinstance(sampler, int):  # the old positional order: (store, batch_size, window)
        if "batch_size" in options:
            raise TypeError("make_loader() got batch_size twice: positionally and by keyword")
        options["batch_size"], window = window, sampler
    if "batch_size" not in options:
        raise TypeError("make_loader() needs a sampler: make_loader(store, window, RandomWindows(batch_size)) "
                        "or make_loader(store, window, EpisodeContinuous(batch_size))")
    batch_size = options.pop("batch_size")
    kind = EpisodeContinuous if options.pop("continuous", False) else RandomWindows
    arguments = "".join(f", {key}={value!r}" for key, value in options.items())
    warnings.warn(f"make_loader(store, batch_size, window, continuous=..., seed=..., num_replicas=..., rank=...) is "
                  f"deprecated: write make_loader(store, {window}, {kind.__name__}({batch_size}{arguments}))",
                  DeprecationWarning, stacklevel=3)
    return window, kind(batch_size, **options)
