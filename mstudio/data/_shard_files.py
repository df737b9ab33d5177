"""The shard files of a :class:`~mstudio.data.ShardedStore`: episodes turned into blocks, written at a shard's
tail, and shards memory-mapped for reading.

A shard is ``shards/<k>.bin`` (``k`` zero-padded to 6 digits): the blocks of whole episodes back to back, each
block starting at a multiple of :data:`ALIGN` bytes so that every array view is aligned for its dtype.
"""

from __future__ import annotations

import mmap
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mstudio.data._files import ARRAYS
from mstudio.data.video_codec import VideoCodec, encode_chunk

__all__ = ["ALIGN", "INDEX", "SHARD_NAME", "TMP_FILES", "Payload", "ShardWriter", "map_shard", "payload", "shard_name"]

ALIGN = 64  # bytes: a cache line, and a multiple of every array's item size
INDEX = "index.jsonl"  # the store's index log (mstudio.data._shard_index)
TMP_FILES = (".manifest.json.tmp",)  # what an interrupted write of the manifest leaves
SHARD_NAME = re.compile(r"([0-9]{6,})\.bin")


def shard_name(shard: int) -> str:
    """The file name of shard ``shard`` inside ``shards/``."""
    return f"{shard:06d}.bin"


@dataclass
class Payload:
    """An episode ready to write: its blocks' bytes and CRC-32s, computed before the writer lock is taken."""

    episode_id: str
    length: int
    info: dict
    arrays: dict[str, tuple[np.ndarray, int]]  # key -> (uint8 bytes, crc32): every array stored raw
    chunks: list[tuple[bytes, int, int]]  # (bytes, crc32, n_frames) of each video chunk; empty in raw mode
    nbytes: int  # bytes the episode takes in a shard, alignment included


def _aligned(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


def payload(episode_id: str, arrays: dict[str, np.ndarray], length: int, info: dict,
            codec: VideoCodec | None, copy: bool = False) -> Payload:
    """The blocks of a checked episode: each array's bytes, or with ``codec`` the frames as encoded chunks.

    Without ``copy`` the blocks may be views of ``arrays``: write them before the caller changes those.
    """
    raw = {}
    for key in ARRAYS:
        if codec is None or key != "frames":
            data = (np.array if copy else np.ascontiguousarray)(arrays[key]).reshape(-1).view(np.uint8)
            raw[key] = (data, zlib.crc32(data))
    chunks = []
    if codec is not None:
        for first in range(0, length, codec.chunk_frames):
            data = encode_chunk(arrays["frames"][first:first + codec.chunk_frames], codec)
            chunks.append((data, zlib.crc32(data), min(codec.chunk_frames, length - first)))
    nbytes = sum(_aligned(len(data)) for data, _ in raw.values()) + sum(_aligned(len(c[0])) for c in chunks)
    return Payload(episode_id, length, info, raw, chunks, nbytes)


def _pwritev_all(fd: int, buffers: list, offset: int) -> None:
    """Write ``buffers`` back to back at ``offset`` (``os.pwritev`` may write less than asked)."""
    written = os.pwritev(fd, buffers, offset)
    total = sum(len(b) for b in buffers)
    if written == total:
        return
    rest = memoryview(b"".join(bytes(b) for b in buffers))[written:]  # rare: finish what the call left
    offset += written
    while len(rest):
        done = os.pwrite(fd, rest, offset)
        rest, offset = rest[done:], offset + done


_ZEROS = bytes(ALIGN)
_MAX_BUFFERS = 512  # buffers gathered into one pwritev call (Linux takes at most 1024)
_MAX_PENDING = 64 << 20  # bytes gathered before they are written (an episode's blocks, one call for a small one)


class ShardWriter:
    """Writes episodes past the committed end of the store's last shard, rolling to a new shard when full.

    Use with the writer lock held. Bytes past the committed end are what an interrupted append left: the shard
    is truncated to its committed end before the first write. :meth:`sync` makes everything written durable;
    call it before the index lines that name the new blocks are written.
    """

    def __init__(self, shards: Path, shard: int, end: int, target: int):
        self.shards, self.shard, self.end, self.target = shards, shard, end, target
        self._fd: int | None = None
        self._new_file = False
        self._pending: list = []  # buffers to write back to back from byte _pending_at (one pwritev)
        self._pending_at, self._pending_bytes = 0, 0

    def _open(self) -> None:
        path = self.shards / shard_name(self.shard)
        exists = path.exists()
        if not exists and self.end:
            raise FileNotFoundError(f"{path}: missing, but index.jsonl lists {self.end} bytes of episodes in it; "
                                    f"run verify (the store cannot take appends until the shard is restored)")
        if exists and path.stat().st_size < self.end:
            raise ValueError(f"{path}: {path.stat().st_size} bytes, but index.jsonl lists episodes up to byte "
                             f"{self.end}: the shard was truncated; run verify")
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self._new_file = self._new_file or not exists
        os.ftruncate(self._fd, self.end)  # drop what an interrupted append left past the committed end

    def write(self, item: Payload) -> dict:
        """Write ``item``'s blocks; returns its index entry (``id, length, info, shard, arrays[, chunks]``)."""
        if self.end and self.end + item.nbytes > self.target:  # full: the next shard (an episode never splits)
            self.sync()
            self.close()
            self.shard, self.end = self.shard + 1, 0
        if self._fd is None:
            self._open()
        blocks = {}
        for key, (data, crc) in item.arrays.items():
            blocks[key] = [self._put(data), len(data), crc]
        entry = {"id": item.episode_id, "length": item.length, "info": item.info, "shard": self.shard,
                 "arrays": blocks}
        if item.chunks:
            entry["chunks"] = [[self._put(data), len(data), crc, n] for data, crc, n in item.chunks]
        self._flush()  # now: the caller may reuse its arrays for the next episode
        return entry

    def _put(self, data: np.ndarray | bytes) -> int:
        """Queue ``data`` at the next aligned offset (written by :meth:`_flush`); returns that offset."""
        offset = _aligned(self.end)  # the end is where the last block stops; blocks start aligned
        if not self._pending:
            self._pending_at = self.end
        if offset > self.end:
            self._pending.append(_ZEROS[:offset - self.end])
        self._pending.append(data)
        self._pending_bytes += len(data)
        self.end = offset + len(data)
        if len(self._pending) >= _MAX_BUFFERS or self._pending_bytes >= _MAX_PENDING:
            self._flush()
        return offset

    def _flush(self) -> None:
        if self._pending:
            _pwritev_all(self._fd, self._pending, self._pending_at)
            self._pending, self._pending_bytes = [], 0

    def sync(self) -> None:
        """fsync the shard written to (and ``shards/`` when it got a new file)."""
        if self._fd is None:
            return
        self._flush()
        os.fsync(self._fd)
        if self._new_file:
            fd = os.open(self.shards, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self._new_file = False

    def close(self) -> None:
        """Close the shard (after :meth:`sync` when the data is to be committed)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def map_shard(root: Path, shard: int, end: int) -> np.ndarray:
    """The bytes of ``shards/<shard>.bin`` as a read-only uint8 memory map, after checking the file lies in the
    store and holds at least ``end`` bytes.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: it leads outside the store or is shorter than ``end`` (the message omits the path: the caller
            names the file).
    """
    path = root / "shards" / shard_name(shard)
    inside = root.resolve() / "shards" / shard_name(shard)
    if path.resolve() != inside:
        raise ValueError(f"outside the store: it resolves to {path.resolve()}; shards must be plain files (no links)")
    if not path.is_file():
        raise FileNotFoundError("is a directory, not a shard file" if path.is_dir() else "missing")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < end:
            raise ValueError(f"{size} bytes, but index.jsonl lists data up to byte {end} (the shard was truncated, "
                             f"or the index points past its end)")
        if size == 0:  # mmap refuses an empty file; no block can lie in one
            return np.empty(0, dtype=np.uint8)
        # one map per shard per process, whatever the number of episodes in it (vm.max_map_count)
        return np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)
