"""Adversarial cases for :class:`~mstudio.data.ShardedStore`: damaged manifest fields, index lines that point
outside a shard or hold bad values, hostile shard files, and appends onto a damaged store.

Every store here is tiny (8x8 frames, 1 KiB shards); ``tmp / "s"`` is the store of a case. Index lines are edited
with their checksum recomputed, so each case reaches the field check it targets (not the line checksum).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mstudio.data import ShardedStore, open_store
from mstudio.data.video_codec import VideoCodec
from tests.adversarial.cases_store import episode
from tests.adversarial.harness import Case, DataLost, Handled, Refused

SIZE = (8, 8)


def root(tmp: Path) -> Path:
    return tmp / "s"


def make(tmp: Path, ids: tuple[str, ...] = ("a", "b")) -> ShardedStore:
    """A store at ``tmp / "s"`` of ``ids`` (episode ``i`` of 3 frames with value ``i + 1``), 1 KiB shards."""
    store = ShardedStore.create(root(tmp), SIZE, shard_bytes=1024)
    for value, episode_id in enumerate(ids, start=1):
        store.append(episode_id, episode(3, value), {"value": value})
    return store


def read_all(tmp: Path) -> ShardedStore:
    """Open the store and read every episode whole."""
    store = ShardedStore.open(root(tmp))
    for episode_id in store.episode_ids:
        store.read(episode_id)
    return store


def edit_manifest(**fields: Any) -> Callable[[Path], Any]:
    """Set manifest fields (``...``: delete one), then open and read the store."""
    def attack(tmp):
        make(tmp)
        path = root(tmp) / "manifest.json"
        manifest = json.loads(path.read_text())
        for key, value in fields.items():
            manifest.pop(key) if value is ... else manifest.__setitem__(key, value)
        path.write_text(json.dumps(manifest))
        return read_all(tmp)
    return attack


def edit_line(number: int, edit: Callable[[dict], Any], *, then: Callable[[Path], Any] = read_all
              ) -> Callable[[Path], Any]:
    """Rewrite index line ``number`` (1-based) as ``edit(entry)`` with a valid line checksum, then ``then(tmp)``."""
    def attack(tmp):
        make(tmp)
        path = root(tmp) / "index.jsonl"
        lines = path.read_bytes().split(b"\n")
        entry = json.loads(lines[number - 1][9:])
        text = json.dumps(edit(entry), separators=(",", ":")).encode()
        lines[number - 1] = b"%08x %s" % (zlib.crc32(text), text)
        path.write_bytes(b"\n".join(lines))
        return then(tmp)
    return attack


def _set(path: str, value: Any) -> Callable[[dict], dict]:
    """An edit setting ``entry[k1][k2]...`` (keys separated by '/', list positions as digits) to ``value``."""
    def edit(entry):
        *keys, last = [int(k) if k.isdigit() else k for k in path.split("/")]
        target = entry
        for key in keys:
            target = target[key]
        target[last] = value
        return entry
    return edit


def flip_line_byte(tmp: Path) -> ShardedStore:
    """Change one character of line 2's JSON without fixing its checksum."""
    make(tmp)
    path = root(tmp) / "index.jsonl"
    data = path.read_bytes().replace(b'"id":"b"', b'"id":"c"')
    path.write_bytes(data)
    return read_all(tmp)


def shard_linked_out(tmp: Path) -> ShardedStore:
    """Replace shard 0 by a link to a copy outside the store."""
    make(tmp)
    shard = root(tmp) / "shards" / "000000.bin"
    outside = tmp / "elsewhere.bin"
    outside.write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(outside)
    return read_all(tmp)


def append_after_repair(tmp: Path) -> ShardedStore:
    """A torn line and garbage past the committed end, repaired; then an append."""
    store = make(tmp)
    with open(root(tmp) / "shards" / "000001.bin", "ab") as f:
        f.write(b"\xff" * 300)
    with open(root(tmp) / "index.jsonl", "ab") as f:
        f.write(b'0badc0de {"id":"c"')
    store.verify(repair=True)
    store.append("c", episode(3, 3), {"value": 3})
    return ShardedStore.open(root(tmp))


def append_onto_missing_shard(tmp: Path) -> None:
    """Delete the only shard (which has room for more), then append."""
    store = ShardedStore.create(root(tmp), SIZE, shard_bytes=1 << 20)
    store.append("a", episode(3, 1), {"value": 1})
    (root(tmp) / "shards" / "000000.bin").unlink()
    ShardedStore.open(root(tmp)).append("b", episode(3, 2))


def repair_linked_shard(tmp: Path) -> list[str]:
    """verify(repair=True) on a store whose shard 0 is a link out of the store."""
    try:
        shard_linked_out(tmp)
    except ValueError:
        pass  # reading refuses the link (the case "shard-links-out")
    return ShardedStore.open(root(tmp)).verify(repair=True)


def check_link_kept(problems: list[str], tmp: Path) -> None:
    """The link is reported, and neither it nor its target is removed (it holds committed data)."""
    assert problems and problems[0].startswith("shards/000000.bin: outside the store"), problems
    if not (root(tmp) / "shards" / "000000.bin").is_symlink() or not (tmp / "elsewhere.bin").is_file():
        raise DataLost("verify(repair=True) removed a shard the index names")


def holds(*ids: str) -> Callable[[Any, Path], None]:
    """A check: the store holds exactly ``ids`` with their own data, and verifies clean."""
    def check(_, tmp):
        store = open_store(root(tmp))
        missing = [e for e in ids if e not in store]
        if missing:
            raise DataLost(f"episodes {missing} are gone from the store")
        assert store.episode_ids == list(ids), store.episode_ids
        for episode_id in ids:
            got, want = store.read(episode_id), episode(3, store.info(episode_id)["value"])
            assert all(np.array_equal(got[k], want[k]) for k in want), f"episode {episode_id!r} holds other data"
        assert store.verify() == [], store.verify()
    return check


def _c(name: str, run: Callable[[Path], Any], expect: Refused | Handled) -> Case:
    return Case("sharded", name, run, expect)


CASES = [
    # manifest fields
    _c("manifest-shard-bytes-negative", edit_manifest(shard_bytes=-1),
       Refused(ValueError, "manifest.json", "'shard_bytes'", "positive int", "-1")),
    _c("manifest-shard-bytes-missing", edit_manifest(shard_bytes=...),
       Refused(ValueError, "manifest.json", "'shard_bytes'", "None")),
    _c("manifest-frames-unknown-encoding", edit_manifest(frames={"encoding": "zstd"}),
       Refused(ValueError, "manifest.json", "'frames'", "zstd")),
    _c("manifest-codec-crf-out-of-range", edit_manifest(frames={"encoding": "video", "codec": {
        **VideoCodec().to_json(), "crf": 99}}),
       Refused(ValueError, "manifest.json", "'crf'", "99")),
    _c("manifest-image-size-strings", edit_manifest(image_size=["8", "8"]),
       Refused(ValueError, "manifest.json", "'image_size'", "['8', '8']")),
    _c("manifest-other-format", edit_manifest(format="webdataset"),
       Refused(ValueError, "manifest.json", "'webdataset'", "mstudio-sharded-store")),

    # index lines with bad values (checksums valid)
    _c("line-points-past-shard-end", edit_line(2, _set("arrays/flags/0", 10_000)),
       Refused(ValueError, "000001.bin", "episode 'b'", "flags", "past its end")),
    _c("line-offset-negative", edit_line(1, _set("arrays/frames/0", -64)),
       Refused(ValueError, "index.jsonl line 1", "arrays['frames']", "non-negative", "-64")),
    _c("line-nbytes-unlike-length", edit_line(1, _set("length", 4)),
       Refused(ValueError, "index.jsonl line 1", "arrays['frames']", "768 bytes", "576")),
    _c("line-shard-a-string", edit_line(1, _set("shard", "../../etc")),
       Refused(ValueError, "index.jsonl line 1", "'shard'", "'../../etc'")),
    _c("line-crc-too-large", edit_line(1, _set("arrays/camera/2", 2**40)),
       Refused(ValueError, "index.jsonl line 1", "arrays['camera']", "< 2**32")),
    _c("line-duplicate-id", edit_line(2, _set("id", "a")),
       Refused(ValueError, "index.jsonl line 2", "'a'", "listed twice")),
    _c("line-unknown-field", edit_line(1, _set("note", 1)),
       Refused(ValueError, "index.jsonl line 1", "exactly the fields", "note")),
    _c("line-points-into-another-episode", edit_line(2, _set("arrays/flags/0", 0), then=lambda tmp: ShardedStore.open(
        root(tmp)).verify()), Handled(lambda problems, tmp: _assert_overlap(problems))),
    _c("line-changed-checksum-stale", flip_line_byte,
       Refused(ValueError, "index.jsonl line 2", "checksum mismatch")),

    # shard files
    _c("shard-links-out", shard_linked_out, Refused(ValueError, "000000.bin", "outside the store")),
    _c("shard-missing", lambda tmp: (make(tmp), (root(tmp) / "shards" / "000000.bin").unlink(), read_all(tmp)),
       Refused(FileNotFoundError, "000000.bin", "episode 'a'", "missing")),
    _c("append-onto-missing-last-shard", append_onto_missing_shard,
       Refused(FileNotFoundError, "000000.bin", "missing", "run verify")),
    _c("append-after-repair", append_after_repair, Handled(holds("a", "b", "c"))),
    _c("repair-keeps-a-linked-shard", repair_linked_shard, Handled(check_link_kept)),
]


def _assert_overlap(problems: list[str]) -> None:
    assert any(p.startswith("shards/000001.bin: episode 'b' frames") and "overlaps episode 'b' flags" in p
               for p in problems), problems
