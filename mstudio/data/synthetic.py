"""Synthetic data for tests, benchmarks and the default demo: batches in ``design.md``'s layout, drawn
from a seeded generator (no I/O), and random episodes appended to an :class:`~mstudio.data.store.EpisodeStore`.
"""

from __future__ import annotations

import numpy as np
import optree
import torch

from mstudio.actions import CAMERA_NULL, N_BUTTONS, N_CAMERA
from mstudio.data.contractor_import import FLAG_NULL

__all__ = ["fill_store", "random_batch"]


def random_batch(
    batch_size: int,
    seq_len: int,
    image_size: int | tuple[int, int] = 64,
    *,
    seed: int = 0,
    start: int | torch.Tensor = 0,
    null_camera_fraction: float = 0.3,
    device: torch.device | str = "cpu",
) -> dict[str, object]:
    """One batch of episode windows with random frames and actions.

    Args:
        batch_size: ``B``.
        seq_len: ``T``, frames per window.
        image_size: ``H`` (square) or ``(H, W)``.
        seed: seeds the generator, so equal arguments give equal batches.
        start: first timestamp of each row, an int or a long tensor ``(B,)``; ``timestamp[b] = start[b] + arange(T)``.
        null_camera_fraction: share of steps whose camera class is 60 (the "did not move" bin).
        device: where the tensors go.

    Returns:
        ``{"image": uint8 (B, T, H, W, 3), "agent_action": {"buttons": long (B, T, 1) in [0, 8641),
        "camera": long (B, T, 1) in [0, 121)}, "timestamp": long (B, T), "mask": uint8 (B, T) all ones}``.
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    gen = torch.Generator().manual_seed(seed)
    shape = (batch_size, seq_len)
    camera = torch.randint(0, N_CAMERA, shape + (1,), generator=gen)
    camera = torch.where(torch.rand(shape + (1,), generator=gen) < null_camera_fraction, CAMERA_NULL, camera)
    start = torch.as_tensor(start, dtype=torch.long).expand(batch_size)
    batch = {
        "image": torch.randint(0, 256, shape + (height, width, 3), generator=gen, dtype=torch.uint8),
        "agent_action": {
            "buttons": torch.randint(0, N_BUTTONS, shape + (1,), generator=gen),
            "camera": camera,
        },
        "timestamp": start[:, None] + torch.arange(seq_len),
        "mask": torch.ones(shape, dtype=torch.uint8),
    }
    return optree.tree_map(lambda t: t.to(device), batch)


def _learnable_episode(rng: np.random.Generator, n: int, height: int, width: int, vocabulary: int):
    """Frames whose colour names the action: ``vocabulary`` (buttons, camera) pairs, each with a colour."""
    table = np.random.default_rng(0)  # the same action/colour table for every episode and seed
    buttons = table.integers(0, N_BUTTONS, vocabulary)
    camera = table.integers(0, N_CAMERA, vocabulary)
    colours = table.integers(0, 256, (vocabulary, 3))
    which = rng.integers(0, vocabulary, n)
    noise = rng.integers(-20, 21, (n, height, width, 3))
    frames = np.clip(colours[which][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return frames, buttons[which], camera[which]


def fill_store(store, *, episodes: int, frames: int | tuple[int, int], seed: int = 0,
               vocabulary: int | None = None) -> list[str]:
    """Append ``episodes`` random episodes to ``store`` (lengths ``frames`` or drawn from ``[lo, hi]``).

    Frames are random RGB at the store's size and actions random joint indices; with ``vocabulary``, every
    frame instead shows the colour of one of ``vocabulary`` fixed actions (plus noise) and records that
    action, so a policy can learn it (the default ``mstudio train`` store). ``env_buttons`` and ``env_camera``
    are zero; ``flags`` marks the null frames (joint buttons 0) as the importers do, so ``drop_null`` works. For tests, benchmarks and the default demo. Returns the new ids.
    """
    rng = np.random.default_rng(seed)
    low, high = (frames, frames) if isinstance(frames, int) else frames
    height, width = store.image_size
    ids, first = [], len(store)
    for i in range(episodes):
        n = int(rng.integers(low, high + 1))
        episode_id = f"synthetic-{seed}-{first + i:06d}"
        if vocabulary is None:
            images = rng.integers(0, 256, (n, height, width, 3), dtype=np.uint8)
            buttons, camera = rng.integers(0, N_BUTTONS, n), rng.integers(0, N_CAMERA, n)
        else:
            images, buttons, camera = _learnable_episode(rng, n, height, width, vocabulary)
        store.append(episode_id, {
            "frames": images,
            "buttons": buttons.astype(np.int16),
            "camera": camera.astype(np.uint8),
            "env_buttons": np.zeros(n, dtype=np.uint32),
            "env_camera": np.zeros((n, 2), dtype=np.float32),
            "flags": ((buttons == 0) * FLAG_NULL).astype(np.uint8),
        }, {"source": "synthetic", "seed": seed, "vocabulary": vocabulary})
        ids.append(episode_id)
    return ids
