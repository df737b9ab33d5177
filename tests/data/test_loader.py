"""The loader: batch layout, continuity, epochs that advance themselves, exact resume, custom samplers."""

import json

import numpy as np
import optree
import pytest
import torch

from mstudio.data import (EpisodeContinuous, EpisodeStore, Loader, RandomWindows, WindowDataset, fill_store,
                          make_loader)
from tests.support.episodes import append_flagged


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = EpisodeStore.create(tmp_path_factory.mktemp("d") / "s", image_size=(8, 8))
    fill_store(store, episodes=11, frames=(3, 40), seed=0)
    return store


def assert_same(a, b):
    """Two batches (or lists of batches) hold equal tensors in the same structure."""
    assert optree.tree_structure(a) == optree.tree_structure(b)
    assert all(torch.equal(x, y) for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b)))


def take(loader, count):
    """The next ``count`` batches of ``loader``, crossing epochs."""
    batches = []
    while len(batches) < count:
        for batch in loader:
            batches.append(batch)
            if len(batches) == count:
                break
    return batches


def test_batches_hold_only_tensors_in_the_layout(store):
    loader = make_loader(store, 8, EpisodeContinuous(3, seed=5))
    batch = next(iter(loader))
    assert all(isinstance(leaf, torch.Tensor) for leaf in optree.tree_leaves(batch))
    assert set(batch) == {"image", "agent_action", "timestamp", "mask", "episode_index"}
    assert batch["image"].shape == (3, 8, 8, 8, 3) and batch["image"].dtype == torch.uint8
    assert batch["agent_action"]["camera"].shape == (3, 8, 1) and batch["agent_action"]["buttons"].dtype == torch.int64
    assert batch["timestamp"].dtype == torch.int64 and batch["timestamp"].shape == (3, 8)
    assert batch["mask"].dtype == torch.uint8 and batch["mask"].shape == (3, 8)
    assert batch["episode_index"].shape == (3,) and batch["episode_index"].dtype == torch.int64
    assert loader.episodes == store.episode_ids
    for b, position in enumerate(batch["episode_index"].tolist()):  # the index names the episode the row read
        frames = store.read(loader.episodes[position], 0, 8)["frames"]
        assert torch.equal(batch["image"][b, : len(frames)], torch.from_numpy(frames))


def test_rows_continue_across_batches_and_restart_only_at_episode_starts(store):
    loader = make_loader(store, 8, EpisodeContinuous(3, seed=5))
    batches = list(loader)
    assert len(batches) == len(make_loader(store, 8, EpisodeContinuous(3, seed=5))) > 3
    last, episode = torch.zeros(3, dtype=torch.long), torch.full((3,), -1)
    for batch in batches:
        starts = batch["timestamp"][:, 0] == 0
        continues = (batch["timestamp"][:, 0] == last + 1) & (batch["episode_index"] == episode)
        assert (starts ^ continues).all()  # every row either continues its episode or starts a new one
        assert (batch["episode_index"][starts] != episode[starts]).all()
        # the train step's reset rule (design.md, memory carry) fires on exactly these rows
        assert torch.equal(batch["timestamp"][:, 0] != last + 1, starts)
        last, episode = batch["timestamp"][:, -1], batch["episode_index"]


def test_each_iteration_is_one_epoch_and_reshuffles(store):
    loader = make_loader(store, 8, RandomWindows(4, seed=3))
    first = [b["episode_index"].tolist() + b["timestamp"][:, 0].tolist() for b in loader]
    assert loader.epoch == 1 and loader.state_dict() == {"epoch": 1, "batch": 0}
    second = [b["episode_index"].tolist() + b["timestamp"][:, 0].tolist() for b in loader]
    assert loader.epoch == 2 and len(first) == len(second) == len(loader) > 0
    assert first != second
    dataset = loader.dataset  # the order is the sampler's for each epoch, no set_epoch needed
    expected = RandomWindows(4, seed=3).batches(dataset, 1)
    assert second == [[dataset.items[i][0] for i in b] + [dataset.items[i][1] * 8 for i in b] for b in expected]


@pytest.mark.parametrize("make", [lambda: EpisodeContinuous(3, seed=5), lambda: RandomWindows(4, seed=2)])
def test_resume_gives_the_batches_of_an_uninterrupted_run(store, make):
    reference = make_loader(store, 8, make())
    per_epoch = len(reference)
    uninterrupted = take(reference, 2 * per_epoch + 3)
    for stop in (0, 2, per_epoch - 1, per_epoch, per_epoch + 4):
        first = make_loader(store, 8, make())
        head = take(first, stop)
        state = json.loads(json.dumps(first.state_dict()))
        assert state == {"epoch": stop // per_epoch, "batch": stop % per_epoch}
        resumed = make_loader(store, 8, make())
        resumed.load_state_dict(state)
        assert_same(head + take(resumed, len(uninterrupted) - stop), uninterrupted)


@pytest.fixture(scope="module")
def flagged(tmp_path_factory):
    """10 episodes with null frames flagged (about a third), one of them all null."""
    store = EpisodeStore.create(tmp_path_factory.mktemp("d") / "f", image_size=(4, 4))
    rng = np.random.default_rng(3)
    for i in range(10):
        n = int(rng.integers(5, 60))
        append_flagged(store, f"e{i}", np.ones(n, bool) if i == 6 else rng.random(n) < 0.35, i, rng)
    return store


@pytest.mark.parametrize("make", [lambda: EpisodeContinuous(3, seed=5), lambda: RandomWindows(4, seed=2)])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_with_drop_null_is_exact(flagged, make, num_workers):
    options = dict(skip_frame=2, drop_null=True)
    reference = make_loader(flagged, 6, make(), **options)
    per_epoch = len(reference)
    uninterrupted = take(reference, 2 * per_epoch + 1)
    for batch in uninterrupted:  # the filter is on: every real step is a non-null frame
        assert (batch["agent_action"]["buttons"][batch["mask"].bool()] != 0).all()
    for stop in (1, per_epoch + 2):
        first = make_loader(flagged, 6, make(), num_workers=num_workers, **options)
        head = take(first, stop)
        resumed = make_loader(flagged, 6, make(), num_workers=num_workers, **options)
        resumed.load_state_dict(first.state_dict())
        assert_same(head + take(resumed, len(uninterrupted) - stop), uninterrupted)


def test_a_loop_left_early_continues_where_it_stopped(store):
    loader = make_loader(store, 8, EpisodeContinuous(2, seed=1))
    uninterrupted = take(make_loader(store, 8, EpisodeContinuous(2, seed=1)), len(loader))
    head = take(loader, 3)
    assert loader.state_dict() == {"epoch": 0, "batch": 3}
    assert_same(head + list(loader), uninterrupted)


class CountingWindows(WindowDataset):
    """Counts the items read."""

    reads = 0

    def __getitem__(self, index):
        self.reads += 1
        return super().__getitem__(index)


def test_resume_reads_none_of_the_skipped_data(store):
    dataset = CountingWindows(store, 8)
    loader = Loader(dataset, EpisodeContinuous(2, seed=1))
    loader.load_state_dict({"epoch": 0, "batch": len(loader) - 2})
    assert len(list(loader)) == 2 and dataset.reads == 2 * 2


def test_resume_mid_epoch_with_workers(store):
    uninterrupted = take(make_loader(store, 8, EpisodeContinuous(3, seed=5)), 8)
    workers = make_loader(store, 8, EpisodeContinuous(3, seed=5), num_workers=2)
    head = take(workers, 3)  # the workers have prefetched more than 3 batches by now
    state = workers.state_dict()
    assert state == {"epoch": 0, "batch": 3}
    assert_same(head + take(workers, 2), uninterrupted[:5])  # the same workers continue (prefetch discarded)
    resumed = make_loader(store, 8, EpisodeContinuous(3, seed=5), num_workers=2)
    resumed.load_state_dict(state)
    assert_same(take(resumed, 5), uninterrupted[3:])


class EveryEpisodeStart:
    """A user's sampler: the first windows of all episodes, two per batch, in reverse order on odd epochs."""

    batch_size = 2

    def batches(self, dataset, epoch):
        starts = dataset.first_item[::-1] if epoch % 2 else dataset.first_item
        return [starts[i:i + 2] for i in range(0, len(starts) - 1, 2)]


def test_a_custom_sampler_works_through_make_loader(store):
    loader = make_loader(store, 8, EveryEpisodeStart())
    even, odd = list(loader), list(loader)
    assert len(even) == len(odd) == 5
    assert torch.cat([b["episode_index"] for b in even]).tolist() == list(range(10))
    assert torch.cat([b["episode_index"] for b in odd]).tolist() == list(range(10, 0, -1))
    assert all(b["timestamp"][:, 0].eq(0).all() for b in even + odd)
    with pytest.raises(TypeError, match="sampler must follow mstudio.data.Sampler"):
        make_loader(store, 8, object())


def test_bad_states_and_empty_epochs_are_refused(store):
    loader = make_loader(store, 8, EpisodeContinuous(2))
    for state in ({"epoch": 0}, {"epoch": -1, "batch": 0}, {"epoch": 0, "batch": 1.5}):
        with pytest.raises(ValueError, match="a loader state is"):
            loader.load_state_dict(state)
    with pytest.raises(ValueError, match="past the end of epoch 0"):
        loader.load_state_dict({"epoch": 0, "batch": len(loader) + 1})
    with pytest.raises(ValueError, match=r"EpisodeContinuous gives no batches of 12 for epoch 0: .* batch_size <= "
                                         r"the episodes per rank"):
        make_loader(store, 8, EpisodeContinuous(12))  # refused when made, not at the first batch
    with pytest.raises(ValueError, match=r"no batches of 6 for epoch 0 on rank 1 of 2: .* 5 episodes and"):
        make_loader(store, 8, EpisodeContinuous(6, num_replicas=2, rank=1))


def test_the_old_call_still_works_and_says_what_to_write(store):
    with pytest.warns(DeprecationWarning, match=r"write make_loader\(store, 8, EpisodeContinuous\(3, seed=5\)\)"):
        old = make_loader(store, 3, 8, continuous=True, seed=5)
    assert_same(list(old), list(make_loader(store, 8, EpisodeContinuous(3, seed=5))))
    with pytest.warns(DeprecationWarning, match=r"RandomWindows\(4, num_replicas=2, rank=1\)"):
        old = make_loader(store, batch_size=4, window=8, num_replicas=2, rank=1)
    assert_same(list(old), list(make_loader(store, 8, RandomWindows(4, num_replicas=2, rank=1))))
    with pytest.raises(TypeError, match="needs a sampler"):
        make_loader(store, 8)
    with pytest.raises(TypeError, match="give those to the sampler"):
        make_loader(store, 8, RandomWindows(2), seed=1)
