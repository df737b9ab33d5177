"""ShardedStore: episodes packed into a few large shard files with one index, for corpus-sized data.

Layout::

    root/manifest.json        format, frame size, action-space constants, shard size, frame encoding, user meta
    root/index.jsonl          one checksummed line per episode, in append order (see mstudio.data._shard_index)
    root/shards/<k>.bin       episodes' blocks back to back (see mstudio.data._shard_files)
    root/.lock                the writers' lock (``fcntl.flock``, exclusive)

Frames are stored raw (uint8 rows, read through a memory map with no decoding) or, with a
:class:`~mstudio.data.video_codec.VideoCodec`, as H.264 chunks of ``chunk_frames`` frames; a read decodes only the
chunks it overlaps. The other arrays are always raw. A process maps each shard once, when it first reads from it,
so open files and maps grow with shards, never with episodes; a forked loader worker maps them again.

Appends (one lock, one index update per call; :meth:`ShardedStore.append_many` takes any number of episodes):
the blocks are written past the committed end of the last shard (a new shard when it is full), the shard is
fsynced, then the episodes' index lines are appended to ``index.jsonl`` and fsynced. An episode exists once its
line (and its newline) is in the index, so a process killed at any point leaves each episode whole or absent:
bytes past a shard's committed end are never read, and the next append truncates them; a torn last index line
is ignored by readers and truncated by the next writer. Inside the lock a writer first reads the index lines
other processes added, so concurrent appenders never overwrite each other. :meth:`ShardedStore.verify` checks
every block against its CRC-32; with ``repair=True`` it removes only what a crash leaves (torn lines, bytes past
committed ends, shard files no line names, temporary files), never committed data.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from mstudio.data import _sharded_verify
from mstudio.data._base import Store, select_keys, window_bounds
from mstudio.data._checks import as_path, check_arrays, image_size_of, integer, json_object
from mstudio.data._files import ARRAYS
from mstudio.data._shard_files import INDEX, TMP_FILES, ShardWriter, map_shard, payload, shard_name
from mstudio.data._shard_index import chunk_starts, encode_line, entry_ranges, parse_index
from mstudio.data.store import _new_manifest, _read_json, _write_json, _writer_lock, array_spec
from mstudio.data.video_codec import VideoCodec, decode_chunk

__all__ = ["DEFAULT_SHARD_BYTES", "FORMAT", "VERSION", "ShardedStore"]

FORMAT = "mstudio-sharded-store"
VERSION = 1
DEFAULT_SHARD_BYTES = 2 << 30  # 2 GiB: a few thousand shards for the whole VPT corpus, raw
_BIT = {key: i for i, key in enumerate(ARRAYS)}  # an array's bit in ShardedStore._checked
_BATCH_BYTES = 256 << 20  # append_many writes a batch once its episodes take this much memory


def _check_manifest(manifest: Any, path: Path) -> tuple[dict, VideoCodec | None]:
    """``(manifest, codec or None)`` if this mstudio reads it; else ``ValueError`` naming the field."""
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} must hold a JSON object; found {type(manifest).__name__}")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{path} is format {manifest.get('format')!r} version {manifest.get('version')!r}; "
                         f"ShardedStore reads {FORMAT!r} version {VERSION}")
    try:
        image_size_of(manifest.get("image_size"))
    except ValueError:
        raise ValueError(f"{path} field 'image_size' must be [height, width] of positive ints; found "
                         f"{manifest.get('image_size')!r}") from None
    target = manifest.get("shard_bytes")
    if type(target) is not int or target < 1:
        raise ValueError(f"{path} field 'shard_bytes' must be a positive int; found {target!r}")
    frames = manifest.get("frames")
    if not isinstance(frames, dict) or frames.get("encoding") not in ("raw", "video"):
        raise ValueError(f"{path} field 'frames' must be {{\"encoding\": \"raw\"}} or {{\"encoding\": \"video\", "
                         f"\"codec\": {{...}}}}; found {frames!r}")
    if frames["encoding"] == "raw":
        return manifest, None
    return manifest, VideoCodec.from_json(frames.get("codec"), f"{path} field 'frames.codec'")


def _create_blockers(root: Path) -> list[str]:
    """What in ``root`` an unfinished :meth:`ShardedStore.create` does not leave (empty: ``root`` is reusable)."""
    if not root.exists():
        return []
    if not root.is_dir():
        return [f"{root} (a file)"]
    blockers = []
    for child in sorted(root.iterdir()):
        plain = child.is_file() and not child.is_symlink()
        if (child.name in (".lock", *TMP_FILES) and plain) or (child.name == INDEX and plain and not child.stat().st_size):
            continue
        if child.name == "shards" and child.is_dir() and not child.is_symlink() and not any(child.iterdir()):
            continue
        blockers.append(child.name + ("/" if child.is_dir() else ""))
    return blockers


def _refuse_unless_reusable(root: Path) -> None:
    """``FileExistsError`` naming what is in ``root`` unless a store may be created there."""
    blockers = _create_blockers(root)
    if "manifest.json" in blockers:
        raise FileExistsError(f"cannot create a sharded store in {root}: it is already a store (it holds "
                              f"manifest.json); open it with open_store")
    if blockers:
        raise FileExistsError(f"cannot create a sharded store in {root}: the directory is not empty; expected nothing "
                              f"or what an unfinished create leaves (an empty shards/ and index.jsonl, .lock, temp "
                              f"files); found {', '.join(blockers)}")


class ShardedStore(Store):
    """Episodes packed into shard files. Make one with :meth:`create`, open one with :meth:`open`."""

    def __init__(self, root: Path, manifest: dict, codec: VideoCodec | None, checksums: bool = True):
        self.root, self.manifest, self.codec, self.checksums = root, manifest, codec, checksums
        self.image_size = tuple(manifest["image_size"])
        self.shard_bytes = manifest["shard_bytes"]
        self._spec = array_spec(self.image_size)
        # bytes per frame of each array stored raw (all but the frames when they are video chunks)
        self._sizes = {k: int(d.itemsize * np.prod(s, dtype=np.int64)) for k, (d, s) in self._spec.items()
                       if codec is None or k != "frames"}
        self._index: dict[str, dict] = {}
        self._index_bytes = 0  # bytes of index.jsonl that committed lines span (a torn line may follow)
        self._tail = (0, 0)  # (last shard, its committed end in bytes)
        self._maps: dict[int, np.ndarray] = {}
        # per episode id, a bit per block whose CRC-32 this process checked (arrays in ARRAYS order, then chunks)
        self._checked: dict[str, int] = {}
        self._pid = os.getpid()

    @classmethod
    def create(cls, path: str | os.PathLike, image_size: tuple[int, int], meta: Mapping[str, Any] | None = None, *,
               codec: VideoCodec | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES) -> ShardedStore:
        """A new, empty store at ``path``.

        Args:
            path: must not exist, be an empty directory, or hold only what an interrupted ``create`` leaves (an
                empty ``shards/`` and ``index.jsonl``, ``.lock``, temp files); else ``FileExistsError``.
            image_size: ``(height, width)`` of every frame.
            meta: a JSON object stored in the manifest.
            codec: store frames as video chunks with these settings; ``None`` stores them raw.
            shard_bytes: target size of a shard; an episode never splits, so one larger than this gets a shard
                of its own.
        """
        root = as_path(path)
        manifest = _new_manifest(image_size_of(image_size), json_object({} if meta is None else meta, "meta"))
        if codec is not None and not isinstance(codec, VideoCodec):
            raise TypeError(f"codec must be a VideoCodec or None; got {type(codec).__name__} {codec!r}")
        frames = {"encoding": "raw"} if codec is None else {"encoding": "video", "codec": codec.to_json()}
        manifest.update(format=FORMAT, version=VERSION, shard_bytes=integer("shard_bytes", shard_bytes, 1),
                        frames=frames)
        _refuse_unless_reusable(root)  # before the lock file: never leave one in a directory we refuse
        root.mkdir(parents=True, exist_ok=True)
        with _writer_lock(root):
            _refuse_unless_reusable(root)  # another process may have created a store meanwhile
            (root / "shards").mkdir(exist_ok=True)
            (root / INDEX).touch()
            _write_json(root / "manifest.json", manifest)  # last: a directory without it is not a store
        return cls(root, manifest, codec)

    @classmethod
    def open(cls, path: str | os.PathLike, *, checksums: bool = True) -> ShardedStore:
        """The store at ``path``; ``ValueError`` naming the file and line if its manifest or index is invalid.

        Args:
            path: the store's directory.
            checksums: check each block against its CRC-32 the first time this process reads it (``False``
                skips that; :meth:`verify` always checks).
        """
        root = as_path(path)
        if not (root / "manifest.json").is_file():
            raise FileNotFoundError(f"{root} is not an episode store: no manifest.json (make one with "
                                    f"ShardedStore.create)")
        manifest, codec = _check_manifest(_read_json(root / "manifest.json"), root / "manifest.json")
        store = cls(root, manifest, codec, checksums)
        store._refresh()
        return store

    # --- the index ----------------------------------------------------------------------------------------------

    def _refresh(self, truncate_torn: bool = False) -> int:
        """Read the index lines added since the last read; returns the bytes of a torn last line (with
        ``truncate_torn``, under the writer lock, those are cut off: only a killed writer leaves them)."""
        path = self.root / INDEX
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; every sharded store has one (the episode index)")
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < self._index_bytes:  # replaced by a shorter file: read it all again
                self._index, self._index_bytes, self._tail = {}, 0, (0, 0)
            f.seek(self._index_bytes)
            data = f.read()
        entries, used = parse_index(data, path, len(self._index) + 1, self._sizes, self.codec is not None, self._index)
        if entries:  # the last shard and its committed end: where the next append goes
            last = max(self._tail[0], max(entry["shard"] for entry in entries.values()))
            ends = [offset + nbytes for entry in entries.values() if entry["shard"] == last
                    for _, offset, nbytes, _ in entry_ranges(entry)]
            self._tail = (last, max(ends + [self._tail[1] if self._tail[0] == last else 0]))
        self._index.update(entries)
        self._index_bytes += used
        torn = len(data) - used
        if torn and truncate_torn:
            os.truncate(path, self._index_bytes)
        return torn

    def shard_of(self, episode_id: str) -> int:
        """The number of the shard holding an episode (``shards/<k>.bin``)."""
        return self._entry(episode_id)["shard"]

    # --- writing ------------------------------------------------------------------------------------------------

    def append(self, episode_id: str, arrays: Mapping[str, np.ndarray], info: Mapping[str, Any] | None = None) -> None:
        """Add a whole episode, atomically and safely beside other writing processes (see the module docstring).

        Everything is checked, and the frames encoded, before the lock is taken or anything written.

        Args:
            episode_id: a new, unique id.
            arrays: as for :meth:`mstudio.data.EpisodeStore.append` (``frames`` uint8 ``(N, H, W, 3)``, ...).
            info: a JSON object of facts about the episode.
        """
        item = self._payload(episode_id, arrays, info, set())
        self._write([item])

    def append_many(self, episodes: Iterable[tuple[str, Mapping[str, np.ndarray], Mapping[str, Any] | None]], *,
                    commit_every: int = 4096, progress: bool = False) -> int:
        """Add many episodes: checked and encoded outside the lock, then written in batches of ``commit_every``
        episodes (or 256 MiB), each batch under one lock with one fsync of shard and index.

        Each episode is atomic as with :meth:`append`; a crash, or an error on a bad episode, keeps the
        episodes committed before it (an error commits those already checked, then raises naming the episode).
        The arrays are copied as they come, so the iterator may reuse its buffers.

        Args:
            episodes: ``(episode_id, arrays, info)`` triples (an iterator is consumed once, lazily).
            commit_every: episodes per batch.
            progress: show a tqdm progress bar.

        Returns:
            The number of episodes appended.
        """
        commit_every = integer("commit_every", commit_every, 1)
        seen: set[str] = set()
        count, batch, size = 0, [], 0
        for episode_id, arrays, info in tqdm(episodes, desc="append", unit="episode", disable=not progress):
            try:
                batch.append(self._payload(episode_id, arrays, info, seen, copy=True))
            except (TypeError, ValueError):
                count += self._write(batch)
                raise
            size += batch[-1].nbytes
            if len(batch) == commit_every or size >= _BATCH_BYTES:
                count, batch, size = count + self._write(batch), [], 0
        return count + self._write(batch)

    def _payload(self, episode_id: Any, arrays: Any, info: Any, seen: set[str], copy: bool = False):
        """The checked, encoded episode (``seen``: ids of the same call, refused twice; ``copy``: of the arrays)."""
        if not isinstance(episode_id, str) or not episode_id:
            raise ValueError(f"episode_id must be a non-empty str, got {episode_id!r}")
        if episode_id in self._index or episode_id in seen:
            raise ValueError(f"episode {episode_id!r} is already in the store at {self.root}")
        try:
            n = check_arrays(arrays, self._spec)
        except (TypeError, ValueError) as err:
            raise type(err)(f"episode {episode_id!r}: {err}") from None
        seen.add(episode_id)
        return payload(episode_id, arrays, n, json_object({} if info is None else info, "info"), self.codec, copy)

    def _write(self, items: list) -> int:
        """Write and commit ``items`` (checked payloads) under the writer lock; returns how many."""
        if not items:
            return 0
        with _writer_lock(self.root):
            self._refresh(truncate_torn=True)  # other processes may have appended since we read the index
            taken = [item.episode_id for item in items if item.episode_id in self._index]
            if taken:
                raise ValueError(f"episodes {taken[:5]} are already in the store at {self.root} (another process "
                                 f"appended them); nothing of this call was written")
            writer = ShardWriter(self.root / "shards", *self._tail, self.shard_bytes)
            try:
                entries = [writer.write(item) for item in items]
                writer.sync()  # the data is durable before any line names it
            finally:
                writer.close()
            lines = b"".join(encode_line(entry) for entry in entries)
            with open(self.root / INDEX, "ab") as f:
                f.write(lines)
                f.flush()
                os.fsync(f.fileno())
            self._index.update((entry["id"], entry) for entry in entries)
            self._index_bytes += len(lines)
            self._tail = (writer.shard, writer.end)
        return len(items)

    # --- reading ------------------------------------------------------------------------------------------------

    def read(self, episode_id: str, start: int = 0, stop: int | None = None, *,
             keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Frames ``[start, stop)`` of an episode: a fresh array per key (video frames: only the overlapping
        chunks are decoded).

        Args:
            episode_id, start, stop: the episode and its frame range (default: all of it).
            keys: the arrays to read (default: all of :data:`~mstudio.data._files.ARRAYS`); reading only
                ``("flags",)`` touches a few bytes per frame, never the frames.

        Raises ``ValueError`` (``FileNotFoundError`` for a missing shard) naming the shard file and the episode if
        its data does not match the index or its checksum.
        """
        entry = self._entry(episode_id)
        start, stop = window_bounds(episode_id, entry["length"], start, stop)
        out = {}
        for key in select_keys(keys, self._spec):
            dtype, shape = self._spec[key]
            if key == "frames" and self.codec is not None:
                out[key] = self._read_frames(entry, start, stop)
                continue
            offset, nbytes, crc = entry["arrays"][key]
            data = self._block(entry, key, _BIT[key], offset, nbytes, crc)
            out[key] = np.array(data.view(dtype).reshape(entry["length"], *shape)[start:stop])
        return out

    def _read_frames(self, entry: dict, start: int, stop: int) -> np.ndarray:
        """Decoded frames ``[start, stop)`` of a video entry: uint8 ``(stop - start, H, W, 3)``."""
        starts = chunk_starts(entry)
        first = int(np.searchsorted(starts, start, side="right")) - 1
        last = int(np.searchsorted(starts, stop, side="left"))
        decoded = [np.empty((0, *self.image_size, 3), np.uint8)]
        for i in range(first, max(first, last)):
            offset, nbytes, crc, n = entry["chunks"][i]
            data = self._block(entry, f"chunk {i}", len(ARRAYS) + i, offset, nbytes, crc)
            where = f"{self.root / 'shards' / shard_name(entry['shard'])}: episode {entry['id']!r} chunk {i}"
            decoded.append(decode_chunk(data.tobytes(), n, self.image_size, where=where))
        frames = np.concatenate(decoded)
        return frames[start - starts[first]: stop - starts[first]]

    def _block(self, entry: dict, name: str, bit: int, offset: int, nbytes: int, crc: int) -> np.ndarray:
        """The bytes of one block (uint8 view of the shard's map), its CRC-32 checked on first read."""
        if os.getpid() != self._pid:  # a forked worker maps (and checks) the shards itself
            self._maps, self._checked, self._pid = {}, {}, os.getpid()
        shard = entry["shard"]
        mapped = self._maps.get(shard)
        try:
            if mapped is None or len(mapped) < offset + nbytes:  # not mapped yet, or grown since
                mapped = self._maps[shard] = map_shard(self.root, shard, offset + nbytes)
            data = mapped[offset:offset + nbytes]
            checked = self._checked.get(entry["id"], 0)
            if self.checksums and not checked >> bit & 1:
                _sharded_verify.check_crc(data, crc)
                self._checked[entry["id"]] = checked | 1 << bit
        except (OSError, ValueError) as err:
            path = self.root / "shards" / shard_name(shard)
            raise type(err)(f"{path}: episode {entry['id']!r} {name} at bytes [{offset}, {offset + nbytes}): "
                            f"{err}") from None
        return data

    # --- checking -----------------------------------------------------------------------------------------------

    def verify(self, repair: bool = False, *, progress: bool = False) -> list[str]:
        """Problems a crash or damage left, one line each (empty: the store is sound).

        Holds the writer lock and re-reads the whole index. Checks every block of every episode (in its shard,
        inside the file, not overlapping another, matching its CRC-32) and reports what a crash leaves: a torn
        last index line, bytes past a shard's committed end, shard files no index line names, temporary files.

        Args:
            repair: remove what a crash leaves (each such line then ends with what was done). Committed data,
                damaged or not, is reported and never touched.
            progress: show a tqdm progress bar over the bytes checked.

        Returns:
            One line per problem, naming the file relative to the store root.
        """
        with _writer_lock(self.root):
            self._index, self._index_bytes, self._tail = {}, 0, (0, 0)
            torn = self._refresh()
            return _sharded_verify.verify(self.root, self._index, self._index_bytes, torn, repair, progress)
