"""Episode-continuous batches: each batch row follows one episode, window after window.

MineStudio's ``MineDistributedBatchSampler`` semantics, with its known bugs fixed: episodes are reshuffled
every epoch (``seed + epoch``), a row whose episode ends takes the next unassigned episode and, when none is
left, iteration stops instead of borrowing windows from another row (which broke continuity), and ranks are
split by whole episodes. Every rank yields the same number of batches, so distributed training stays in step.
"""

from __future__ import annotations

from typing import Iterator

import torch

from mstudio.data.windows import WindowDataset


class EpisodeContinuousBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of ``WindowDataset`` indices; row ``b`` of consecutive batches continues one episode.

    When a row's episode ends, the row's next window is the first window of the next episode (timestamp 0,
    so the train step restarts that row's memory). Episodes are dealt to ranks round-robin after the shuffle.

    Args:
        dataset: the windows.
        batch_size: rows per batch.
        num_replicas, rank: for ``torchrun``; default from ``torch.distributed`` when initialised, else 1 and 0.
        shuffle: reshuffle the episode order each epoch with ``seed + epoch`` (see :meth:`set_epoch`).
        seed: base seed; equal on all ranks.
    """

    def __init__(self, dataset: WindowDataset, batch_size: int, *, num_replicas: int | None = None,
                 rank: int | None = None, shuffle: bool = True, seed: int = 0):
        if num_replicas is None or rank is None:
            dist = torch.distributed
            initialised = dist.is_available() and dist.is_initialized()
            num_replicas = dist.get_world_size() if initialised else 1 if num_replicas is None else num_replicas
            rank = dist.get_rank() if initialised else 0 if rank is None else rank
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size = dataset, batch_size
        self.num_replicas, self.rank, self.shuffle, self.seed = num_replicas, rank, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the episode order of ``epoch`` (call before each epoch, as with ``DistributedSampler``)."""
        self.epoch = epoch

    def _episode_order(self) -> list[int]:
        count = len(self.dataset.episodes)
        if not self.shuffle:
            return list(range(count))
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(count, generator=gen).tolist()

    def _batches(self, episodes: list[int]) -> list[list[int]]:
        """Fill ``batch_size`` rows from ``episodes`` in order; stop when a row finds none left."""
        queue = iter(episodes)
        rows: list[list[int] | None] = [None] * self.batch_size  # remaining item indices of each row's episode
        batches = []
        while True:
            for b, row in enumerate(rows):
                if not row:
                    episode = next(queue, None)
                    if episode is None:
                        return batches
                    first = self.dataset.first_item[episode]
                    rows[b] = list(range(first, first + self.dataset.windows_per_episode[episode]))
            batches.append([row.pop(0) for row in rows])

    def _per_rank(self) -> list[list[list[int]]]:
        order = self._episode_order()
        return [self._batches(order[r::self.num_replicas]) for r in range(self.num_replicas)]

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self._per_rank()
        steps = min(len(b) for b in per_rank)  # every rank yields as many batches as the shortest
        return iter(per_rank[self.rank][:steps])

    def __len__(self) -> int:
        return min(len(b) for b in self._per_rank())
