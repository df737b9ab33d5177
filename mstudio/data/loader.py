"""DataLoaders over an :class:`EpisodeStore` that yield batches in ``design.md``'s layout."""

from __future__ import annotations

import torch

from mstudio.data.samplers import EpisodeContinuousBatchSampler
from mstudio.data.store import EpisodeStore
from mstudio.data.windows import WindowDataset


def make_loader(
    store: EpisodeStore,
    batch_size: int,
    window: int,
    *,
    continuous: bool = False,
    skip_frame: int = 1,
    num_workers: int = 0,
    seed: int = 0,
    num_replicas: int | None = None,
    rank: int | None = None,
) -> torch.utils.data.DataLoader:
    """Batches of ``window``-step windows: ``image`` uint8 ``(B, T, H, W, 3)``, ``agent_action`` long
    ``(B, T, 1)`` each, ``timestamp`` long ``(B, T)``, ``mask`` uint8 ``(B, T)``, ``episode`` list of str.

    Args:
        continuous: episode-continuous batches (:class:`EpisodeContinuousBatchSampler`; call its
            ``set_epoch`` through ``loader.batch_sampler``) for memory training; otherwise random windows,
            reshuffled each epoch, incomplete last batch dropped.
        num_workers: worker processes; each maps the store's files itself.
        seed: seeds the shuffling.
        num_replicas, rank: for distributed training (continuous mode splits episodes across ranks).
    """
    dataset = WindowDataset(store, window, skip_frame=skip_frame)
    common = dict(
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),  # uint8 frames go to the GPU as they are: 4x less than float
        persistent_workers=num_workers > 0,
    )
    if continuous:
        sampler = EpisodeContinuousBatchSampler(dataset, batch_size, num_replicas=num_replicas, rank=rank, seed=seed)
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, **common)
    if num_replicas not in (None, 1):
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=num_replicas, rank=rank or 0, seed=seed, drop_last=True)
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **common)
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                       generator=generator, **common)
