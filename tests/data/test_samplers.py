"""Windows and the episode-continuous sampler: continuity, coverage, per-epoch shuffles, rank splits."""

import numpy as np
import pytest
import torch

from mstudio.data import EpisodeContinuousBatchSampler, EpisodeStore, WindowDataset, fill_store, make_loader


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = EpisodeStore.create(tmp_path_factory.mktemp("d") / "s", image_size=(4, 4))
    fill_store(store, episodes=11, frames=(3, 40), seed=0)
    return store


def test_windows_pad_and_mask_past_the_end(store):
    data = WindowDataset(store, window=8)
    episode = store.episode_ids[0]
    n = store.length(episode)
    last = data[data.windows_per_episode[0] - 1]
    valid = n - (data.windows_per_episode[0] - 1) * 8
    assert last["mask"].tolist() == [1] * valid + [0] * (8 - valid)
    assert last["agent_action"]["camera"][valid:].eq(60).all() and last["agent_action"]["buttons"][valid:].eq(0).all()
    assert last["image"][valid:].eq(0).all()
    raw = store.read(episode)
    first = data[0]
    assert torch.equal(first["image"][: min(8, n)], torch.from_numpy(raw["frames"][:8]))
    assert first["agent_action"]["buttons"].shape == (8, 1) and first["agent_action"]["buttons"].dtype == torch.int64
    assert first["timestamp"].tolist() == list(range(8))


def test_skip_frame_timestamps_count_steps(store):
    data = WindowDataset(store, window=4, skip_frame=3)
    episode = store.episode_ids[1]
    raw = store.read(episode)
    second = data[data.first_item[1] + 1]
    assert second["timestamp"].tolist() == [4, 5, 6, 7]  # continues window 0's [0..3]
    n = len(raw["frames"][12:24:3])
    assert torch.equal(second["image"][:n], torch.from_numpy(raw["frames"][12:24:3]))


def rows_of(sampler, data):
    """For each batch row: the sequence of (episode, window number) it read."""
    rows = {}
    for batch in sampler:
        for b, index in enumerate(batch):
            rows.setdefault(b, []).append(data.items[index])
    return rows


def test_rows_continue_their_episode_until_it_ends(store):
    data = WindowDataset(store, window=8)
    sampler = EpisodeContinuousBatchSampler(data, batch_size=3, seed=4)
    started = []
    for row in rows_of(sampler, data).values():
        for (ep, k), (next_ep, next_k) in zip(row, row[1:]):
            if next_ep == ep:
                assert next_k == k + 1
            else:  # the episode ended: the row moves to the first window of a new episode
                assert k == data.windows_per_episode[ep] - 1 and next_k == 0
        started += [ep for ep, k in row if k == 0]
    assert sorted(started) == list(range(11))  # every episode seen exactly once
    assert len(sampler) == len(list(sampler))


def test_each_epoch_reshuffles_reproducibly(store):
    data = WindowDataset(store, window=8)
    a = EpisodeContinuousBatchSampler(data, batch_size=2, seed=1)
    b = EpisodeContinuousBatchSampler(data, batch_size=2, seed=1)
    epoch0 = list(a)
    assert epoch0 == list(b)
    a.set_epoch(1)
    assert list(a) != epoch0
    b.set_epoch(1)
    assert list(a) == list(b)


def test_ranks_are_disjoint_and_cover_and_stay_in_step(store):
    data = WindowDataset(store, window=8)
    samplers = [EpisodeContinuousBatchSampler(data, 2, num_replicas=3, rank=r, seed=2) for r in range(3)]
    episodes = [{ep for row in rows_of(s, data).values() for ep, _ in row} for s in samplers]
    assert all(not (episodes[i] & episodes[j]) for i in range(3) for j in range(i + 1, 3))
    assert len({len(s) for s in samplers}) == 1  # same number of batches on every rank
    everything = [EpisodeContinuousBatchSampler(data, 1, num_replicas=3, rank=r, seed=2, shuffle=False) for r in range(3)]
    assert sorted(i for s in everything for batch in s._per_rank()[s.rank] for i in batch) == list(range(len(data)))
    with pytest.raises(ValueError, match="rank"):
        EpisodeContinuousBatchSampler(data, 2, num_replicas=2, rank=2)


def test_loader_batches_and_workers_agree(store):
    plain = list(make_loader(store, batch_size=3, window=8, continuous=True, seed=5))
    workers = list(make_loader(store, batch_size=3, window=8, continuous=True, seed=5, num_workers=2))
    assert len(plain) == len(workers) > 0
    for x, y in zip(plain, workers):
        assert x["episode"] == y["episode"]
        for key in ("image", "timestamp", "mask"):
            assert torch.equal(x[key], y[key])
    batch = plain[0]
    assert batch["image"].shape == (3, 8, 4, 4, 3) and batch["image"].dtype == torch.uint8
    assert batch["agent_action"]["camera"].shape == (3, 8, 1) and batch["timestamp"].dtype == torch.int64
    assert batch["mask"].dtype == torch.uint8
    shuffled = make_loader(store, batch_size=4, window=8)
    assert all(b["image"].shape[0] == 4 for b in shuffled)


def test_continuous_batches_drive_the_memory_carry(store):
    from mstudio.train import episode_starts

    last = torch.zeros(3, dtype=torch.long)
    for batch in make_loader(store, batch_size=3, window=8, continuous=True, seed=5):
        restart = episode_starts(batch["timestamp"], last)
        assert restart.tolist() == (batch["timestamp"][:, 0] == 0).tolist()
        last = batch["timestamp"][:, -1]
