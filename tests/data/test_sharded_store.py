"""ShardedStore: round trips (raw and H.264 frames), the same batches as an EpisodeStore, 100k episodes within the
map limit, concurrent appenders, killed appends, and verify/repair finding what damage and crashes leave."""

from __future__ import annotations

import json
import multiprocessing
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from mstudio.cli import main
from mstudio.data import (EpisodeContinuous, EpisodeStore, RandomWindows, ShardedStore, WindowDataset, create_store,
                          make_loader, open_store)
from mstudio.data.contractor_synth import read_barcode
from mstudio.data.minestudio_synth import barcode_frames
from mstudio.data.video_codec import VideoCodec
from tests.adversarial.kill import kill_points, run_killed
from tests.support.episodes import random_episode

SIZE = (8, 8)
MIN_PSNR = 35.0  # dB: the default codec keeps ~40 dB on barcode frames at 128x128 (tests/data/test_video_codec.py)
KEYS = ("frames", "buttons", "camera", "env_buttons", "env_camera", "flags")


def episode(n: int, seed: int, size: tuple[int, int] = SIZE) -> dict[str, np.ndarray]:
    """Random arrays of ``n`` frames at this module's frame size."""
    return random_episode(n, size, seed)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def equal(got: dict, want: dict, start: int = 0, stop: int | None = None) -> bool:
    return all(got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k][start:stop]) for k in KEYS)


# --- round trips -----------------------------------------------------------------------------------------------

def test_raw_round_trip_across_shards_and_reopen(tmp_path):
    store = ShardedStore.create(tmp_path / "s", SIZE, meta={"source": "test"}, shard_bytes=4096)
    episodes = {f"e{i}": episode(3 + 4 * i, i) for i in range(8)}
    for i, (episode_id, arrays) in enumerate(episodes.items()):
        store.append(episode_id, arrays, {"i": i})
    again = open_store(tmp_path / "s")
    assert isinstance(again, ShardedStore) and again.episode_ids == list(episodes) and len(again) == 8
    assert "e3" in again and "x" not in again and again.info("e5") == {"i": 5} and again.length("e7") == 31
    assert again.manifest["meta"] == {"source": "test"} and again.image_size == SIZE
    shards = sorted(p.name for p in (tmp_path / "s" / "shards").iterdir())
    assert len(shards) >= 4 and len({again.shard_of(e) for e in episodes}) == len(shards)
    per_shard = [[e for e in episodes if again.shard_of(e) == k] for k in range(len(shards))]
    sizes = [(tmp_path / "s" / "shards" / name).stat().st_size for name in shards]
    assert all(size <= 4096 or len(held) == 1 for size, held in zip(sizes, per_shard)), (sizes, per_shard)
    for episode_id, arrays in episodes.items():
        n = len(arrays["frames"])
        assert equal(again.read(episode_id), arrays)
        assert equal(again.read(episode_id, 1, n - 1), arrays, 1, n - 1)
        assert equal(again.read(episode_id, n, n), arrays, n, n)  # empty range: right dtypes and shapes
    assert again.verify() == [] and store.verify() == []


def test_shards_roll_over_at_the_target_and_a_big_episode_gets_its_own(tmp_path):
    store = ShardedStore.create(tmp_path / "s", SIZE, shard_bytes=1000)
    store.append("small0", episode(2, 0))  # 704 bytes with alignment
    store.append("small1", episode(2, 1))  # does not fit after small0 in 1000 bytes: a new shard
    store.append("big", episode(40, 2))  # ~9 KB: more than a shard, alone in one
    store.append("small2", episode(1, 3))
    assert [store.shard_of(e) for e in store.episode_ids] == [0, 1, 2, 3]
    sizes = [p.stat().st_size for p in sorted((tmp_path / "s" / "shards").iterdir())]
    assert sizes[2] > 1000 and all(size <= 1000 for i, size in enumerate(sizes) if i != 2)


def test_video_round_trip_within_psnr_and_barcodes(tmp_path, monkeypatch):
    codec = VideoCodec(chunk_frames=8, gop=8)
    store = ShardedStore.create(tmp_path / "v", (128, 128), codec=codec, shard_bytes=1 << 16)
    arrays = {**episode(21, 0, (128, 128)), "frames": barcode_frames(range(100, 121), 128, 128)}
    store.append("a", arrays)
    store.append("b", {**episode(5, 1, (128, 128)), "frames": barcode_frames(range(7, 12), 128, 128)})
    again = open_store(tmp_path / "v")
    assert again.codec == codec and again.manifest["frames"] == {"encoding": "video", "codec": codec.to_json()}
    whole = again.read("a")
    assert all(np.array_equal(whole[k], arrays[k]) for k in KEYS if k != "frames")  # the rest stays raw, exact
    assert whole["frames"].shape == (21, 128, 128, 3) and whole["frames"].dtype == np.uint8
    assert psnr(whole["frames"], arrays["frames"]) > MIN_PSNR
    assert [read_barcode(f) for f in whole["frames"]] == list(range(100, 121))
    assert [read_barcode(f) for f in again.read("b")["frames"]] == list(range(7, 12))
    # a read across a chunk boundary decodes only the chunks it overlaps, and gives the same pixels
    decoded = []
    import mstudio.data.sharded as sharded
    real = sharded.decode_chunk
    monkeypatch.setattr(sharded, "decode_chunk", lambda data, n, size, **kw: decoded.append(n) or real(data, n, size, **kw))
    part = again.read("a", 6, 10)
    assert decoded == [8, 8] and np.array_equal(part["frames"], whole["frames"][6:10])
    decoded.clear()
    assert np.array_equal(again.read("a", 16, 21)["frames"], whole["frames"][16:21]) and decoded == [5]
    decoded.clear()
    assert again.read("a", 8, 8)["frames"].shape == (0, 128, 128, 3) and decoded == []
    flags = again.read("a", 2, 20, keys=("flags",))  # what drop_null reads: no frame is decoded
    assert list(flags) == ["flags"] and np.array_equal(flags["flags"], arrays["flags"][2:20]) and decoded == []
    with pytest.raises(KeyError, match=r"\['image'\] are not arrays of an episode"):
        again.read("a", keys=("image",))
    assert again.verify() == []
    info = json.loads((tmp_path / "v" / "index.jsonl").read_text().splitlines()[0].split(" ", 1)[1])
    assert [c[3] for c in info["chunks"]] == [8, 8, 5] and "frames" not in info["arrays"]


# --- the same batches as an EpisodeStore ------------------------------------------------------------------------

def _both(tmp_path: Path) -> tuple[EpisodeStore, ShardedStore]:
    plain = EpisodeStore.create(tmp_path / "plain", SIZE)
    packed = ShardedStore.create(tmp_path / "packed", SIZE, shard_bytes=8192)
    for i in range(9):
        arrays = episode(5 + 3 * i, i)
        plain.append(f"e{i}", arrays, {"i": i})
        packed.append(f"e{i}", arrays, {"i": i})
    return EpisodeStore.open(tmp_path / "plain"), ShardedStore.open(tmp_path / "packed")


def _batches(loader, epochs: int = 2) -> list:
    out = []
    for _ in range(epochs):
        out += [batch for batch in loader]
    return out


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return torch.equal(a, b)


def test_windows_and_loaders_give_identical_batches(tmp_path):
    plain, packed = _both(tmp_path)
    assert len(set(p.name for p in (tmp_path / "packed" / "shards").iterdir())) > 1
    for window, skip in ((4, 1), (3, 2)):
        a, b = WindowDataset(plain, window, skip_frame=skip), WindowDataset(packed, window, skip_frame=skip)
        assert len(a) == len(b) > 0 and all(_same(a[i], b[i]) for i in range(len(a)))
    for sampler in (lambda: RandomWindows(3, seed=1), lambda: EpisodeContinuous(3, seed=2)):
        batches_a = _batches(make_loader(plain, 4, sampler()))
        batches_b = _batches(make_loader(packed, 4, sampler()))
        assert len(batches_a) == len(batches_b) > 0 and all(map(_same, batches_a, batches_b))
    # a forked worker maps the shards again
    workers = _batches(make_loader(packed, 4, RandomWindows(3, seed=1), num_workers=1), epochs=1)
    assert all(map(_same, workers, _batches(make_loader(plain, 4, RandomWindows(3, seed=1)), epochs=1)))


# --- scale: 100k episodes within vm.max_map_count ----------------------------------------------------------------

def _maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def _open_shard_files(root: Path) -> int:
    shards = str((root / "shards").resolve())
    return sum(1 for fd in os.listdir("/proc/self/fd")
               if os.path.realpath(f"/proc/self/fd/{fd}").startswith(shards))


@pytest.mark.parametrize("n", [10_000, pytest.param(100_000, marks=pytest.mark.slow)])
def test_many_tiny_episodes_open_and_sample_within_the_map_limit(tmp_path, n):
    store = ShardedStore.create(tmp_path / "s", SIZE, shard_bytes=n * 700 // 12)  # ~700 bytes an episode
    template = episode(2, 0)
    assert store.append_many(((f"e{i}", template, {}) for i in range(n)), commit_every=n // 3) == n
    shards = len(list((tmp_path / "s" / "shards").iterdir()))
    assert 10 <= shards <= 16

    before = _maps()
    again = ShardedStore.open(tmp_path / "s")
    assert len(again) == n and again.episode_ids[-1] == f"e{n - 1}"
    rng = np.random.default_rng(0)
    for i in rng.integers(0, n, 5_000):  # random reads over every shard
        assert equal(again.read(f"e{i}", 1, 2), template, 1, 2)
    loader = make_loader(again, 2, RandomWindows(256, seed=0))
    for k, batch in enumerate(loader):  # sample part of an epoch
        assert batch["image"].shape == (256, 2, *SIZE, 3)
        if k == 40:
            break
    maps = _maps()
    # one map per shard, not per episode: an EpisodeStore would have mapped 6 files per episode read
    assert maps - before <= shards + 30 and maps < 65530 // 20, (before, maps, shards)
    assert 0 < _open_shard_files(tmp_path / "s") <= shards
    if n == 100_000:
        assert again.verify() == []


# --- concurrent appenders ----------------------------------------------------------------------------------------

def _appender(path: str, worker: int, count: int) -> None:
    store = ShardedStore.open(path)  # opened before the other appends: the lock makes it re-read the index
    for i in range(count):
        store.append(f"w{worker}-{i}", episode(2 + i % 3, 100 * worker + i), {"worker": worker})
    store.append_many((f"w{worker}-bulk{i}", episode(2, 1000 * worker + i), {}) for i in range(count))


def test_two_concurrent_appenders_both_succeed(tmp_path):
    ShardedStore.create(tmp_path / "s", SIZE, shard_bytes=4096)
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_appender, args=(str(tmp_path / "s"), w, 30)) for w in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    store = ShardedStore.open(tmp_path / "s")
    expected = {f"w{w}-{i}" for w in range(2) for i in range(30)} | {f"w{w}-bulk{i}" for w in range(2) for i in range(30)}
    assert set(store.episode_ids) == expected and len(store) == len(expected)
    for w in range(2):
        for i in range(30):
            assert equal(store.read(f"w{w}-{i}"), episode(2 + i % 3, 100 * w + i))
            assert equal(store.read(f"w{w}-bulk{i}"), episode(2, 1000 * w + i))
    lines = (tmp_path / "s" / "index.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == len(expected) + 1
    assert all(int(line[:8], 16) == zlib.crc32(line[9:]) for line in lines[:-1])
    assert store.verify() == []


# --- a killed append ---------------------------------------------------------------------------------------------

KILL_IDS = ("k0", "k1", "k2")


def write_killable(root: str) -> None:
    """The writer the kill test runs (and reruns to resume): episodes ``KILL_IDS``, then two in bulk."""
    store = ShardedStore.open(root)
    for i, episode_id in enumerate(KILL_IDS):
        if episode_id not in store:
            store.append(episode_id, episode(2 + i, i), {"i": i})
    if "b0" not in store:
        store.append_many([("b0", episode(3, 10), {}), ("b1", episode(2, 11), {})])


def _content(root: Path) -> list:
    store = ShardedStore.open(root)
    return [(e, store.info(e), {k: v.tobytes() for k, v in store.read(e).items()}) for e in store.episode_ids]


@pytest.mark.slow
def test_a_killed_append_leaves_a_verifiable_store(tmp_path):
    def prepare(directory: Path) -> None:
        directory.mkdir()
        store = ShardedStore.create(directory / "s", SIZE, shard_bytes=2048)
        store.append("first", episode(2, 99))

    reference = tmp_path / "reference"
    prepare(reference)
    write_killable(reference / "s")
    expected = _content(reference / "s")
    snippet = "from tests.data.test_sharded_store import write_killable\nwrite_killable('s')"
    whole = tmp_path / "whole"
    prepare(whole)
    run = run_killed(snippet, whole)
    assert run.returncode == 0 and run.operations, run.stderr[-2000:]
    failed = []
    points = kill_points(run.operations, 14)
    for point in points:
        directory = tmp_path / f"kill-{point}"
        prepare(directory)
        killed = run_killed(snippet, directory, kill_at=point)
        try:
            assert killed.killed, f"not killed (exit {killed.returncode}): {killed.stderr[-500:]}"
            store = ShardedStore.open(directory / "s")
            store.verify(repair=True)
            assert store.verify() == []
            got = _content(directory / "s")
            assert got == expected[:len(got)], [e[0] for e in got]  # before the append, or with whole episodes
            write_killable(directory / "s")
            assert _content(directory / "s") == expected and ShardedStore.open(directory / "s").verify() == []
        except Exception as error:  # every point is tried; the failures are listed together
            failed.append(f"point {point}: {type(error).__name__}: {error}")
    print(f"\nkill harness: sharded append: {len(points) - len(failed)} of {len(points)} kill points recovered "
          f"({run.operations} operations)")
    assert len(points) >= 10 and not failed, "\n".join(failed)


# --- verify -------------------------------------------------------------------------------------------------------

def _small(tmp_path: Path) -> ShardedStore:
    store = ShardedStore.create(tmp_path / "s", SIZE, shard_bytes=4096)
    for i in range(6):
        store.append(f"e{i}", episode(4, i))
    return store


def test_verify_finds_a_flipped_byte_and_reads_refuse_it(tmp_path):
    store = _small(tmp_path)
    entry = store._index["e2"]
    offset = entry["arrays"]["frames"][0] + 5
    path = tmp_path / "s" / "shards" / f"{entry['shard']:06d}.bin"
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    problems = ShardedStore.open(tmp_path / "s").verify(repair=True)  # damage is reported, never "repaired"
    assert len(problems) == 1 and problems[0].startswith(f"shards/{path.name}: episode 'e2' frames at bytes [")
    assert "checksum mismatch" in problems[0] and path.read_bytes() == bytes(data)
    with pytest.raises(ValueError, match=rf"{path.name}: episode 'e2' frames .*checksum mismatch"):
        ShardedStore.open(tmp_path / "s").read("e2", 0, 1)
    unchecked = ShardedStore.open(tmp_path / "s", checksums=False)  # the opt-out reads what is there
    assert unchecked.read("e2", 0, 1)["frames"].shape == (1, *SIZE, 3) and unchecked.read("e3")
    assert len(unchecked.verify()) == 1  # verify always checks


def test_verify_finds_a_truncated_shard(tmp_path):
    store = _small(tmp_path)
    path = tmp_path / "s" / "shards" / f"{store.shard_of('e5'):06d}.bin"
    path.write_bytes(path.read_bytes()[:-10])
    problems = ShardedStore.open(tmp_path / "s").verify(repair=True)
    assert problems and all("past the end of the file" in p and "'e5'" in p for p in problems)
    with pytest.raises(ValueError, match="e5.*the shard was truncated"):
        ShardedStore.open(tmp_path / "s").read("e5")
    with pytest.raises(ValueError, match="the shard was truncated; run verify"):  # appends refuse to build on it
        ShardedStore.open(tmp_path / "s").append("new", episode(1, 1))


def test_a_torn_index_line_is_ignored_reported_and_repaired(tmp_path):
    _small(tmp_path)
    index = tmp_path / "s" / "index.jsonl"
    committed = index.read_bytes()
    index.write_bytes(committed + committed.splitlines(keepends=True)[0][:30])  # an append killed mid-line
    store = ShardedStore.open(tmp_path / "s")
    assert len(store) == 6
    assert store.verify() == ["index.jsonl: a torn last line of 30 bytes (an append killed while writing it)"]
    assert store.verify(repair=True)[0].endswith("(truncated)") and index.read_bytes() == committed
    index.write_bytes(committed + b"0000")
    store.append("e6", episode(2, 6))  # the next writer truncates the torn line before its own
    assert index.read_bytes().startswith(committed) and ShardedStore.open(tmp_path / "s").verify() == []


def test_repair_removes_only_what_a_crash_leaves(tmp_path):
    store = _small(tmp_path)
    shards = tmp_path / "s" / "shards"
    last = shards / f"{store.shard_of('e5'):06d}.bin"
    size = last.stat().st_size
    with open(last, "ab") as f:
        f.write(b"garbage of an append killed before its index line!")
    (shards / "000099.bin").write_bytes(b"a shard no line names")
    (tmp_path / "s" / ".manifest.json.tmp").write_text("{")
    problems = ShardedStore.open(tmp_path / "s").verify()
    assert [p.split(":")[0] for p in problems] == [f"shards/{last.name}", "shards/000099.bin", ".manifest.json.tmp"]
    assert "50 bytes past the committed end" in problems[0]
    fixed = ShardedStore.open(tmp_path / "s").verify(repair=True)
    assert [p.rsplit(" ", 1)[1] for p in fixed] == ["(truncated)", "(removed)", "(removed)"]
    assert last.stat().st_size == size and not (shards / "000099.bin").exists()
    again = ShardedStore.open(tmp_path / "s")
    assert again.verify() == [] and all(equal(again.read(f"e{i}"), episode(4, i)) for i in range(6))


def test_garbage_past_the_committed_end_is_overwritten_by_the_next_append(tmp_path):
    store = _small(tmp_path)
    last = tmp_path / "s" / "shards" / f"{store.shard_of('e5'):06d}.bin"
    with open(last, "ab") as f:
        f.write(b"x" * 100)
    store.append("e6", episode(1, 6))
    again = ShardedStore.open(tmp_path / "s")
    assert again.verify() == [] and equal(again.read("e6"), episode(1, 6))


# --- bad input and the kinds of store ----------------------------------------------------------------------------

def test_bad_appends_write_nothing(tmp_path):
    store = _small(tmp_path)
    index = (tmp_path / "s" / "index.jsonl").read_bytes()
    with pytest.raises(ValueError, match="episode 'e1' is already in the store"):
        store.append("e1", episode(2, 0))
    bad = {**episode(2, 0), "buttons": np.array([0, 9000], np.int16)}
    with pytest.raises(ValueError, match=r"episode 'x': arrays\['buttons'\] must lie in \[0, 8641\)"):
        store.append("x", bad)
    assert (tmp_path / "s" / "index.jsonl").read_bytes() == index
    # append_many keeps the episodes before a bad one, then names it
    with pytest.raises(ValueError, match="episode 'y1'"):
        store.append_many([("y0", episode(2, 0), {}), ("y1", bad, {}), ("y2", episode(2, 2), {})])
    assert ShardedStore.open(tmp_path / "s").episode_ids[-1] == "y0"
    with pytest.raises(ValueError, match="episode 'z' is already in the store"):
        store.append_many([("z", episode(2, 0), {}), ("z", episode(2, 0), {})])


def test_append_many_copies_buffers_the_caller_reuses(tmp_path):
    store = ShardedStore.create(tmp_path / "s", SIZE)
    buffer = episode(3, 0)

    def reused():  # one buffer, refilled for every episode (a common way to feed a bulk write)
        for i in range(5):
            for key, value in episode(3, i).items():
                buffer[key][...] = value
            yield f"e{i}", buffer, {}

    assert store.append_many(reused(), commit_every=5) == 5
    assert all(equal(store.read(f"e{i}"), episode(3, i)) for i in range(5)) and store.verify() == []


def test_create_and_open_refuse_the_wrong_thing(tmp_path):
    EpisodeStore.create(tmp_path / "plain", SIZE)
    with pytest.raises(FileExistsError, match="already a store"):
        ShardedStore.create(tmp_path / "plain", SIZE)
    with pytest.raises(ValueError, match="ShardedStore reads 'mstudio-sharded-store'"):
        ShardedStore.open(tmp_path / "plain")
    assert isinstance(open_store(tmp_path / "plain"), EpisodeStore)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        create_store(tmp_path / "other", SIZE, backend="sharded")
    with pytest.raises(ValueError, match="backend must be one of"):
        create_store(tmp_path / "x", SIZE, backend="lmdb")
    with pytest.raises(ValueError, match="apply to backend='sharded' only"):
        create_store(tmp_path / "x", SIZE, codec=VideoCodec())
    assert isinstance(create_store(tmp_path / "x", SIZE, backend="sharded", shard_bytes=1024), ShardedStore)
    with pytest.raises(TypeError, match="must be an EpisodeStore or a ShardedStore"):
        WindowDataset(object(), 2)


# --- the CLI ------------------------------------------------------------------------------------------------------

def test_store_info_and_verify_commands(tmp_path, capsys):
    _small(tmp_path)
    assert main(["store", "info", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    facts = dict(line.split(": ", 1) for line in out.splitlines())
    assert facts["backend"] == "sharded" and facts["episodes"] == "6" and facts["frames"] == "24"
    assert facts["frames_encoding"] == "raw" and facts["image_size"] == "8x8" and facts["shards"] == "2"
    disk = sum(p.stat().st_size for p in (tmp_path / "s").rglob("*") if p.is_file())
    assert facts["bytes_on_disk"].startswith(f"{disk} (")
    plain = EpisodeStore.create(tmp_path / "plain", SIZE)
    plain.append("a", episode(3, 0))
    assert main(["store", "info", str(tmp_path / "plain")]) == 0
    facts = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert facts["backend"] == "episodes" and facts["frames"] == "3" and "shards" not in facts
    assert main(["store", "verify", str(tmp_path / "s")]) == 0 and capsys.readouterr().out == "ok\n"
    with open(tmp_path / "s" / "index.jsonl", "ab") as f:
        f.write(b"torn")
    assert main(["store", "verify", str(tmp_path / "s")]) == 1
    assert "index.jsonl: a torn last line of 4 bytes" in capsys.readouterr().out
    assert main(["store", "verify", str(tmp_path / "s"), "--repair"]) == 0
    assert capsys.readouterr().out.endswith("(truncated)\nok\n")
    (tmp_path / "s" / "index.jsonl").write_bytes(b"00000000 {}\n")
    assert main(["store", "verify", str(tmp_path / "s")]) == 2
    assert "index.jsonl line 1: checksum mismatch" in capsys.readouterr().err


def test_import_vpt_into_a_sharded_store_matches_an_episode_store(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "raw"), "--episodes", "1", "--frames", "40"]) == 0
    assert main(["import-vpt", str(tmp_path / "raw"), str(tmp_path / "plain"), "--resolution", "32"]) == 0
    assert main(["import-vpt", str(tmp_path / "raw"), str(tmp_path / "packed"), "--resolution", "32",
                 "--backend", "sharded"]) == 0
    assert main(["import-vpt", str(tmp_path / "raw"), str(tmp_path / "video"), "--resolution", "32",
                 "--codec", "h264"]) == 0
    plain, packed, video = (open_store(tmp_path / name) for name in ("plain", "packed", "video"))
    assert isinstance(packed, ShardedStore) and packed.codec is None and video.codec == VideoCodec()
    assert plain.episode_ids == packed.episode_ids == video.episode_ids and len(plain) >= 2
    for episode_id in plain.episode_ids:
        a, b, c = plain.read(episode_id), packed.read(episode_id), video.read(episode_id)
        assert equal(b, a) and plain.info(episode_id) == packed.info(episode_id)
        assert all(np.array_equal(c[k], a[k]) for k in KEYS if k != "frames") and psnr(c["frames"], a["frames"]) > MIN_PSNR
    capsys.readouterr()
    assert main(["import-vpt", str(tmp_path / "raw"), str(tmp_path / "plain"), "--resolution", "32",
                 "--backend", "sharded"]) == 2
    assert "already a 'episodes' store" in capsys.readouterr().err


def test_the_trainer_opens_and_loads_a_sharded_store(tmp_path):
    from mstudio.trainer import build
    from mstudio.trainer.config import DataConfig

    _, packed = _both(tmp_path)
    config = DataConfig(store=str(tmp_path / "packed"), window=4, batch_size=2, val_episodes=2)
    store = build.open_store(config, (*SIZE, 3), str(tmp_path / "runs"))
    assert isinstance(store, ShardedStore) and store.episode_ids == packed.episode_ids
    train, val = build.build_loaders(config, store, seed=0)
    assert next(iter(train))["image"].shape == (2, 4, *SIZE, 3) and val is not None
