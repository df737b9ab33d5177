"""Windows and samplers: continuity, coverage, per-epoch shuffles, rank splits, process-group conflicts."""

import socket

import numpy as np
import pytest
import torch

from mstudio.data import (EpisodeContinuous, EpisodeContinuousBatchSampler, EpisodeStore, RandomWindows, Sampler,
                          WindowDataset, fill_store)
from tests.support.episodes import append_flagged


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = EpisodeStore.create(tmp_path_factory.mktemp("d") / "s", image_size=(4, 4))
    fill_store(store, episodes=11, frames=(3, 40), seed=0)
    return store


@pytest.fixture(scope="module")
def data(store):
    return WindowDataset(store, window=8)


def test_windows_pad_and_mask_past_the_end(store, data):
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


def test_items_name_their_episode_by_position(data):
    for index in (0, data.first_item[3] + 1, len(data) - 1):
        item = data[index]
        assert item["episode_index"].dtype == torch.int64 and item["episode_index"].shape == ()
        assert int(item["episode_index"]) == data.items[index][0]


def reference_continuous(data, batch_size, order, num_replicas, rank):
    """MineStudio's rule with its bugs fixed, written plainly (quadratic ``pop(0)``) as the oracle."""
    def fill(episodes):
        queue, rows, batches = iter(episodes), [[] for _ in range(batch_size)], []
        while True:
            for b in range(batch_size):
                while not rows[b]:
                    episode = next(queue, None)
                    if episode is None:
                        return batches
                    first = data.first_item[episode]
                    rows[b] = list(range(first, first + data.windows_per_episode[episode]))
            batches.append([row.pop(0) for row in rows])

    per_rank = [fill(order[r::num_replicas]) for r in range(num_replicas)]
    return per_rank[rank][:min(len(b) for b in per_rank)]


@pytest.mark.parametrize("batch_size, num_replicas", [(1, 1), (3, 1), (2, 3), (4, 2), (12, 1)])
def test_episode_continuous_matches_the_reference_rule(data, batch_size, num_replicas):
    for epoch in (0, 1):
        order = torch.randperm(11, generator=torch.Generator().manual_seed(7 + epoch)).tolist()
        for rank in range(num_replicas):
            sampler = EpisodeContinuous(batch_size, seed=7, num_replicas=num_replicas, rank=rank)
            assert sampler.batches(data, epoch) == reference_continuous(data, batch_size, order, num_replicas, rank)


@pytest.fixture(scope="module")
def filtered(tmp_path_factory):
    """drop_null windows of 12 episodes; episodes 1, 4, 7, 10 are all null, so they have no window."""
    store = EpisodeStore.create(tmp_path_factory.mktemp("d") / "f", image_size=(2, 2))
    rng = np.random.default_rng(1)
    for i in range(12):
        n = int(rng.integers(3, 40))
        append_flagged(store, f"e{i}", np.ones(n, bool) if i % 3 == 1 else rng.random(n) < 0.5, i, rng)
    return WindowDataset(store, window=4, drop_null=True)


@pytest.mark.parametrize("batch_size, num_replicas", [(1, 1), (3, 1), (2, 2), (4, 2)])
def test_episodes_without_windows_are_passed_over(filtered, batch_size, num_replicas):
    assert [i for i, count in enumerate(filtered.windows_per_episode) if count == 0] == [1, 4, 7, 10]
    for epoch in (0, 1):
        order = torch.randperm(12, generator=torch.Generator().manual_seed(7 + epoch)).tolist()
        for rank in range(num_replicas):
            sampler = EpisodeContinuous(batch_size, seed=7, num_replicas=num_replicas, rank=rank)
            batches = sampler.batches(filtered, epoch)
            assert batches == reference_continuous(filtered, batch_size, order, num_replicas, rank)
            assert all(len(batch) == batch_size for batch in batches)
    assert len(EpisodeContinuous(1, seed=7).batches(filtered, 0)) == len(filtered)  # one row reads every window
    windows = [i for batch in RandomWindows(1, seed=7).batches(filtered, 0) for i in batch]
    assert sorted(windows) == list(range(len(filtered)))


def rows_of(batches, data):
    """For each batch row: the sequence of (episode, window number) it read."""
    rows = {}
    for batch in batches:
        for b, index in enumerate(batch):
            rows.setdefault(b, []).append(data.items[index])
    return rows


def test_rows_continue_their_episode_until_it_ends(data):
    sampler = EpisodeContinuous(batch_size=3, seed=4)
    started = []
    for row in rows_of(sampler.batches(data, 0), data).values():
        for (ep, k), (next_ep, next_k) in zip(row, row[1:]):
            if next_ep == ep:
                assert next_k == k + 1
            else:  # the episode ended: the row moves to the first window of a new episode
                assert k == data.windows_per_episode[ep] - 1 and next_k == 0
        started += [ep for ep, k in row if k == 0]
    assert sorted(started) == list(range(11))  # every episode started exactly once


@pytest.mark.parametrize("make", [lambda: EpisodeContinuous(2, seed=1), lambda: RandomWindows(2, seed=1)])
def test_each_epoch_reshuffles_reproducibly(data, make):
    a, b = make(), make()
    assert a.batches(data, 0) == b.batches(data, 0)
    assert a.batches(data, 1) != a.batches(data, 0)
    assert a.batches(data, 1) == b.batches(data, 1)


def test_episode_continuous_ranks_are_disjoint_and_cover_and_stay_in_step(data):
    samplers = [EpisodeContinuous(2, num_replicas=3, rank=r, seed=2) for r in range(3)]
    episodes = [{ep for row in rows_of(s.batches(data, 0), data).values() for ep, _ in row} for s in samplers]
    assert all(not (episodes[i] & episodes[j]) for i in range(3) for j in range(i + 1, 3))
    assert len({len(s.batches(data, 0)) for s in samplers}) == 1  # same number of batches on every rank
    one_row = [EpisodeContinuous(1, num_replicas=3, rank=r, shuffle=False) for r in range(3)]
    seen = sorted(i for s in one_row for batch in s.batches(data, 0) for i in batch)
    # with one row a rank reads its episodes whole; the shortest rank bounds them all
    assert len(seen) == len(set(seen)) == 3 * min(len(s.batches(data, 0)) for s in one_row)


@pytest.mark.parametrize("drop_last", [True, False])
def test_random_windows_are_disjoint_across_ranks_with_equal_batch_counts(data, drop_last):
    samplers = [RandomWindows(3, seed=5, drop_last=drop_last, num_replicas=4, rank=r) for r in range(4)]
    per_rank = [s.batches(data, 2) for s in samplers]
    assert len({len(b) for b in per_rank}) == 1
    windows = [i for batches in per_rank for batch in batches for i in batch]
    assert len(windows) == len(set(windows))
    share = len(data) // 4
    assert len(windows) == 4 * (share - share % 3 if drop_last else share)
    assert all(len(batch) == 3 for batch in per_rank[0][:-1])
    assert (len(per_rank[0][-1]) == 3) == (drop_last or share % 3 == 0)


def test_random_windows_without_shuffle_keep_dataset_order(data):
    assert RandomWindows(4, shuffle=False).batches(data, 3)[:2] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_builtin_samplers_follow_the_protocol():
    assert isinstance(RandomWindows(2), Sampler) and isinstance(EpisodeContinuous(2), Sampler)


def test_long_episodes_build_in_linear_time(tmp_path):
    """20k and 10k windows: an episode this long made MineStudio's ``pop(0)`` rows quadratic."""
    store = EpisodeStore.create(tmp_path / "s", image_size=(1, 1))
    fill_store(store, episodes=1, frames=20_000, seed=0)
    fill_store(store, episodes=1, frames=10_000, seed=1)
    data = WindowDataset(store, window=1)
    assert EpisodeContinuous(1, shuffle=False).batches(data, 0) == [[i] for i in range(30_000)]
    two_rows = EpisodeContinuous(2, shuffle=False).batches(data, 0)
    assert two_rows == [[i, 20_000 + i] for i in range(10_000)]  # row 1's episode ends, none is left: stop


def test_bad_ranks_and_batch_sizes_are_refused():
    for kwargs in (dict(num_replicas=2, rank=2), dict(rank=1), dict(num_replicas=0), dict(rank=-1)):
        with pytest.raises(ValueError, match="rank"):
            EpisodeContinuous(2, **kwargs)
        with pytest.raises(ValueError, match="rank"):
            RandomWindows(2, **kwargs)
    with pytest.raises(ValueError, match="batch_size must be >= 1; got 0"):
        RandomWindows(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_explicit_ranks_must_agree_with_the_process_group(data):
    built_before = EpisodeContinuous(2, num_replicas=2, rank=1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", world_size=1, rank=0)
    try:
        with pytest.raises(ValueError, match=r"num_replicas=2 .* world size is 1"):
            EpisodeContinuous(2, num_replicas=2)
        with pytest.raises(ValueError, match=r"rank=1 .* rank is 0"):
            RandomWindows(2, rank=1)
        with pytest.raises(ValueError, match=r"num_replicas=2 .* world size is 1"):
            built_before.batches(data, 0)  # a group initialised after construction is not overridden either
        sampler = RandomWindows(2, num_replicas=1, rank=0)
        assert (sampler.num_replicas, sampler.rank) == (1, 0)
        implicit, explicit = EpisodeContinuous(2, seed=3), EpisodeContinuous(2, seed=3, num_replicas=1, rank=0)
        assert implicit.batches(data, 0) == explicit.batches(data, 0)
    finally:
        torch.distributed.destroy_process_group()


def test_deprecated_batch_sampler_still_iterates_epochs(data):
    with pytest.warns(DeprecationWarning, match=r"make_loader\(store, window, EpisodeContinuous\(2, seed=1\)\)"):
        old = EpisodeContinuousBatchSampler(data, 2, seed=1)
    assert list(old) == EpisodeContinuous(2, seed=1).batches(data, 0) and len(old) == len(list(old))
    old.set_epoch(1)
    assert list(old) == EpisodeContinuous(2, seed=1).batches(data, 1)
