"""Samplers: which windows go into which batch, on which rank, in which epoch.

A sampler is any object with a ``batch_size`` and a pure ``batches(dataset, epoch)`` (the :class:`Sampler`
protocol): the loader asks it for one epoch's batches of :class:`WindowDataset` item indices and slices that
list to resume mid-epoch, so a sampler must be deterministic in (seed, epoch, rank). Two are built in:

- :class:`RandomWindows`: windows shuffled each epoch, for training without memory.
- :class:`EpisodeContinuous`: MineStudio's ``MineDistributedBatchSampler`` semantics with its known bugs
  fixed: episodes are reshuffled every epoch (``seed + epoch``), a row whose episode ends takes the next
  unassigned episode and, when none is left, the epoch stops instead of borrowing windows from another row
  (which broke continuity), and ranks are split by whole episodes. For memory training.

Both read the world size and rank from ``torch.distributed`` when a process group is initialised, and every
rank yields the same number of batches, so distributed training stays in step.
"""

from __future__ import annotations

import heapq
import warnings
from typing import Iterator, Protocol, Sequence, runtime_checkable

import torch

from mstudio.data._checks import integer
from mstudio.data.windows import WindowDataset

__all__ = ["EpisodeContinuous", "EpisodeContinuousBatchSampler", "RandomWindows", "Sampler"]


@runtime_checkable
class Sampler(Protocol):
    """What :func:`~mstudio.data.make_loader` needs from a sampler.

    Attributes:
        batch_size: rows per batch (``B``).
    """

    batch_size: int

    def batches(self, dataset: WindowDataset, epoch: int) -> list[list[int]]:
        """This rank's batches for ``epoch``: lists of ``dataset`` item indices, one list per batch.

        Must be deterministic in (seed, epoch, rank): the loader resumes mid-epoch by calling it again and
        skipping the batches already handed out. In distributed training every rank must return the same
        number of batches, or the ranks fall out of step.
        """
        ...


def _world(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """``(num_replicas, rank)``: the process group's when one is initialised, else the explicit values or (1, 0)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        group = dist.get_world_size(), dist.get_rank()
        for name, what, given, actual in (("num_replicas", "world size", num_replicas, group[0]),
                                          ("rank", "rank", rank, group[1])):
            if given is not None and given != actual:
                raise ValueError(f"{name}={given} disagrees with the initialised torch.distributed process group, "
                                 f"whose {what} is {actual}; pass {name}=None (the default) to use the group's")
        return group
    num_replicas = 1 if num_replicas is None else integer("num_replicas", num_replicas)
    rank = 0 if rank is None else integer("rank", rank)
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got num_replicas={num_replicas}, "
                         f"rank={rank} (no torch.distributed process group is initialised, so unset values "
                         f"default to 1 and 0)")
    return num_replicas, rank


def _order(count: int, shuffle: bool, seed: int) -> list[int]:
    """``range(count)``, shuffled by a generator seeded with ``seed`` when ``shuffle``."""
    if not shuffle:
        return list(range(count))
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()


class _BuiltinSampler:
    """Shared by the built-in samplers: validated batch size, seed and (lazily resolved) world."""

    def __init__(self, batch_size: int, seed: int, shuffle: bool, num_replicas: int | None, rank: int | None):
        batch_size, seed = integer("batch_size", batch_size, 1), integer("seed", seed)
        _world(num_replicas, rank)  # fail at build time on a bad or conflicting rank
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        # resolved again at every epoch: a process group initialised after construction is honoured (or conflicts)
        self._num_replicas, self._rank = num_replicas, rank

    @property
    def num_replicas(self) -> int:
        """Number of ranks the data is split across."""
        return _world(self._num_replicas, self._rank)[0]

    @property
    def rank(self) -> int:
        """This process's rank."""
        return _world(self._num_replicas, self._rank)[1]


class RandomWindows(_BuiltinSampler):
    """Batches of random windows, reshuffled every epoch; ranks get disjoint windows.

    The window order of epoch ``e`` is a permutation drawn with seed ``seed + e`` (equal on all ranks); rank
    ``r`` of ``R`` takes every ``R``-th window starting at ``r``. Each rank takes ``len(dataset) // R`` windows
    (up to ``R - 1`` are left out per epoch), so the ranks hold disjoint windows and equal batch counts.

    Args:
        batch_size: rows per batch.
        seed: base seed; must be equal on all ranks.
        shuffle: draw a new order each epoch; ``False`` keeps dataset order.
        drop_last: drop each rank's final short batch (``False`` keeps it, with fewer than ``batch_size`` rows).
        num_replicas, rank: default from ``torch.distributed`` when initialised (explicit values must agree
            with it), else 1 and 0.
    """

    def __init__(self, batch_size: int, *, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                 num_replicas: int | None = None, rank: int | None = None):
        super().__init__(batch_size, seed, shuffle, num_replicas, rank)
        self.drop_last = drop_last

    def batches(self, dataset: WindowDataset, epoch: int) -> list[list[int]]:
        """This rank's batches of item indices for ``epoch`` (see the class docstring); none when a rank gets fewer
        than ``batch_size`` windows with ``drop_last`` (the :class:`~mstudio.data.Loader` refuses that)."""
        num_replicas, rank = _world(self._num_replicas, self._rank)
        order = _order(len(dataset), self.shuffle, self.seed + epoch)
        count = len(order) // num_replicas
        if self.drop_last:
            count -= count % self.batch_size
        mine = order[rank::num_replicas][:count]
        return [mine[i:i + self.batch_size] for i in range(0, count, self.batch_size)]


class EpisodeContinuous(_BuiltinSampler):
    """Batches whose row ``b`` follows one episode, window after window, for recurrent-memory training.

    Episodes are shuffled with seed ``seed + epoch`` (equal on all ranks) and dealt to ranks round-robin. On a
    rank, each row takes the next unassigned episode when its current one ends (the new episode's first
    window has timestamp 0, so the train step restarts that row's memory); the epoch ends at the first batch
    where a row finds no episode left. Every rank stops at the shortest rank's batch count. An episode without
    windows (every frame null, with ``WindowDataset(drop_null=True)``) is passed over.

    Args:
        batch_size: rows per batch.
        seed: base seed; must be equal on all ranks.
        shuffle: reshuffle the episode order each epoch; ``False`` keeps dataset order.
        num_replicas, rank: default from ``torch.distributed`` when initialised (explicit values must agree
            with it), else 1 and 0.
    """

    def __init__(self, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 num_replicas: int | None = None, rank: int | None = None):
        super().__init__(batch_size, seed, shuffle, num_replicas, rank)

    def batches(self, dataset: WindowDataset, epoch: int) -> list[list[int]]:
        """This rank's batches of item indices for ``epoch`` (see the class docstring); none when a rank gets fewer
        episodes than ``batch_size`` (a row would have none; the :class:`~mstudio.data.Loader` refuses that)."""
        num_replicas, rank = _world(self._num_replicas, self._rank)
        order = _order(len(dataset.episodes), self.shuffle, self.seed + epoch)
        lengths = dataset.windows_per_episode
        steps = min(_batch_count([lengths[e] for e in order[r::num_replicas]], self.batch_size)
                    for r in range(num_replicas))
        return _continuous_batches(dataset, order[rank::num_replicas], self.batch_size, steps)


def _batch_count(lengths: Sequence[int], batch_size: int) -> int:
    """How many batches ``batch_size`` rows fill from episodes of ``lengths`` windows, dealt in order.

    Rows free at the same step take episodes in row order, as :func:`_continuous_batches` does; the count is
    the step at which the first row finds no episode left. ``O(E log B)`` for ``E`` episodes.
    """
    free = [(0, b) for b in range(batch_size)]  # (step at which the row needs a new episode, row)
    for length in lengths:
        step, row = heapq.heappop(free)
        heapq.heappush(free, (step + length, row))
    return free[0][0]


def _continuous_batches(dataset: WindowDataset, episodes: Sequence[int], batch_size: int,
                        steps: int) -> list[list[int]]:
    """The first ``steps`` batches of rows filled from ``episodes`` in order; linear in ``steps * batch_size``."""
    queue = iter(episodes)
    cursor, end = [0] * batch_size, [0] * batch_size  # each row's next item index and its episode's end
    batches = []
    for _ in range(steps):
        batch = []
        for b in range(batch_size):
            while cursor[b] == end[b]:  # `steps` is never past the batch count, so the queue has one left
                episode = next(queue)
                cursor[b] = dataset.first_item[episode]
                end[b] = cursor[b] + dataset.windows_per_episode[episode]
            batch.append(cursor[b])
            cursor[b] += 1
        batches.append(batch)
    return batches


class EpisodeContinuousBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Deprecated: :class:`EpisodeContinuous` as a ``torch`` batch sampler with ``set_epoch``.

    Write ``make_loader(store, window, EpisodeContinuous(batch_size, seed=...))`` instead (the loader advances
    the epoch itself), or call ``EpisodeContinuous(batch_size, ...).batches(dataset, epoch)``.
    """

    def __init__(self, dataset: WindowDataset, batch_size: int, *, num_replicas: int | None = None,
                 rank: int | None = None, shuffle: bool = True, seed: int = 0):
        warnings.warn(f"EpisodeContinuousBatchSampler is deprecated: write make_loader(store, window, "
                      f"EpisodeContinuous({batch_size}, seed={seed})), whose loader advances the epoch itself",
                      DeprecationWarning, stacklevel=2)
        self.dataset, self.epoch = dataset, 0
        self.sampler = EpisodeContinuous(batch_size, seed=seed, shuffle=shuffle, num_replicas=num_replicas, rank=rank)

    def set_epoch(self, epoch: int) -> None:
        """Use the episode order of ``epoch``."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.sampler.batches(self.dataset, self.epoch))

    def __len__(self) -> int:
        return len(self.sampler.batches(self.dataset, self.epoch))
