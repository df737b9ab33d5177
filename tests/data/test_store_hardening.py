"""EpisodeStore hardening: concurrent writers, invalid index/manifest, file checks, crash recovery, verify."""

import json
import multiprocessing
import os

import numpy as np
import pytest

from mstudio.cli import main
from mstudio.data import EpisodeStore

SIZE = (2, 3)


def tiny(n=3, value=0):
    """An episode of ``n`` frames whose frames all hold ``value`` (so whose data is recognisably its own)."""
    return {
        "frames": np.full((n, *SIZE, 3), value, dtype=np.uint8),
        "buttons": np.full(n, value, dtype=np.int16),
        "camera": np.full(n, value % 121, dtype=np.uint8),
        "env_buttons": np.full(n, value, dtype=np.uint32),
        "env_camera": np.full((n, 2), value, dtype=np.float32),
        "flags": np.zeros(n, dtype=np.uint8),
    }


def _writer(root, worker, count, barrier):
    store = EpisodeStore.open(root)  # both open before either appends: each holds a stale index
    barrier.wait()
    for i in range(count):
        value = worker * count + i
        store.append(f"w{worker}-{i}", tiny(1 + value % 4, value), {"value": value})


def test_concurrent_writers_keep_every_episode(tmp_path):
    root = tmp_path / "s"
    EpisodeStore.create(root, SIZE)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(str(root), w, 20, barrier)) for w in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    assert [proc.exitcode for proc in procs] == [0, 0]
    store = EpisodeStore.open(root)
    assert sorted(store.episode_ids) == sorted(f"w{w}-{i}" for w in range(2) for i in range(20))
    for episode_id in store.episode_ids:
        value = store.info(episode_id)["value"]
        data = store.read(episode_id)
        assert store.length(episode_id) == 1 + value % 4
        assert (data["frames"] == value).all() and (data["buttons"] == value).all()
    assert store.verify() == []


def test_a_store_opened_earlier_does_not_overwrite_newer_entries(tmp_path):
    first = EpisodeStore.create(tmp_path / "s", SIZE)
    second = EpisodeStore.open(tmp_path / "s")
    first.append("a", tiny(2, 1))
    second.append("b", tiny(3, 2))
    again = EpisodeStore.open(tmp_path / "s")
    assert again.episode_ids == ["a", "b"]
    assert (again.read("a")["frames"] == 1).all() and (again.read("b")["frames"] == 2).all()
    with pytest.raises(ValueError, match="'a' is already in the store"):
        second.append("a", tiny())


@pytest.mark.parametrize("name", ["index.json", "manifest.json"])
def test_invalid_json_names_the_file(tmp_path, name):
    EpisodeStore.create(tmp_path / "s", SIZE)
    (tmp_path / "s" / name).write_text('{"a": ')
    with pytest.raises(ValueError, match=rf"{name} is not valid JSON: Expecting value at line 1"):
        EpisodeStore.open(tmp_path / "s")
    (tmp_path / "s" / name).write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=rf"{name} is not valid JSON: expected UTF-8"):
        EpisodeStore.open(tmp_path / "s")


def _with_entry(tmp_path, **changes):
    store = EpisodeStore.create(tmp_path / "s", SIZE)
    store.append("a", tiny())
    store.append("b", tiny())
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    index["b"].update(changes)
    (tmp_path / "s" / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("changes, match", [
    ({"dir": "../../etc"}, r"episode 'b' field 'dir' must be a plain directory name inside episodes/.*found '../../etc'"),
    ({"dir": "/tmp/x"}, r"field 'dir' must be a plain directory name.*found '/tmp/x'"),
    ({"dir": "1/../0"}, r"field 'dir' must be a plain directory name.*found '1/../0'"),
    ({"dir": ".."}, r"field 'dir'.*found '..'"),
    ({"dir": 1}, r"field 'dir'.*found 1"),
    ({"dir": "0"}, r"episode 'b' field 'dir' must name a directory of its own; found '0'.*episode 'a'"),
    ({"length": 0}, r"episode 'b' field 'length' must be a positive int; found 0"),
    ({"length": "5"}, r"field 'length' must be a positive int; found '5'"),
    ({"length": True}, r"field 'length' must be a positive int; found True"),
    ({"info": None}, r"field 'info' must be a JSON object; found None"),
])
def test_invalid_index_entries_are_refused_on_open(tmp_path, changes, match):
    _with_entry(tmp_path, **changes)
    with pytest.raises(ValueError, match=match):
        EpisodeStore.open(tmp_path / "s")


def test_reads_check_files_against_the_index(tmp_path):
    store = EpisodeStore.create(tmp_path / "s", SIZE)
    store.append("a", tiny(3))
    store.append("b", tiny(3))
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    index["a"]["length"] = 5  # claims more frames than the files hold
    (tmp_path / "s" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"episodes/0/frames.npy: episode 'a': expected uint8 \(5, 2, 3, 3\) for "
                                         r"the 5 frames index.json lists; found uint8 \(3, 2, 3, 3\)"):
        EpisodeStore.open(tmp_path / "s").read("a", 0, 2)
    np.save(tmp_path / "s" / "episodes" / "1" / "camera.npy", np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match=r"camera.npy: episode 'b': expected uint8 \(3,\) .*; found int64 \(3,\)"):
        EpisodeStore.open(tmp_path / "s").read("b")


def test_a_garbage_npy_names_the_file_and_never_unpickles(tmp_path):
    store = EpisodeStore.create(tmp_path / "s", SIZE)
    store.append("a", tiny())
    (tmp_path / "s" / "episodes" / "0" / "flags.npy").write_bytes(b"garbage, not an array")
    with pytest.raises(ValueError, match=r"episodes/0/flags.npy: episode 'a': not a .npy file") as caught:
        EpisodeStore.open(tmp_path / "s").read("a")
    assert "pickled" not in str(caught.value)
    path = tmp_path / "s" / "episodes" / "0" / "buttons.npy"
    path.write_bytes(path.read_bytes()[:20])  # magic intact, header cut
    with pytest.raises(ValueError, match=r"episodes/0/buttons.npy: episode 'a': a damaged .npy file"):
        EpisodeStore.open(tmp_path / "s").read("a")


def test_create_resumes_after_a_kill_before_the_manifest(tmp_path, monkeypatch):
    import mstudio.data.store as store_module

    real = store_module._write_json

    def killed(path, value):
        if path.name == "manifest.json":
            raise KeyboardInterrupt("killed before manifest.json")
        real(path, value)

    monkeypatch.setattr(store_module, "_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        EpisodeStore.create(tmp_path / "s", SIZE)
    monkeypatch.setattr(store_module, "_write_json", real)
    (tmp_path / "s" / ".manifest.json.tmp").write_text("{")  # as if killed mid-write
    store = EpisodeStore.create(tmp_path / "s", SIZE)
    store.append("a", tiny())
    assert EpisodeStore.open(tmp_path / "s").episode_ids == ["a"]


@pytest.mark.parametrize("make, named", [
    (lambda root: (root / "notes.txt").write_text("x"), "notes.txt"),
    (lambda root: (root / "episodes" / "0").mkdir(), "episodes/"),
    (lambda root: (root / "index.json").write_text('{"a": {}}'), "index.json"),
    (lambda root: (root / "manifest.json").write_text("{}"), "already one"),
])
def test_create_still_refuses_anything_else(tmp_path, make, named):
    root = tmp_path / "s"
    (root / "episodes").mkdir(parents=True)
    (root / "index.json").write_text("{}")
    make(root)
    with pytest.raises(FileExistsError, match=named):
        EpisodeStore.create(root, SIZE)


def test_create_refuses_a_foreign_directory_without_leaving_a_lock(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "data.bin").write_bytes(b"x")
    with pytest.raises(FileExistsError, match=r"not empty; expected .*found data.bin"):
        EpisodeStore.create(tmp_path / "s", SIZE)
    assert sorted(os.listdir(tmp_path / "s")) == ["data.bin"]


def _crashed_store(tmp_path):
    store = EpisodeStore.create(tmp_path / "s", SIZE)
    store.append("a", tiny(3, 1))
    store.append("b", tiny(3, 2))
    episodes = tmp_path / "s" / "episodes"
    (episodes / ".2.tmp").mkdir()
    (episodes / ".2.tmp" / "frames.npy").write_bytes(b"half")
    (episodes / "7").mkdir()
    (tmp_path / "s" / ".index.json.tmp").write_text("{")
    return store


def test_verify_reports_and_repairs_leftovers_but_never_indexed_data(tmp_path):
    store = _crashed_store(tmp_path)
    (tmp_path / "s" / "episodes" / "1" / "camera.npy").unlink()
    problems = store.verify()
    assert len(problems) == 4
    assert any(p.startswith("episodes/1/camera.npy: episode 'b': missing") for p in problems)
    assert any(p.startswith("episodes/.2.tmp: temporary directory") for p in problems)
    assert any(p.startswith("episodes/7: episode directory that index.json does not name") for p in problems)
    assert any(p.startswith(".index.json.tmp: temporary file") for p in problems)
    assert store.verify() == problems  # reporting changes nothing
    repaired = store.verify(repair=True)
    assert sum(p.endswith("(removed)") for p in repaired) == 3
    assert store.verify() == [problems[0]]  # the damaged entry is reported, not dropped
    assert sorted(os.listdir(tmp_path / "s" / "episodes")) == ["0", "1"]
    assert store.episode_ids == ["a", "b"] and (store.read("a")["frames"] == 1).all()


def test_verify_reports_wrong_lengths_and_a_missing_episode_dir(tmp_path):
    store = EpisodeStore.create(tmp_path / "s", SIZE)
    store.append("a", tiny(3))
    store.append("b", tiny(3))
    np.save(tmp_path / "s" / "episodes" / "0" / "flags.npy", np.zeros(2, dtype=np.uint8))
    os.rename(tmp_path / "s" / "episodes" / "1", tmp_path / "s" / "elsewhere")
    assert store.verify(repair=True) == [
        "episodes/0/flags.npy: episode 'a': expected uint8 (3,) for the 3 frames index.json lists; found uint8 (2,)",
        "episodes/1: missing; index.json lists episode 'b' (3 frames) there",
    ]
    assert (tmp_path / "s" / "elsewhere").is_dir()


def test_cli_store_verify(tmp_path, capsys):
    store = EpisodeStore.create(tmp_path / "s", SIZE)
    store.append("a", tiny())
    assert main(["store", "verify", str(tmp_path / "s")]) == 0
    assert capsys.readouterr().out == "ok\n"
    _crashed_store(tmp_path / "t")
    assert main(["store", "verify", str(tmp_path / "t" / "s")]) == 1
    assert "episodes/7: episode directory" in capsys.readouterr().out
    assert main(["store", "verify", str(tmp_path / "t" / "s"), "--repair"]) == 0
    out = capsys.readouterr().out
    assert out.count("(removed)") == 3 and out.endswith("ok\n")
    (tmp_path / "t" / "s" / "episodes" / "1" / "frames.npy").unlink()
    assert main(["store", "verify", str(tmp_path / "t" / "s"), "--repair"]) == 1
    assert "episodes/1/frames.npy: episode 'b': missing" in capsys.readouterr().out
    (tmp_path / "s" / "index.json").write_text("[")
    assert main(["store", "verify", str(tmp_path / "s")]) == 2
    assert "index.json is not valid JSON" in capsys.readouterr().err


def test_checksums_are_recorded_and_checked_on_first_read(tmp_path):
    store = EpisodeStore.create(tmp_path / "s", SIZE)
    store.append("a", tiny(3, 7))
    entry = json.loads((tmp_path / "s" / "index.json").read_text())["a"]
    record = json.loads((tmp_path / "s" / "episodes" / "0" / "episode.json").read_text())
    assert sorted(entry["crc32"]) == sorted(tiny())
    assert record == {"id": "a", "length": 3, "info": {}, "crc32": entry["crc32"]}
    path = tmp_path / "s" / "episodes" / "0" / "frames.npy"
    data = path.read_bytes()
    path.write_bytes(data[:-8] + bytes(8))  # damage after the write: the header and shape still look right
    with pytest.raises(ValueError, match=r"episodes/0/frames.npy: episode 'a': checksum mismatch: index.json "
                                         r"records crc32 [0-9a-f]{8}, the file's is [0-9a-f]{8}"):
        EpisodeStore.open(tmp_path / "s").read("a", 0, 1)
    unchecked = EpisodeStore.open(tmp_path / "s", checksums=False)  # the opt-out reads what is there
    assert unchecked.read("a")["frames"][-1].ravel()[-8:].tolist() == [0] * 8
    assert [p.split(": ")[0] for p in unchecked.verify()] == ["episodes/0/frames.npy"]  # verify always checks


def test_a_store_written_before_checksums_still_opens_and_verifies(tmp_path, capsys):
    store = EpisodeStore.create(tmp_path / "s", SIZE)
    store.append("a", tiny(3, 1))
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    (tmp_path / "s" / "index.json").write_text(json.dumps({k: {f: e[f] for f in ("dir", "length", "info")}
                                                           for k, e in index.items()}))
    (tmp_path / "s" / "episodes" / "0" / "episode.json").unlink()
    old = EpisodeStore.open(tmp_path / "s")
    assert (old.read("a")["frames"] == 1).all() and old.verify() == [] and old.episodes_without_checksums() == ["a"]
    old.append("b", tiny(2, 2))  # new episodes get checksums
    assert EpisodeStore.open(tmp_path / "s").episodes_without_checksums() == ["a"]
    assert main(["store", "verify", str(tmp_path / "s")]) == 0
    assert "info: no checksum recorded for 1 of 2 episodes" in capsys.readouterr().out


def test_verify_repair_puts_back_an_episode_the_index_lost(tmp_path):
    store = EpisodeStore.create(tmp_path / "s", SIZE)
    store.append("a", tiny(3, 1))
    store.append("b", tiny(2, 2))
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    (tmp_path / "s" / "index.json").write_text(json.dumps({"a": index["a"]}))  # e.g. restored from an old copy
    store = EpisodeStore.open(tmp_path / "s")
    store.append("c", tiny(1, 3))  # never reuses b's directory
    assert store.verify() == ["episodes/1: complete episode 'b' that index.json does not name (an append "
                              "interrupted before its index update, or an index.json restored from an older copy)"]
    assert store.verify(repair=True)[0].endswith("(added to index.json)")
    again = EpisodeStore.open(tmp_path / "s")
    assert again.episode_ids == ["a", "c", "b"] and (again.read("b")["frames"] == 2).all() and again.verify() == []
