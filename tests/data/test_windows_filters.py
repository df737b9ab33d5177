"""Load-time filters of WindowDataset: drop_null and skip_frame, alone and together, against a plain reference."""

import numpy as np
import pytest
import torch

from mstudio.data import EpisodeContinuous, EpisodeStore, RandomWindows, ShardedStore, WindowDataset, make_loader
from mstudio.data.video_codec import VideoCodec
from mstudio.data.contractor_import import FLAG_NULL
from tests.support.episodes import append_flagged, frame_ids

# (length, null pattern): "random" nulls with p=0.4, a long null run (> 32 frames, so a window reads in two
# runs), all null, a single kept frame, none null
EPISODES = [(70, "random"), (90, "long-run"), (25, "all"), (40, "one"), (33, "none"), (57, "random")]


def null_pattern(kind, n, rng):
    if kind == "random":
        return rng.random(n) < 0.4
    if kind == "long-run":
        null = rng.random(n) < 0.2
        null[20:70] = True
        return null
    if kind == "all":
        return np.ones(n, dtype=bool)
    if kind == "one":
        null = np.ones(n, dtype=bool)
        null[17] = False
        return null
    return np.zeros(n, dtype=bool)


def counting(cls):
    """``cls`` (a store class) recording every read as ``(episode, start, stop, keys)`` in ``store.reads``."""
    class Counting(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.reads = []

        def read(self, episode_id, start=0, stop=None, **kwargs):
            self.reads.append((episode_id, start, stop, kwargs.get("keys")))
            return super().read(episode_id, start, stop, **kwargs)
    return Counting


# name -> (store class, create options, lossless): the raw stores and the H.264 one (whose reads decode chunks)
KINDS = {"episode": (EpisodeStore, {}, True), "sharded": (ShardedStore, {}, True),
         "sharded-video": (ShardedStore, {"codec": VideoCodec(chunk_frames=16, gop=16)}, False)}


def build(kind, root):
    """A store of ``kind`` at ``root`` whose frames name themselves (``tests.support.episodes``), with the null
    patterns of EPISODES."""
    cls, options, _ = KINDS[kind]
    store = cls.create(root, image_size=(16, 16), **options)
    rng = np.random.default_rng(0)
    for number, (n, pattern) in enumerate(EPISODES):
        append_flagged(store, f"ep{number}", null_pattern(pattern, n, rng), number, rng)
    return root


@pytest.fixture(scope="module", params=list(KINDS))
def made(request, tmp_path_factory):
    return request.param, build(request.param, tmp_path_factory.mktemp("d") / "s")


@pytest.fixture
def any_store(made):
    """A fresh store of each kind, counting its reads."""
    return counting(KINDS[made[0]][0]).open(made[1])


@pytest.fixture(scope="module")
def episode_root(tmp_path_factory):
    return build("episode", tmp_path_factory.mktemp("d") / "s")


@pytest.fixture
def store(episode_root):
    """The raw EpisodeStore, counting its reads (for tests that need one kind only)."""
    return counting(EpisodeStore).open(episode_root)


def reference_windows(store, window, skip_frame, drop_null):
    """Per episode, its windows as lists of frame numbers: the definition written plainly, frame by frame."""
    out = []
    for episode in store.episode_ids:
        data = store.read(episode)
        frames = [i for i in range(store.length(episode)) if not (drop_null and data["flags"][i] & FLAG_NULL)]
        steps = frames[::skip_frame]  # nulls go first, then every skip_frame-th kept frame
        out.append([steps[i:i + window] for i in range(0, len(steps), window)])
    return out


@pytest.mark.parametrize("window, skip_frame, drop_null", [(8, 1, True), (8, 3, False), (8, 3, True), (5, 2, True),
                                                          (16, 1, False), (4, 40, True)])
def test_windows_hold_exactly_the_reference_steps(any_store, window, skip_frame, drop_null):
    store, lossless = any_store, isinstance(any_store, EpisodeStore) or any_store.codec is None
    data = WindowDataset(store, window, skip_frame=skip_frame, drop_null=drop_null)
    expected = reference_windows(store, window, skip_frame, drop_null)
    assert data.windows_per_episode == [len(w) for w in expected]
    assert len(data) == sum(len(w) for w in expected)
    for index, (position, k) in enumerate(data.items):
        steps, item = expected[position][k], data[index]
        n = len(steps)
        raw = store.read(data.episodes[position])
        # the frames the store itself gives for those numbers (decoded, for the H.264 store) ...
        assert torch.equal(item["image"][:n], torch.from_numpy(raw["frames"][steps]))
        if lossless:  # ... which, when stored raw, name themselves
            frames, episodes = frame_ids(item["image"])
            assert frames[:n] == steps and set(episodes[:n]) == {position}
        assert data.frame_numbers(index).tolist() == steps
        assert item["agent_action"]["buttons"][:n, 0].tolist() == raw["buttons"][steps].tolist()
        assert item["agent_action"]["camera"][:n, 0].tolist() == raw["camera"][steps].tolist()
        if drop_null:
            assert (item["agent_action"]["buttons"][:n] != 0).all()  # in this store, null <=> buttons 0
        assert item["mask"].tolist() == [1] * n + [0] * (window - n)
        assert item["image"][n:].eq(0).all() and item["agent_action"]["buttons"][n:].eq(0).all()
        assert item["agent_action"]["camera"][n:].eq(60).all()
        assert item["timestamp"].tolist() == list(range(k * window, (k + 1) * window))


def test_drop_null_off_is_the_plain_skip_frame_window(store):
    """Without drop_null nothing changes: the same items as a dataset built the old way."""
    new, old = WindowDataset(store, 8, skip_frame=3, drop_null=False), WindowDataset(store, 8, skip_frame=3)
    assert new.items == old.items and not old.drop_null
    for index in range(len(new)):
        assert all(torch.equal(a, b) for a, b in zip(new[index].values(), old[index].values())
                   if isinstance(a, torch.Tensor))


def test_timestamps_continue_across_windows_and_all_null_episodes_have_none(store):
    data = WindowDataset(store, 8, drop_null=True)
    all_null = data.episodes.index("ep2")
    assert data.windows_per_episode[all_null] == 0 and all(p != all_null for p, _ in data.items)
    assert data.windows_per_episode[data.episodes.index("ep3")] == 1  # a single kept frame: one padded window
    for position, count in enumerate(data.windows_per_episode):
        stamps = [data[data.first_item[position] + k]["timestamp"] for k in range(count)]
        for before, after in zip(stamps, stamps[1:]):
            assert after[0] == before[-1] + 1


def test_kept_frames_come_from_flags_alone_and_windows_read_spans(any_store):
    store = any_store
    data = WindowDataset(store, 8, drop_null=True)
    assert store.reads == [(e, 0, None, ("flags",)) for e in store.episode_ids]  # once per episode, flags only
    long_run, split = data.episodes.index("ep1"), 0
    for k in range(data.windows_per_episode[long_run]):
        frames = data.frame_numbers(data.first_item[long_run] + k)
        store.reads.clear()
        data[data.first_item[long_run] + k]
        gaps = np.flatnonzero(np.diff(frames) > 32)
        # one read per run of nearby frames, each from its first frame to its last: never frame by frame
        runs = np.split(frames, gaps + 1)
        assert store.reads == [("ep1", int(r[0]), int(r[-1]) + 1, ("frames", "buttons", "camera")) for r in runs]
        split += len(runs) > 1
    assert split == 1  # the window that spans the 50-frame null run reads around it


def test_all_null_store_gives_a_clear_error(tmp_path):
    store = EpisodeStore.create(tmp_path / "s", image_size=(2, 2))
    for i in range(3):
        store.append(f"e{i}", {"frames": np.zeros((5, 2, 2, 3), np.uint8), "buttons": np.zeros(5, np.int16),
                               "camera": np.full(5, 60, np.uint8), "env_buttons": np.zeros(5, np.uint32),
                               "env_camera": np.zeros((5, 2), np.float32), "flags": np.ones(5, np.uint8)})
    assert len(WindowDataset(store, 4, drop_null=True)) == 0
    for sampler in (EpisodeContinuous(1), RandomWindows(1)):
        with pytest.raises(ValueError, match=r"0 windows in 3 episodes.*drop_null left 3 episodes without a step"):
            make_loader(store, 4, sampler, drop_null=True)
    assert len(make_loader(store, 4, EpisodeContinuous(1))) == 3 * 2  # the same store without the filter


def test_bad_drop_null_is_refused(store):
    for value in (1, "yes", None):
        with pytest.raises(TypeError, match=r"drop_null must be a bool; got"):
            WindowDataset(store, 8, drop_null=value)


def test_continuous_rows_reset_memory_exactly_at_episode_starts(store):
    """The train step's rule (reset where timestamp[:, 0] != last + 1) fires exactly where a row's episode changes."""
    loader = make_loader(store, 8, EpisodeContinuous(2, seed=3), drop_null=True)
    data = loader.dataset
    last, episode, seen = torch.zeros(2, dtype=torch.long), torch.full((2,), -1), []
    for batch in loader:
        reset = batch["timestamp"][:, 0] != last + 1
        assert torch.equal(reset, batch["episode_index"] != episode)
        assert torch.equal(reset, batch["timestamp"][:, 0] == 0)
        for b in range(2):  # every row reads its episode's next kept frames
            position, k = int(batch["episode_index"][b]), int(batch["timestamp"][b, 0]) // 8
            frames, _ = frame_ids(batch["image"][b])
            n = int(batch["mask"][b].sum())
            assert frames[:n] == data.frame_numbers(data.first_item[position] + k).tolist()
        seen += batch["episode_index"][reset].tolist()
        last, episode = batch["timestamp"][:, -1], batch["episode_index"]
    assert data.episodes.index("ep2") not in seen


def test_forked_workers_give_the_same_batches(store):
    alone = list(make_loader(store, 8, RandomWindows(2, seed=1), drop_null=True, skip_frame=2))
    forked = list(make_loader(store, 8, RandomWindows(2, seed=1), drop_null=True, skip_frame=2, num_workers=2))
    assert len(alone) == len(forked) > 0
    for a, b in zip(alone, forked):
        assert all(torch.equal(a[key], b[key]) for key in ("image", "timestamp", "mask", "episode_index"))
        assert torch.equal(a["agent_action"]["buttons"], b["agent_action"]["buttons"])


def test_the_trainer_config_carries_drop_null(store):
    from mstudio.trainer import build, evaluate
    from mstudio.trainer.config import ConfigError, config_from_dict

    config = config_from_dict({"data": {"window": 8, "batch_size": 1, "drop_null": True, "val_episodes": 1}})
    train, val = build.build_loaders(config.data, store, seed=0)
    assert train.dataset.drop_null and val.dataset.drop_null
    assert evaluate._eval_loader(config, store).dataset.drop_null
    assert not config_from_dict({}).data.drop_null  # off by default (MineStudio parity)
    with pytest.raises(ConfigError, match=r"data.drop_null: expected bool, got str 'yes'"):
        config_from_dict({"data": {"drop_null": "yes"}})
