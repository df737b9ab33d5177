"""Adversarial cases for :class:`~mstudio.data.EpisodeStore`: damaged index, manifest and array files, hostile
paths, bad appends, creates over the wrong thing, out-of-range reads, concurrent writers and verify/repair.

Every store here is tiny (8x8 frames, a few frames per episode); ``tmp / "s"`` is the store of a case.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mstudio.cli import main
from mstudio.data import EpisodeStore
from mstudio.data.store import array_spec
from tests.adversarial.harness import Case, DataLost, Handled, Refused

SIZE = (8, 8)
KEYS = tuple(array_spec(SIZE))


def episode(n: int = 3, value: int = 1, size: tuple[int, int] = SIZE) -> dict[str, np.ndarray]:
    """An episode of ``n`` frames whose every array is non-zero and recognisably ``value``'s (1-100)."""
    step = np.arange(n)
    return {
        "frames": ((value + step[:, None, None, None] + np.zeros((n, *size, 3), int)) % 250 + 1).astype(np.uint8),
        "buttons": np.full(n, value, dtype=np.int16),
        "camera": np.full(n, value % 120 + 1, dtype=np.uint8),
        "env_buttons": np.full(n, value, dtype=np.uint32),
        "env_camera": np.full((n, 2), value, dtype=np.float32),
        "flags": np.full(n, value % 250 + 1, dtype=np.uint8),
    }


def root(tmp: Path) -> Path:
    return tmp / "s"


def make(tmp: Path, ids: tuple[str, ...] = ("a", "b"), n: int = 3) -> EpisodeStore:
    """A store at ``tmp / "s"`` holding ``ids`` (episode ``i`` of ``n`` frames with value ``i + 1``)."""
    store = EpisodeStore.create(root(tmp), SIZE)
    for value, episode_id in enumerate(ids, start=1):
        store.append(episode_id, episode(n, value), {"value": value})
    return store


def edit_json(path: Path, edit: Callable[[Any], Any]) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def edit_entry(tmp: Path, episode_id: str, **fields: Any) -> None:
    """Set (or with ``...`` as value, delete) fields of one index entry."""
    def edit(index):
        for key, value in fields.items():
            if value is ...:
                index[episode_id].pop(key, None)
            else:
                index[episode_id][key] = value
        return index
    edit_json(root(tmp) / "index.json", edit)


def legacy(tmp: Path) -> None:
    """Make the store at ``tmp / "s"`` look written before checksums: no checksums, no per-episode record."""
    edit_json(root(tmp) / "index.json", lambda index: {
        k: {f: v for f, v in e.items() if f in ("dir", "length", "info")} for k, e in index.items()})
    for record in (root(tmp) / "episodes").glob("*/episode.json"):
        record.unlink()


def read_all(tmp: Path) -> EpisodeStore:
    """Open the store and read every episode whole (mapping every file)."""
    store = EpisodeStore.open(root(tmp))
    for episode_id in store.episode_ids:
        store.read(episode_id)
    return store


def holds(*ids: str, n: int = 3) -> Callable[[Any, Path], None]:
    """A check: the store at ``tmp / "s"`` holds exactly ``ids``, in order, each with its own data; DataLost if
    one that was appended is gone."""
    def check(_, tmp):
        store = EpisodeStore.open(root(tmp))
        missing = [e for e in ids if e not in store]
        if missing:
            raise DataLost(f"episodes {missing} are gone from the store")
        assert store.episode_ids == list(ids), store.episode_ids
        for episode_id in ids:
            value = store.info(episode_id).get("value", ids.index(episode_id) + 1)
            got, want = store.read(episode_id), episode(store.length(episode_id), value)
            assert all(np.array_equal(got[k], want[k]) for k in KEYS), f"episode {episode_id!r} holds other data"
        assert store.verify() == [], store.verify()
    return check


def untouched(run: Callable[[Path], Any], *ids: str) -> Callable[[Path], Any]:
    """``run`` (a refused write) on a store of ``ids``; re-raises its error only if the store is unchanged
    (nothing written before the refusal), else fails with what changed."""
    def attack(tmp):
        make(tmp, ids)
        before = sorted(p.relative_to(root(tmp)).as_posix() for p in root(tmp).rglob("*"))
        index = (root(tmp) / "index.json").read_bytes()
        try:
            run(tmp)
        except Exception:
            after = sorted(p.relative_to(root(tmp)).as_posix() for p in root(tmp).rglob("*"))
            if after != before or (root(tmp) / "index.json").read_bytes() != index:
                raise AssertionError(f"a refused write changed the store: {sorted(set(after) ^ set(before))}")
            raise
        return None
    return attack


def nothing_created(run: Callable[[Path], Any]) -> Callable[[Path], Any]:
    """``run`` (a refused create); re-raises its error only if ``tmp / "s"`` was not made."""
    def attack(tmp):
        try:
            run(tmp)
        except Exception:
            if root(tmp).exists():
                raise AssertionError(f"a refused create left {sorted(os.listdir(root(tmp)))}")
            raise
        return None
    return attack


def npy(tmp: Path, key: str, directory: str = "0") -> Path:
    return root(tmp) / "episodes" / directory / f"{key}.npy"


def damage(key: str, edit: Callable[[bytes], bytes], *, old: bool = False, n: int = 3) -> Callable[[Path], Any]:
    """Rewrite ``episodes/0/<key>.npy`` (episode 'a') with ``edit(bytes)``, then read every episode."""
    def attack(tmp):
        make(tmp, n=n)
        if old:
            legacy(tmp)
        path = npy(tmp, key)
        path.write_bytes(edit(path.read_bytes()))
        return read_all(tmp)
    return attack


def zero_run(data: bytes) -> bytes:
    """``data`` with 64 bytes zeroed, ending 8 bytes before the end (inside the array's data)."""
    end = len(data) - 8
    return data[:end - 64] + bytes(64) + data[end:]


def flip_byte(data: bytes) -> bytes:
    return data[:-5] + bytes([data[-5] ^ 0x10]) + data[-4:]


def replace_array(key: str, value: np.ndarray, *, old: bool = False) -> Callable[[Path], Any]:
    def attack(tmp):
        make(tmp)
        if old:
            legacy(tmp)
        np.save(npy(tmp, key), value)
        return read_all(tmp)
    return attack


def bad_entry(episode_id: str = "b", **fields: Any) -> Callable[[Path], Any]:
    def attack(tmp):
        make(tmp)
        edit_entry(tmp, episode_id, **fields)
        return read_all(tmp)
    return attack


def bad_file(name: str, content: bytes) -> Callable[[Path], Any]:
    def attack(tmp):
        make(tmp)
        (root(tmp) / name).write_bytes(content)
        return read_all(tmp)
    return attack


def bad_manifest(**fields: Any) -> Callable[[Path], Any]:
    def attack(tmp):
        make(tmp)
        edit_json(root(tmp) / "manifest.json", lambda m: {**m, **fields})
        return read_all(tmp)
    return attack


def appending(arrays: Callable[[], Any], info: Any = None, episode_id: Any = "c") -> Callable[[Path], Any]:
    return untouched(lambda tmp: EpisodeStore.open(root(tmp)).append(episode_id, arrays(), info), "a", "b")


def with_array(key: str, value: Callable[[np.ndarray], Any]) -> Callable[[], dict]:
    def arrays():
        data = episode(3, 9)
        data[key] = value(data[key])
        return data
    return arrays


def creating(image_size: Any, meta: Any = None) -> Callable[[Path], Any]:
    return nothing_created(lambda tmp: EpisodeStore.create(root(tmp), image_size, meta))


def reading(start: Any = 0, stop: Any = None, episode_id: Any = "a") -> Callable[[Path], Any]:
    def attack(tmp):
        return make(tmp).read(episode_id, start, stop)
    return attack


class _Bomb:
    """Unpickling this touches ``path``: proof that a file was unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def pickled(old: bool) -> Callable[[Path], Any]:
    """A pickled object array in place of flags.npy; re-raises the refusal only if nothing was unpickled."""
    def attack(tmp):
        make(tmp)
        if old:
            legacy(tmp)
        marker = tmp / "unpickled"
        np.save(npy(tmp, "flags"), np.array([_Bomb(str(marker))] * 3, dtype=object), allow_pickle=True)
        try:
            return read_all(tmp)
        finally:
            if marker.exists():
                raise AssertionError("the store unpickled a .npy file")
    return attack


def symlinked_dir(old: bool) -> Callable[[Path], Any]:
    """episodes/0 of store s replaced by a link to another store's episode directory (same shapes)."""
    def attack(tmp):
        make(tmp)
        other = EpisodeStore.create(tmp / "other", SIZE)
        other.append("x", episode(3, 1))  # identical content: only the path check can refuse it
        if old:
            legacy(tmp)
        shutil.rmtree(root(tmp) / "episodes" / "0")
        os.symlink(tmp / "other" / "episodes" / "0", root(tmp) / "episodes" / "0")
        return read_all(tmp)
    return attack


def symlinked_file(tmp: Path) -> EpisodeStore:
    """episodes/0/frames.npy a link to a file outside the store with the same content."""
    make(tmp)
    outside = tmp / "outside.npy"
    shutil.copy(npy(tmp, "frames"), outside)
    npy(tmp, "frames").unlink()
    os.symlink(outside, npy(tmp, "frames"))
    return read_all(tmp)


def _appender(path: str, worker: int, count: int) -> None:
    store = EpisodeStore.open(path)
    for i in range(count):
        value = 1 + worker * count + i
        store.append(f"w{worker}-{i}", episode(1 + i % 3, value), {"value": value})


def concurrent_appenders(tmp: Path) -> EpisodeStore:
    """Two processes, each with a store opened before either appends, append 8 episodes each."""
    EpisodeStore.create(root(tmp), SIZE)
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_appender, args=(str(root(tmp)), w, 8)) for w in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    if [w.exitcode for w in workers] != [0, 0]:
        raise RuntimeError(f"appender exit codes {[w.exitcode for w in workers]}")
    return EpisodeStore.open(root(tmp))


def check_concurrent(store: EpisodeStore, tmp: Path) -> None:
    expected = {f"w{w}-{i}" for w in range(2) for i in range(8)}
    if set(store.episode_ids) != expected:
        raise DataLost(f"missing {sorted(expected - set(store.episode_ids))}")
    for episode_id in store.episode_ids:
        value = store.info(episode_id)["value"]
        assert np.array_equal(store.read(episode_id)["frames"], episode(store.length(episode_id), value)["frames"])
    assert store.verify() == []


def _creator(path: str, queue) -> None:
    try:
        EpisodeStore.create(path, SIZE).append("mine", episode(2, 5), {"value": 5})
        queue.put("created")
    except FileExistsError as error:
        queue.put(f"refused: {error}")


def concurrent_creates(tmp: Path) -> list[str]:
    """Two processes create a store at one path at once: one creates, the other is refused."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_creator, args=(str(root(tmp)), queue)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    return sorted(queue.get(timeout=5) for _ in workers)


def check_one_created(outcomes: list[str], tmp: Path) -> None:
    assert outcomes[0] == "created" and outcomes[1].startswith("refused: ") and "already one" in outcomes[1], outcomes
    store = EpisodeStore.open(root(tmp))
    assert store.episode_ids == ["mine"] and store.verify() == []


def stale_objects(tmp: Path) -> EpisodeStore:
    """Two store objects of one store, both opened before either appends; they append in turn."""
    first = make(tmp, ("a",))
    second = EpisodeStore.open(root(tmp))
    first.append("b", episode(3, 2), {"value": 2})
    second.append("c", episode(3, 3), {"value": 3})
    first.append("d", episode(3, 4), {"value": 4})
    return second


def stale_duplicate(tmp: Path) -> None:
    first = make(tmp, ("a",))
    second = EpisodeStore.open(root(tmp))
    first.append("b", episode(3, 2), {"value": 2})
    second.append("b", episode(3, 7), {"value": 7})  # the id another store object added meanwhile


def crashed_create(tmp: Path) -> EpisodeStore:
    """What a create killed before manifest.json leaves, then create again and append."""
    (root(tmp) / "episodes").mkdir(parents=True)
    (root(tmp) / "index.json").write_text("{}")
    (root(tmp) / ".lock").touch()
    (root(tmp) / ".manifest.json.tmp").write_text('{"format": "mstu')
    store = EpisodeStore.create(root(tmp), SIZE)
    store.append("a", episode(3, 1), {"value": 1})
    return store


def crash_leftovers(tmp: Path) -> None:
    """A store with the leftovers of interrupted writes: a half temp dir, a temp index."""
    make(tmp)
    (root(tmp) / "episodes" / ".2.tmp").mkdir()
    (root(tmp) / "episodes" / ".2.tmp" / "frames.npy").write_bytes(b"\x93NUMPY half")
    (root(tmp) / ".index.json.tmp").write_text('{"a": {"dir"')


def repaired(tmp: Path) -> list[str]:
    crash_leftovers(tmp)
    return EpisodeStore.open(root(tmp)).verify(repair=True)


def check_repaired(problems: list[str], tmp: Path) -> None:
    assert len(problems) == 2 and all(p.endswith("(removed)") for p in problems), problems
    assert not (root(tmp) / ".index.json.tmp").exists() and not (root(tmp) / "episodes" / ".2.tmp").exists()
    holds("a", "b")(None, tmp)


def repair_keeps_damaged(tmp: Path) -> list[str]:
    """Zeroed bytes in an indexed episode: verify(repair=True) reports it and removes nothing."""
    make(tmp)
    path = npy(tmp, "frames")
    path.write_bytes(zero_run(path.read_bytes()))
    return EpisodeStore.open(root(tmp)).verify(repair=True)


def check_damage_reported(problems: list[str], tmp: Path) -> None:
    if not npy(tmp, "frames").exists():
        raise DataLost("verify(repair=True) removed an indexed episode's file")
    assert any("episodes/0/frames.npy" in p and "'a'" in p and "checksum" in p for p in problems), problems
    assert EpisodeStore.open(root(tmp)).episode_ids == ["a", "b"]


def index_rolled_back(then: str) -> Callable[[Path], Any]:
    """index.json loses its last entry (restored from an older copy); then ``then`` ('repair' or 'append')."""
    def attack(tmp):
        make(tmp)
        edit_json(root(tmp) / "index.json", lambda index: {"a": index["a"]})
        store = EpisodeStore.open(root(tmp))
        if then == "append":
            store.append("c", episode(3, 3), {"value": 3})
        return store.verify(repair=True)
    return attack


def check_rolled_back(expected: tuple[str, ...]) -> Callable[[Any, Path], None]:
    def check(problems, tmp):
        store = EpisodeStore.open(root(tmp))
        if "b" not in store:
            raise DataLost("episode 'b' (still complete on disk when the index lost it) is gone")
        assert sorted(store.episode_ids) == sorted(expected), store.episode_ids
        holds(*store.episode_ids)(None, tmp)
    return check


def verify_zeroed(key: str) -> Callable[[Path], Any]:
    def attack(tmp):
        make(tmp, n=80)
        path = npy(tmp, key)
        path.write_bytes(zero_run(path.read_bytes()))
        return EpisodeStore.open(root(tmp)).verify()
    return attack


def check_zeroed_reported(key: str) -> Callable[[Any, Path], None]:
    def check(problems, tmp):
        assert [p for p in problems if f"episodes/0/{key}.npy" in p and "'a'" in p and "checksum" in p], problems
    return check


def old_store_verify(tmp: Path) -> str:
    """A store written before checksums: opens, reads, and `store verify` passes with an info line."""
    make(tmp)
    legacy(tmp)
    assert read_all(tmp).verify() == []
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["store", "verify", str(root(tmp))])
    assert code == 0, (code, out.getvalue())
    return out.getvalue()


def check_old_store(out: str, tmp: Path) -> None:
    assert "no checksum recorded" in out and out.rstrip().endswith("ok"), out
    holds("a", "b")(None, tmp)


def checksums_recorded(tmp: Path) -> dict:
    make(tmp)
    return json.loads((root(tmp) / "index.json").read_text())


def check_checksums(index: dict, tmp: Path) -> None:
    for entry in index.values():
        sums = entry.get("crc32")
        assert isinstance(sums, dict) and sorted(sums) == sorted(KEYS), entry


def odd_layouts(tmp: Path) -> EpisodeStore:
    """Non-contiguous, Fortran-ordered and read-only arrays are stored as their values."""
    store = make(tmp, ("a",))
    data = episode(4, 2)
    data["frames"] = np.asfortranarray(data["frames"])
    data["env_camera"] = np.ascontiguousarray(data["env_camera"][:, ::-1])[:, ::-1]
    data["buttons"].setflags(write=False)
    store.append("b", data, {"value": 2})
    return store


def check_odd_layouts(store: EpisodeStore, tmp: Path) -> None:
    got, want = EpisodeStore.open(root(tmp)).read("b"), episode(4, 2)
    assert all(np.array_equal(got[k], want[k]) for k in KEYS)


def refused_leaves_nothing(tmp: Path) -> EpisodeStore:
    """A refused append (NaN camera) then a good one: the store holds only the good one, no leftovers."""
    store = make(tmp, ("a",))
    with_nan = episode(3, 2)
    with_nan["env_camera"][1, 0] = np.nan
    try:
        store.append("b", with_nan, {"value": 2})
    except ValueError:
        pass
    store.append("b", episode(3, 2), {"value": 2})
    return store


def append_after_crash_leftovers(tmp: Path) -> EpisodeStore:
    crash_leftovers(tmp)
    store = EpisodeStore.open(root(tmp))
    store.append("c", episode(3, 3), {"value": 3})
    store.verify(repair=True)
    return store


def numpy_ints(tmp: Path) -> dict:
    store = EpisodeStore.create(root(tmp), (np.int64(8), np.int32(8)))
    store.append("a", episode(3, 1), {"value": 1})
    return EpisodeStore.open(root(tmp)).read("a", np.int64(1), np.int32(3))


def check_numpy_ints(window: dict, tmp: Path) -> None:
    assert np.array_equal(window["frames"], episode(3, 1)["frames"][1:3])
    assert json.loads((root(tmp) / "manifest.json").read_text())["image_size"] == [8, 8]


def missing_episodes_dir(tmp: Path) -> list[str]:
    make(tmp)
    shutil.rmtree(root(tmp) / "episodes")
    return EpisodeStore.open(root(tmp)).verify(repair=True)


def check_missing_reported(problems: list[str], tmp: Path) -> None:
    assert len(problems) == 2 and all("missing" in p for p in problems), problems
    assert "episodes/0" in problems[0] and "'a'" in problems[0]


def assert_len(window: dict, n: int) -> None:
    assert all(len(v) == n for v in window.values()) and window["frames"].shape == (n, *SIZE, 3)


def _s(name: str, run: Callable[[Path], Any], expect: Refused | Handled) -> Case:
    return Case("store", name, run, expect)


_NOT_JSON = (ValueError, "index.json", "not valid JSON")

CASES = [
    # index.json damaged or hostile: refused on open, naming the file and entry
    _s("index-truncated-object", bad_file("index.json", b'{"a": {"dir": "0", "len'), Refused(*_NOT_JSON)),
    _s("index-empty-file", bad_file("index.json", b""), Refused(*_NOT_JSON, "0 bytes")),
    _s("index-binary", bad_file("index.json", bytes(range(256))), Refused(*_NOT_JSON, "UTF-8")),
    _s("index-nul-bytes", bad_file("index.json", b"\0" * 40), Refused(*_NOT_JSON)),
    _s("index-a-list", bad_file("index.json", b"[]"), Refused(ValueError, "index.json", "JSON object", "list")),
    _s("index-null", bad_file("index.json", b"null"), Refused(ValueError, "index.json", "JSON object", "NoneType")),
    _s("index-a-number", bad_file("index.json", b"7"), Refused(ValueError, "index.json", "JSON object", "int")),
    _s("index-missing", lambda tmp: (make(tmp), (root(tmp) / "index.json").unlink(), read_all(tmp)),
       Refused(FileNotFoundError, "index.json")),
    _s("index-a-directory", lambda tmp: (make(tmp), (root(tmp) / "index.json").unlink(),
                                         (root(tmp) / "index.json").mkdir(), read_all(tmp)),
       Refused(OSError, "index.json", "directory")),
    _s("entry-a-number", lambda tmp: (make(tmp), edit_json(root(tmp) / "index.json", lambda i: {**i, "b": 5}),
                                      read_all(tmp)),
       Refused(ValueError, "index.json", "episode 'b'", "must be an object", "5")),
    _s("entry-dir-traversal", bad_entry(dir="../.."), Refused(ValueError, "episode 'b'", "'dir'", "'../..'")),
    _s("entry-dir-other-store", bad_entry(dir="../../other/episodes/0"),
       Refused(ValueError, "episode 'b'", "'dir'", "plain directory name", "../../other")),
    _s("entry-dir-absolute", bad_entry(dir="/etc"), Refused(ValueError, "episode 'b'", "'dir'", "'/etc'")),
    _s("entry-dir-int", bad_entry(dir=1), Refused(ValueError, "episode 'b'", "'dir'", "found 1")),
    _s("entry-dir-missing", bad_entry(dir=...), Refused(ValueError, "episode 'b'", "'dir'", "None")),
    _s("entry-dir-shared", bad_entry(dir="0"),
       Refused(ValueError, "episode 'b'", "'dir'", "also the dir of episode 'a'")),
    _s("entry-dir-nonexistent", bad_entry(dir="99"),
       Refused(FileNotFoundError, "episodes/99/frames.npy", "episode 'b'", "missing")),
    _s("entry-length-string", bad_entry(length="3"),
       Refused(ValueError, "episode 'b'", "'length'", "positive int", "'3'")),
    _s("entry-length-zero", bad_entry(length=0),
       Refused(ValueError, "episode 'b'", "'length'", "positive int", "found 0")),
    _s("entry-length-negative", bad_entry(length=-3), Refused(ValueError, "'length'", "positive int", "-3")),
    _s("entry-length-float", bad_entry(length=3.0), Refused(ValueError, "'length'", "positive int", "3.0")),
    _s("entry-length-bool", bad_entry(length=True), Refused(ValueError, "'length'", "positive int", "True")),
    _s("entry-length-missing", bad_entry(length=...), Refused(ValueError, "'length'", "positive int", "None")),
    _s("entry-length-more-than-files", bad_entry(length=5),
       Refused(ValueError, "episodes/1/frames.npy", "episode 'b'", "expected uint8 (5, 8, 8, 3)", "(3, 8, 8, 3)")),
    _s("entry-length-fewer-than-files", bad_entry(length=2),
       Refused(ValueError, "episodes/1/frames.npy", "episode 'b'", "(2, 8, 8, 3)", "found uint8 (3, 8, 8, 3)")),
    _s("entry-info-list", bad_entry(info=[1]), Refused(ValueError, "episode 'b'", "'info'", "JSON object", "[1]")),
    _s("entry-info-missing", bad_entry(info=...), Refused(ValueError, "episode 'b'", "'info'", "JSON object", "None")),
    _s("entry-checksums-a-string", bad_entry(crc32="abc"), Refused(ValueError, "episode 'b'", "'crc32'", "'abc'")),
    _s("entry-checksum-negative", bad_entry(crc32={k: -1 for k in KEYS}),
       Refused(ValueError, "episode 'b'", "'crc32'", "-1")),
    _s("entry-checksums-missing-a-key", lambda tmp: (make(tmp), edit_json(root(tmp) / "index.json", lambda i: {
        **i, "b": {**i["b"], "crc32": {k: v for k, v in i["b"].get("crc32", {"frames": 1}).items() if k != "flags"}}}),
        read_all(tmp)), Refused(ValueError, "episode 'b'", "'crc32'", "flags")),
    _s("entry-unknown-field-ignored", bad_entry(note="hand-written"), Handled(lambda _, tmp: holds("a", "b")(_, tmp))),

    # manifest.json damaged
    _s("manifest-truncated", bad_file("manifest.json", b'{"format": "mstudio-epi'),
       Refused(ValueError, "manifest.json", "not valid JSON")),
    _s("manifest-empty-file", bad_file("manifest.json", b""), Refused(ValueError, "manifest.json", "not valid JSON")),
    _s("manifest-binary", bad_file("manifest.json", b"\x89PNG\r\n\x1a\n"),
       Refused(ValueError, "manifest.json", "UTF-8")),
    _s("manifest-a-list", bad_file("manifest.json", b"[1, 2]"),
       Refused(ValueError, "manifest.json", "JSON object", "list")),
    _s("manifest-missing", lambda tmp: (make(tmp), (root(tmp) / "manifest.json").unlink(), read_all(tmp)),
       Refused(FileNotFoundError, "not an episode store", "no manifest.json")),
    _s("manifest-other-format", bad_manifest(format="webdataset"),
       Refused(ValueError, "manifest.json", "'webdataset'", "mstudio-episode-store")),
    _s("manifest-future-version", bad_manifest(version=2),
       Refused(ValueError, "manifest.json", "version 2", "version 1")),
    _s("manifest-image-size-zero", bad_manifest(image_size=[0, 8]),
       Refused(ValueError, "manifest.json", "'image_size'", "positive ints", "[0, 8]")),
    _s("manifest-image-size-strings", bad_manifest(image_size=["8", "8"]),
       Refused(ValueError, "manifest.json", "'image_size'", "['8', '8']")),
    _s("manifest-image-size-three", bad_manifest(image_size=[8, 8, 3]),
       Refused(ValueError, "manifest.json", "'image_size'", "[8, 8, 3]")),
    _s("manifest-image-size-unlike-files", bad_manifest(image_size=[16, 16]),
       Refused(ValueError, "episodes/0/frames.npy", "episode 'a'", "(3, 16, 16, 3)", "(3, 8, 8, 3)")),

    # array files missing, of the wrong kind, or damaged
    _s("array-missing", lambda tmp: (make(tmp), npy(tmp, "flags").unlink(), read_all(tmp)),
       Refused(FileNotFoundError, "episodes/0/flags.npy", "episode 'a'", "missing")),
    _s("array-a-directory", lambda tmp: (make(tmp), npy(tmp, "flags").unlink(), npy(tmp, "flags").mkdir(),
                                         read_all(tmp)),
       Refused(OSError, "episodes/0/flags.npy", "directory")),
    _s("episode-dir-a-file", lambda tmp: (make(tmp), shutil.rmtree(root(tmp) / "episodes" / "0"),
                                          (root(tmp) / "episodes" / "0").write_text("x"), read_all(tmp)),
       Refused(OSError, "episodes/0")),
    _s("array-wrong-dtype", replace_array("camera", np.zeros(3, np.int64)),
       Refused(ValueError, "episodes/0/camera.npy", "episode 'a'", "expected uint8 (3,)", "found int64 (3,)")),
    _s("array-wrong-shape", replace_array("frames", np.zeros((3, 16, 16, 3), np.uint8)),
       Refused(ValueError, "episodes/0/frames.npy", "episode 'a'", "(3, 8, 8, 3)", "(3, 16, 16, 3)")),
    _s("array-wrong-ndim", replace_array("env_camera", np.zeros(3, np.float32)),
       Refused(ValueError, "episodes/0/env_camera.npy", "episode 'a'", "(3, 2)", "(3,)")),
    _s("array-same-shape-other-values", replace_array("buttons", np.full(3, 77, np.int16)),
       Refused(ValueError, "episodes/0/buttons.npy", "episode 'a'", "checksum")),
    _s("array-same-shape-other-values-old-store", replace_array("buttons", np.full(3, 77, np.int16), old=True),
       Handled(lambda store, tmp: None)),  # written before checksums: nothing to compare with, read as it is
    _s("array-pickled", pickled(old=False), Refused(ValueError, "episodes/0/flags.npy", "episode 'a'")),
    _s("array-pickled-old-store", pickled(old=True),
       Refused(ValueError, "episodes/0/flags.npy", "episode 'a'", "object")),
    _s("array-garbage", damage("flags", lambda d: b"garbage, not an array" * 4),
       Refused(ValueError, "episodes/0/flags.npy", "episode 'a'", "not a .npy file")),
    _s("array-empty-file", damage("flags", lambda d: b""),
       Refused(ValueError, "episodes/0/flags.npy", "episode 'a'", "not a .npy file")),
    _s("array-header-cut", damage("buttons", lambda d: d[:20]),
       Refused(ValueError, "episodes/0/buttons.npy", "episode 'a'", "damaged .npy")),
    _s("array-data-cut", damage("frames", lambda d: d[:-10]),
       Refused(ValueError, "episodes/0/frames.npy", "episode 'a'")),
    _s("array-data-cut-old-store", damage("frames", lambda d: d[:-10], old=True),
       Refused(ValueError, "episodes/0/frames.npy", "episode 'a'", "damaged .npy")),
    _s("array-bytes-appended", damage("frames", lambda d: d + b"\0" * 64),
       Refused(ValueError, "episodes/0/frames.npy", "episode 'a'", "checksum")),
    _s("array-byte-flipped", damage("frames", flip_byte),
       Refused(ValueError, "episodes/0/frames.npy", "episode 'a'", "checksum")),
    _s("array-header-zeroed", damage("camera", lambda d: bytes(64) + d[64:]),
       Refused(ValueError, "episodes/0/camera.npy", "episode 'a'", "not a .npy file")),
    *[_s(f"array-64-bytes-zeroed-{key}", damage(key, zero_run, n=80),
         Refused(ValueError, f"episodes/0/{key}.npy", "episode 'a'", "checksum")) for key in KEYS],
    _s("episode-dir-links-out", symlinked_dir(old=False), Refused(ValueError, "episodes/0", "outside")),
    _s("episode-dir-links-out-old-store", symlinked_dir(old=True), Refused(ValueError, "episodes/0", "outside")),
    _s("array-file-links-out", symlinked_file, Refused(ValueError, "episodes/0/frames.npy", "outside")),

    # verify and repair
    *[_s(f"verify-finds-64-zeroed-bytes-{key}", verify_zeroed(key), Handled(check_zeroed_reported(key)))
      for key in ("frames", "env_camera", "flags")],
    _s("verify-old-store-notes-no-checksum", old_store_verify, Handled(check_old_store)),
    _s("verify-repair-removes-crash-leftovers", repaired, Handled(check_repaired)),
    _s("verify-repair-keeps-damaged-indexed-data", repair_keeps_damaged, Handled(check_damage_reported)),
    _s("verify-repair-after-index-rolled-back", index_rolled_back("repair"), Handled(check_rolled_back(("a", "b")))),
    _s("append-after-index-rolled-back", index_rolled_back("append"), Handled(check_rolled_back(("a", "b", "c")))),
    _s("verify-repair-episodes-dir-gone", missing_episodes_dir, Handled(check_missing_reported)),
    _s("verify-corrupt-index", lambda tmp: (make(tmp), store := EpisodeStore.open(root(tmp)),
                                            (root(tmp) / "index.json").write_text("{"), store.verify(repair=True)),
       Refused(ValueError, "index.json", "not valid JSON")),
    _s("append-after-crash-leftovers", append_after_crash_leftovers,
       Handled(lambda _, tmp: holds("a", "b", "c")(_, tmp))),
    _s("checksums-recorded", checksums_recorded, Handled(check_checksums)),

    # append: bad ids, arrays and info are refused before anything is written
    _s("append-id-none", appending(lambda: episode(3, 9), episode_id=None),
       Refused(ValueError, "episode_id", "non-empty str", "None")),
    _s("append-id-int", appending(lambda: episode(3, 9), episode_id=5), Refused(ValueError, "episode_id", "5")),
    _s("append-id-empty", appending(lambda: episode(3, 9), episode_id=""), Refused(ValueError, "episode_id", "''")),
    _s("append-id-duplicate", appending(lambda: episode(3, 9), episode_id="a"),
       Refused(ValueError, "episode 'a'", "already in the store")),
    _s("append-arrays-a-list", appending(lambda: list(episode(3, 9).values())),
       Refused(TypeError, "arrays", "mapping", "list")),
    _s("append-arrays-none", appending(lambda: None), Refused(TypeError, "arrays", "mapping", "NoneType")),
    _s("append-missing-array", appending(lambda: {k: v for k, v in episode(3, 9).items() if k != "flags"}),
       Refused(ValueError, "exactly the arrays", "flags")),
    _s("append-extra-array", appending(lambda: {**episode(3, 9), "rewards": np.zeros(3)}),
       Refused(ValueError, "exactly the arrays", "rewards")),
    _s("append-frames-float", appending(with_array("frames", lambda a: a.astype(np.float32))),
       Refused(ValueError, "arrays['frames']", "uint8", "float32")),
    _s("append-buttons-int64", appending(with_array("buttons", lambda a: a.astype(np.int64))),
       Refused(ValueError, "arrays['buttons']", "int16", "int64")),
    _s("append-buttons-big-endian", appending(with_array("buttons", lambda a: a.astype(">i2"))),
       Refused(ValueError, "arrays['buttons']", "int16", ">i2")),
    _s("append-frames-other-size", appending(with_array("frames", lambda a: np.zeros((3, 16, 16, 3), np.uint8))),
       Refused(ValueError, "arrays['frames']", "(N, 8, 8, 3)", "(3, 16, 16, 3)")),
    _s("append-frames-grey", appending(with_array("frames", lambda a: a[..., 0])),
       Refused(ValueError, "arrays['frames']", "(N, 8, 8, 3)", "(3, 8, 8)")),
    _s("append-env-camera-one-column", appending(with_array("env_camera", lambda a: a[:, 0])),
       Refused(ValueError, "arrays['env_camera']", "(N, 2)", "(3,)")),
    _s("append-lengths-differ", appending(with_array("buttons", lambda a: a[:2])),
       Refused(ValueError, "same number of frames", "'buttons': 2", "'frames': 3")),
    _s("append-no-frames", appending(lambda: {k: v[:0] for k, v in episode(3, 9).items()}),
       Refused(ValueError, "at least one frame")),
    _s("append-env-camera-nan", appending(with_array("env_camera", lambda a: np.where(np.arange(6).reshape(3, 2) == 3,
                                                                                      np.nan, a).astype(np.float32))),
       Refused(ValueError, "arrays['env_camera']", "finite", "nan", "frame 1")),
    _s("append-env-camera-inf", appending(with_array("env_camera", lambda a: np.full_like(a, np.inf))),
       Refused(ValueError, "arrays['env_camera']", "finite", "inf")),
    _s("append-buttons-too-big", appending(with_array("buttons", lambda a: np.full_like(a, 9000))),
       Refused(ValueError, "arrays['buttons']", "8641", "9000")),
    _s("append-buttons-negative", appending(with_array("buttons", lambda a: np.full_like(a, -1))),
       Refused(ValueError, "arrays['buttons']", "8641", "-1")),
    _s("append-camera-too-big", appending(with_array("camera", lambda a: np.full_like(a, 200))),
       Refused(ValueError, "arrays['camera']", "121", "200")),
    _s("append-frames-a-list", appending(with_array("frames", lambda a: a.tolist())),
       Refused(ValueError, "arrays['frames']", "uint8", "list")),
    _s("append-frames-a-tensor", appending(with_array("frames", torch.from_numpy)),
       Refused(ValueError, "arrays['frames']", "uint8", "Tensor")),
    _s("append-info-a-set", appending(lambda: episode(3, 9), info={"segments": {1, 2}}),
       Refused(ValueError, "info", "JSON", "set")),
    _s("append-info-nan", appending(lambda: episode(3, 9), info={"score": float("nan")}),
       Refused(ValueError, "info", "JSON", "nan")),
    _s("append-info-object", appending(lambda: episode(3, 9), info={"path": Path("/x")}),
       Refused(ValueError, "info", "JSON", "PosixPath")),
    _s("append-info-a-list", appending(lambda: episode(3, 9), info=[("a", 1), ("b", 2)]),
       Refused(TypeError, "info", "mapping", "list")),
    _s("append-info-a-string", appending(lambda: episode(3, 9), info="ab"),
       Refused(TypeError, "info", "mapping", "str")),
    _s("append-odd-memory-layouts", odd_layouts, Handled(check_odd_layouts)),
    _s("append-refused-then-good", refused_leaves_nothing, Handled(lambda _, tmp: holds("a", "b")(_, tmp))),

    # create: over the wrong thing, after a crash, with bad arguments
    _s("create-over-a-file", lambda tmp: (root(tmp).write_text("x"), EpisodeStore.create(root(tmp), SIZE)),
       Refused(FileExistsError, "(a file)")),
    _s("create-over-a-non-empty-dir", lambda tmp: (root(tmp).mkdir(), (root(tmp) / "data.bin").write_bytes(b"1"),
                                                   EpisodeStore.create(root(tmp), SIZE)),
       Refused(FileExistsError, "not empty", "data.bin")),
    _s("create-over-a-store", lambda tmp: (make(tmp), EpisodeStore.create(root(tmp), SIZE)),
       Refused(FileExistsError, "already one", "EpisodeStore.open")),
    _s("create-inside-a-file", lambda tmp: ((tmp / "f.txt").write_text("x"),
                                            EpisodeStore.create(tmp / "f.txt" / "s", SIZE)),
       Refused(OSError, "f.txt")),
    _s("create-after-a-crash", crashed_create, Handled(lambda _, tmp: holds("a")(_, tmp))),
    _s("create-image-size-zero", creating((0, 8)), Refused(ValueError, "image_size", "positive", "(0, 8)")),
    _s("create-image-size-negative", creating((8, -8)), Refused(ValueError, "image_size", "positive", "(8, -8)")),
    _s("create-image-size-float", creating((8.5, 8)), Refused(ValueError, "image_size", "integers", "8.5")),
    _s("create-image-size-string", creating("8"), Refused(ValueError, "image_size", "(height, width)", "'8'")),
    _s("create-image-size-one-number", creating(8), Refused(ValueError, "image_size", "(height, width)", "8")),
    _s("create-image-size-three", creating((8, 8, 3)),
       Refused(ValueError, "image_size", "(height, width)", "(8, 8, 3)")),
    _s("create-image-size-bool", creating((True, 8)), Refused(ValueError, "image_size", "True")),
    _s("create-meta-a-set", creating(SIZE, {"tags": {"a"}}), Refused(ValueError, "meta", "JSON", "set")),
    _s("create-meta-nan", creating(SIZE, {"fps": float("inf")}), Refused(ValueError, "meta", "JSON", "inf")),
    _s("create-meta-a-list", creating(SIZE, [1, 2]), Refused(TypeError, "meta", "mapping", "list")),
    _s("create-path-none", lambda tmp: EpisodeStore.create(None, SIZE), Refused(TypeError, "path", "NoneType")),
    _s("create-numpy-sizes-and-reads", numpy_ints, Handled(check_numpy_ints)),

    # open
    _s("open-nonexistent", lambda tmp: EpisodeStore.open(tmp / "nothing"),
       Refused(FileNotFoundError, "nothing", "not an episode store")),
    _s("open-a-file", lambda tmp: ((tmp / "f").write_text("x"), EpisodeStore.open(tmp / "f")),
       Refused(FileNotFoundError, "not an episode store")),
    _s("open-path-int", lambda tmp: EpisodeStore.open(3), Refused(TypeError, "path", "int")),

    # reads out of range or of the wrong type
    _s("read-unknown-episode", reading(episode_id="zz"), Refused(KeyError, "no episode 'zz'", "2 episodes")),
    _s("read-id-an-int", reading(episode_id=0), Refused(KeyError, "no episode 0")),
    _s("read-start-negative", reading(-1, 2), Refused(IndexError, "[-1, 2)", "'a'", "3 frames")),
    _s("read-stop-past-end", reading(0, 4), Refused(IndexError, "[0, 4)", "'a'", "3 frames")),
    _s("read-start-after-stop", reading(2, 1), Refused(IndexError, "[2, 1)", "'a'")),
    _s("read-start-past-end", reading(5), Refused(IndexError, "[5, 3)", "'a'")),
    _s("read-start-a-float", reading(1.5), Refused(TypeError, "start", "int", "1.5")),
    _s("read-stop-a-string", reading(0, "2"), Refused(TypeError, "stop", "int", "'2'")),
    _s("read-empty-window", reading(1, 1), Handled(lambda w, tmp: assert_len(w, 0))),
    _s("length-unknown-episode", lambda tmp: make(tmp).length("zz"), Refused(KeyError, "no episode 'zz'")),
    _s("info-unknown-episode", lambda tmp: make(tmp).info("zz"), Refused(KeyError, "no episode 'zz'")),

    # concurrent writers
    _s("concurrent-appenders", concurrent_appenders, Handled(check_concurrent)),
    _s("concurrent-creates", concurrent_creates, Handled(check_one_created)),
    _s("stale-store-objects", stale_objects, Handled(lambda _, tmp: holds("a", "b", "c", "d")(_, tmp))),
    _s("stale-store-duplicate-id", stale_duplicate, Refused(ValueError, "episode 'b'", "already in the store")),
]

