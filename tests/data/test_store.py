"""EpisodeStore: round trip, atomic appends, reopening, and errors that name what is wrong."""

import json
import os

import numpy as np
import pytest

from mstudio.data import EpisodeStore, fill_store
from tests.support.episodes import random_episode as episode


def test_round_trip_and_reopen(tmp_path):
    store = EpisodeStore.create(tmp_path / "s", image_size=(4, 6), meta={"source": "test"})
    a, b = episode(5), episode(9, seed=1)
    store.append("a", a, {"segments": [0]})
    store.append("b", b)
    again = EpisodeStore.open(tmp_path / "s")
    assert again.episode_ids == ["a", "b"] and len(again) == 2 and "a" in again and "c" not in again
    assert again.length("b") == 9 and again.info("a") == {"segments": [0]}
    assert again.manifest["meta"] == {"source": "test"} and again.manifest["n_buttons"] == 8641
    window = again.read("b", 2, 7)
    for key, value in b.items():
        np.testing.assert_array_equal(window[key], value[2:7])
        assert window[key].dtype == value.dtype
    assert all(np.array_equal(again.read("a")[k], a[k]) for k in a)


def test_a_crash_mid_append_leaves_no_partial_episode(tmp_path, monkeypatch):
    store = EpisodeStore.create(tmp_path / "s", image_size=(4, 6))
    store.append("a", episode())
    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith("index.json"):
            raise OSError("simulated crash before the index is written")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        store.append("b", episode(7))
    monkeypatch.setattr(os, "replace", real_replace)
    reopened = EpisodeStore.open(tmp_path / "s")
    assert reopened.episode_ids == ["a"]  # the half-written episode is invisible
    reopened.append("b", episode(7, seed=3))  # and its leftovers do not get in the way
    np.testing.assert_array_equal(EpisodeStore.open(tmp_path / "s").read("b")["frames"], episode(7, seed=3)["frames"])
    assert json.loads((tmp_path / "s" / "index.json").read_text())["b"]["length"] == 7


def test_bad_input(tmp_path):
    store = EpisodeStore.create(tmp_path / "s", image_size=(4, 6))
    bad = episode()
    bad["frames"] = bad["frames"].astype(np.float32)
    with pytest.raises(ValueError, match=r"arrays\['frames'\] must be uint8 \(N, 4, 6, 3\); got float32"):
        store.append("x", bad)
    bad = episode()
    bad["camera"] = bad["camera"][:3]
    with pytest.raises(ValueError, match="same number of frames"):
        store.append("x", bad)
    bad = episode()
    del bad["flags"]
    with pytest.raises(ValueError, match="exactly the arrays"):
        store.append("x", bad)
    bad = episode()
    bad["camera"][0] = 200
    with pytest.raises(ValueError, match=r"\[0, 121\)"):
        store.append("x", bad)
    store.append("x", episode())
    with pytest.raises(ValueError, match="already in the store"):
        store.append("x", episode())
    with pytest.raises(IndexError, match="outside episode 'x' of 5 frames"):
        store.read("x", 3, 9)
    with pytest.raises(KeyError, match="no episode 'y'"):
        store.read("y")
    with pytest.raises(FileExistsError):
        EpisodeStore.create(tmp_path / "s", image_size=(4, 6))
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        EpisodeStore.open(tmp_path)


def test_fill_store_makes_valid_episodes(tmp_path):
    store = EpisodeStore.create(tmp_path / "s", image_size=(8, 8))
    ids = fill_store(store, episodes=3, frames=(4, 9), seed=1)
    ids += fill_store(store, episodes=2, frames=5, seed=1)
    assert store.episode_ids == ids and len(set(ids)) == 5
    assert all(4 <= store.length(e) <= 9 for e in ids)


def test_fill_store_flags_null_frames_as_the_importers_do(tmp_path):
    # joint buttons index 0 is drawn once in 8641 frames: 30k one-pixel frames hold a few (seed 0: five)
    store = EpisodeStore.create(tmp_path / "s", image_size=(1, 1))
    (episode,) = fill_store(store, episodes=1, frames=30_000, seed=0)
    arrays = store.read(episode)
    null = arrays["buttons"] == 0
    assert null.sum() >= 1
    np.testing.assert_array_equal(arrays["flags"], null.astype(np.uint8))
