"""Adversarial cases for ``make_loader``, :class:`Loader`, the samplers and :class:`WindowDataset`.

The store (``tmp / "s"``) holds three episodes of 10 frames (8x8), so 3 windows of 4 steps each per episode.
A loader that cannot give a batch must say so when it is made, naming the argument and the numbers; it never
yields 0 batches silently.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mstudio.data import (EpisodeContinuous, EpisodeContinuousBatchSampler, EpisodeStore, Loader, RandomWindows,
                          WindowDataset, make_loader)
from tests.adversarial.cases_store import episode, root
from tests.adversarial.harness import Case, Handled, Refused

WINDOW = 4


def store(tmp: Path, episodes: int = 3) -> EpisodeStore:
    made = EpisodeStore.create(root(tmp), (8, 8))
    for i in range(episodes):
        made.append("abc"[i] if i < 3 else f"e{i}", episode(10, i + 1), {"value": i + 1})
    return made


def loader(window: Any = WINDOW, sampler: Callable[[], Any] = lambda: RandomWindows(2), episodes: int = 3,
           **options: Any) -> Callable[[Path], Loader]:
    """``make_loader(store, window, sampler(), **options)``: made, then its first batch read."""
    def attack(tmp):
        made = make_loader(store(tmp, episodes), window, sampler(), **options)
        next(iter(made))
        return made
    return attack


def sampler_made(make: Callable[[], Any]) -> Callable[[Path], Any]:
    return lambda tmp: make()


class NoBatches:
    """A sampler of one's own that finds nothing to batch."""

    batch_size = 2

    def batches(self, dataset: WindowDataset, epoch: int) -> list[list[int]]:
        return []


def resumed(state: Any, sampler: Callable[[], Any] = lambda: RandomWindows(2)) -> Callable[[Path], Loader]:
    def attack(tmp):
        made = make_loader(store(tmp), WINDOW, sampler())
        made.load_state_dict(state)
        return made
    return attack


def dataset(window: Any = WINDOW, **options: Any) -> Callable[[Path], WindowDataset]:
    return lambda tmp: WindowDataset(store(tmp), window, **options)


def item(index: Any) -> Callable[[Path], Any]:
    return lambda tmp: WindowDataset(store(tmp), WINDOW)[index]


def check_batches(count: int, rows: int) -> Callable[[Loader, Path], None]:
    """A check: the loader's epoch 0 is ``count`` batches, the first of ``rows`` rows."""
    def check(made, tmp):
        made.load_state_dict({"epoch": 0, "batch": 0})
        sizes = [len(batch["mask"]) for batch in made]
        assert len(made) == count and len(sizes) == count and sizes[0] == rows, (len(made), sizes)
    return check


def resume_matches(tmp: Path) -> tuple[list, list]:
    """An epoch read whole, and the same epoch read as 2 batches, a state round trip, and the rest."""
    made = make_loader(store(tmp), WINDOW, EpisodeContinuous(2, seed=3))
    whole = [b["episode_index"].tolist() + b["timestamp"][:, 0].tolist() for b in made]
    first = make_loader(EpisodeStore.open(root(tmp)), WINDOW, EpisodeContinuous(2, seed=3))
    it = iter(first)
    head = [next(it) for _ in range(2)]
    state = dict(first.state_dict())
    again = make_loader(EpisodeStore.open(root(tmp)), WINDOW, EpisodeContinuous(2, seed=3))
    again.load_state_dict(state)
    rest = head + list(again)
    return whole, [b["episode_index"].tolist() + b["timestamp"][:, 0].tolist() for b in rest]


def check_resume(result: tuple[list, list], tmp: Path) -> None:
    whole, resumed_run = result
    assert whole == resumed_run and len(whole) >= 3, (whole, resumed_run)


def damaged_store(tmp: Path) -> list:
    """A loader over a store whose episode 'b' has 64 zeroed bytes in its frames."""
    made = store(tmp)
    path = root(tmp) / "episodes" / "1" / "frames.npy"
    data = path.read_bytes()
    path.write_bytes(data[:200] + bytes(64) + data[264:])
    return list(make_loader(made, WINDOW, RandomWindows(9, shuffle=False)))


def deprecated(make: Callable[[Path], Any]) -> Callable[[Path], list]:
    """The batches of a deprecated call, which must still work and warn with what to write instead."""
    def attack(tmp):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batches = list(make(tmp))
        assert any(issubclass(w.category, DeprecationWarning) for w in caught), "no DeprecationWarning"
        return batches
    return attack


def legacy_loader(tmp: Path) -> Loader:
    """make_loader(store, batch_size, window, continuous=True): the deprecated call."""
    return make_loader(store(tmp), 3, WINDOW, continuous=True)


def old_sampler(tmp: Path) -> EpisodeContinuousBatchSampler:
    return EpisodeContinuousBatchSampler(WindowDataset(store(tmp), WINDOW), 3)


def equal(get: Callable[[Any], Any], want: Any) -> Callable[[Any, Path], None]:
    """A check: ``get(result) == want``."""
    def check(result, tmp):
        got = get(result)
        assert got == want, f"got {got!r}, expected {want!r}"
    return check


def _l(name: str, run: Callable[[Path], Any], expect: Refused | Handled) -> Case:
    return Case("loader", name, run, expect)


def ok(count: int, rows: int = 2) -> Handled:
    return Handled(check_batches(count, rows))


CASES = [
    # the store argument
    _l("store-a-string", lambda tmp: (store(tmp), make_loader(str(root(tmp)), WINDOW, RandomWindows(2)))[1],
       Refused(TypeError, "store", "EpisodeStore", "str")),
    _l("store-a-path", lambda tmp: (store(tmp), make_loader(root(tmp), WINDOW, RandomWindows(2)))[1],
       Refused(TypeError, "store", "EpisodeStore", "PosixPath")),
    _l("store-none", lambda tmp: make_loader(None, WINDOW, RandomWindows(2)),
       Refused(TypeError, "store", "EpisodeStore", "NoneType")),
    _l("store-empty", loader(episodes=0), Refused(ValueError, "no batches", "0 episodes")),
    _l("store-damaged-frames", damaged_store, Refused(ValueError, "episodes/1/frames.npy", "episode 'b'", "checksum")),

    # window and skip_frame
    _l("window-zero", loader(0), Refused(ValueError, "window", ">= 1", "0")),
    _l("window-negative", loader(-4), Refused(ValueError, "window", ">= 1", "-4")),
    _l("window-float", loader(2.5), Refused(TypeError, "window", "integer", "2.5")),
    _l("window-string", loader("4"), Refused(TypeError, "window", "integer", "'4'")),
    _l("window-bool", loader(True), Refused(TypeError, "window", "integer", "True")),
    _l("window-none", loader(None), Refused(TypeError, "window", "integer", "None")),
    _l("window-numpy-int", loader(np.int64(WINDOW)), ok(4)),
    _l("window-longer-than-episodes", loader(50), ok(1)),
    _l("skip-frame-zero", loader(skip_frame=0), Refused(ValueError, "skip_frame", ">= 1", "0")),
    _l("skip-frame-float", loader(skip_frame=1.5), Refused(TypeError, "skip_frame", "integer", "1.5")),
    _l("drop-null-int", loader(drop_null=1), Refused(TypeError, "drop_null", "bool", "1")),
    _l("drop-null-string", loader(drop_null="False"), Refused(TypeError, "drop_null", "bool", "'False'")),
    _l("num-workers-negative", loader(num_workers=-1), Refused(ValueError, "num_workers", ">= 0", "-1")),
    _l("num-workers-string", loader(num_workers="2"), Refused(TypeError, "num_workers", "integer", "'2'")),

    # batch sizes a loader cannot fill: a clear error when it is made, never 0 batches
    _l("continuous-batch-larger-than-episodes", loader(sampler=lambda: EpisodeContinuous(8)),
       Refused(ValueError, "batch_size", "8", "3 episodes")),
    _l("continuous-batch-larger-than-episodes-per-rank",
       loader(sampler=lambda: EpisodeContinuous(2, num_replicas=2, rank=1)),
       Refused(ValueError, "batch_size", "2", "rank 1", "1 episode")),
    _l("continuous-more-ranks-than-episodes", loader(sampler=lambda: EpisodeContinuous(1, num_replicas=4, rank=0)),
       Refused(ValueError, "batch_size", "rank 0 of 4", "0 episodes")),
    _l("continuous-batch-equal-to-episodes", loader(sampler=lambda: EpisodeContinuous(3)), ok(3, 3)),
    _l("random-batch-larger-than-windows", loader(sampler=lambda: RandomWindows(10)),
       Refused(ValueError, "batch_size", "10", "9 windows")),
    _l("random-batch-larger-than-windows-per-rank", loader(sampler=lambda: RandomWindows(5, num_replicas=2, rank=0)),
       Refused(ValueError, "batch_size", "5", "4 windows")),
    _l("random-batch-larger-keep-last", loader(sampler=lambda: RandomWindows(10, drop_last=False)), ok(1, 9)),
    _l("custom-sampler-without-batches", lambda tmp: make_loader(store(tmp), WINDOW, NoBatches()),
       Refused(ValueError, "NoBatches", "no batches of 2", "9 windows in 3 episodes")),
    _l("loader-made-directly-refuses-at-iteration", lambda tmp: next(iter(Loader(WindowDataset(store(tmp), WINDOW),
                                                                                EpisodeContinuous(4)))),
       Refused(ValueError, "EpisodeContinuous", "no batches of 4", "3 episodes", "batch_size")),

    # sampler arguments
    _l("batch-size-zero", sampler_made(lambda: RandomWindows(0)), Refused(ValueError, "batch_size", ">= 1", "0")),
    _l("batch-size-negative", sampler_made(lambda: EpisodeContinuous(-2)), Refused(ValueError, "batch_size", "-2")),
    _l("batch-size-float", sampler_made(lambda: RandomWindows(2.5)),
       Refused(TypeError, "batch_size", "integer", "2.5")),
    _l("batch-size-string", sampler_made(lambda: EpisodeContinuous("8")), Refused(TypeError, "batch_size", "'8'")),
    _l("batch-size-bool", sampler_made(lambda: RandomWindows(True)), Refused(TypeError, "batch_size", "True")),
    _l("batch-size-none", sampler_made(lambda: RandomWindows(None)), Refused(TypeError, "batch_size", "None")),
    _l("batch-size-numpy-int", loader(sampler=lambda: EpisodeContinuous(np.int64(2))), ok(3)),
    _l("seed-string", sampler_made(lambda: RandomWindows(2, seed="7")), Refused(TypeError, "seed", "integer", "'7'")),
    _l("seed-float", sampler_made(lambda: EpisodeContinuous(2, seed=0.5)), Refused(TypeError, "seed", "0.5")),
    _l("num-replicas-zero", sampler_made(lambda: RandomWindows(2, num_replicas=0)),
       Refused(ValueError, "num_replicas", ">= 1", "0")),
    _l("rank-equal-to-world", sampler_made(lambda: EpisodeContinuous(2, num_replicas=2, rank=2)),
       Refused(ValueError, "rank", "rank=2", "num_replicas=2")),
    _l("rank-negative", sampler_made(lambda: RandomWindows(2, num_replicas=2, rank=-1)),
       Refused(ValueError, "rank=-1")),
    _l("rank-float", sampler_made(lambda: RandomWindows(2, num_replicas=2, rank=0.5)),
       Refused(TypeError, "rank", "integer", "0.5")),
    _l("num-replicas-string", sampler_made(lambda: EpisodeContinuous(2, num_replicas="2")),
       Refused(TypeError, "num_replicas", "integer", "'2'")),
    _l("rank-without-world", sampler_made(lambda: RandomWindows(2, rank=1)),
       Refused(ValueError, "rank=1", "num_replicas=1")),
    _l("sampler-a-list", lambda tmp: make_loader(store(tmp), WINDOW, [[0, 1]]), Refused(TypeError, "sampler", "list")),
    _l("sampler-a-class", lambda tmp: make_loader(store(tmp), WINDOW, RandomWindows),
       Refused(TypeError, "sampler", "type")),
    _l("deprecated-call", deprecated(legacy_loader), Handled(equal(len, 3))),
    _l("deprecated-batch-sampler", deprecated(old_sampler), Handled(equal(len, 3))),
    _l("deprecated-unknown-keyword", lambda tmp: make_loader(store(tmp), 2, WINDOW, shuffle_episodes=True),
       Refused(TypeError, "shuffle_episodes")),

    # resuming from a state dict
    _l("state-a-list", resumed([0, 1]), Refused(TypeError, "loader state", "dict", "list")),
    _l("state-none", resumed(None), Refused(TypeError, "loader state", "NoneType")),
    _l("state-missing-batch", resumed({"epoch": 0}), Refused(ValueError, "'epoch'", "'batch'", "{'epoch': 0}")),
    _l("state-extra-key", resumed({"epoch": 0, "batch": 0, "seed": 1}), Refused(ValueError, "'seed'")),
    _l("state-negative-batch", resumed({"epoch": 0, "batch": -1}), Refused(ValueError, "int >= 0", "-1")),
    _l("state-float-epoch", resumed({"epoch": 1.0, "batch": 0}), Refused(ValueError, "int >= 0", "1.0")),
    _l("state-bool-batch", resumed({"epoch": 0, "batch": True}), Refused(ValueError, "int >= 0", "True")),
    _l("state-string-batch", resumed({"epoch": 0, "batch": "2"}), Refused(ValueError, "int >= 0", "'2'")),
    _l("state-batch-past-epoch", resumed({"epoch": 0, "batch": 99}),
       Refused(ValueError, "batch 99", "past the end of epoch 0", "4 batches")),
    _l("state-from-smaller-batches", resumed({"epoch": 0, "batch": 4}, lambda: EpisodeContinuous(3)),
       Refused(ValueError, "batch 4", "3 batches")),
    _l("state-end-of-epoch", resumed({"epoch": 2, "batch": 4}),
       Handled(equal(Loader.state_dict, {"epoch": 3, "batch": 0}))),
    _l("state-numpy-ints", resumed({"epoch": np.int64(1), "batch": np.int64(2)}),
       Handled(equal(Loader.state_dict, {"epoch": 1, "batch": 2}))),
    _l("state-round-trip-mid-epoch", resume_matches, Handled(check_resume)),

    # the dataset
    _l("dataset-episodes-a-string", dataset(episodes="abc"), Refused(TypeError, "episodes", "str")),
    _l("dataset-episodes-unknown", dataset(episodes=["a", "zz"]), Refused(KeyError, "episodes", "'zz'")),
    _l("dataset-episodes-repeated", dataset(episodes=["a", "b", "a"]), Refused(ValueError, "episodes", "'a'", "twice")),
    _l("dataset-store-a-dict", lambda tmp: WindowDataset({"a": 1}, WINDOW),
       Refused(TypeError, "store", "EpisodeStore", "dict")),
    _l("dataset-item-past-end", item(9), Refused(IndexError, "window 9", "9 windows")),
    _l("dataset-item-float", item(1.0), Refused(TypeError, "index", "integer", "1.0")),
    _l("dataset-item-negative", item(-1), Handled(equal(lambda it: int(it["timestamp"][0]), 8))),
    _l("loader-dataset-a-list", lambda tmp: Loader([1, 2, 3], RandomWindows(2)),
       Refused(TypeError, "dataset", "WindowDataset", "list")),
]
