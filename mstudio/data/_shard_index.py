"""The index log of a :class:`~mstudio.data.ShardedStore`: ``index.jsonl``, one checksummed line per episode.

A line is ``<crc32 of the JSON text, 8 hex digits> <JSON object>\\n``; the object is one episode's entry::

    {"id": str, "length": N, "info": {...}, "shard": k,
     "arrays": {key: [offset, nbytes, crc32], ...},          # every array stored raw (frames too, in raw mode)
     "chunks": [[offset, nbytes, crc32, n_frames], ...]}     # video mode only: the frames' encoded chunks

Offsets are byte offsets into ``shards/<k>.bin``. A line is committed once its newline is written: bytes after the
last newline are a torn line (an append killed while writing it), which readers ignore and the next writer
truncates. A complete line that fails its checksum or its checks is damage: an error naming the line.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from mstudio.data._files import ARRAYS

__all__ = ["chunk_starts", "encode_line", "entry_problem", "entry_ranges", "parse_index"]


_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)  # made once: appends write thousands of lines


def encode_line(entry: dict) -> bytes:
    """The index line of ``entry``: its CRC-32, a space, its compact JSON and a newline."""
    text = _ENCODER.encode(entry).encode()
    return b"%08x %s\n" % (zlib.crc32(text), text)


def _is_int(value: Any, least: int = 0) -> bool:
    return type(value) is int and value >= least  # JSON gives plain ints; bools are not


def _block_problem(name: str, block: Any, size: int | None) -> str | None:
    """What is wrong with ``[offset, nbytes, crc32(, n_frames)]`` (``size``: the bytes it must span), or None."""
    want = 3 if size is not None else 4
    if not isinstance(block, list) or len(block) != want or not all(_is_int(v) for v in block):
        form = "[offset, nbytes, crc32]" if size is not None else "[offset, nbytes, crc32, n_frames]"
        return f"{name} must be {form} of non-negative ints; found {block!r}"
    if block[2] >= 2**32:
        return f"{name} crc32 must be < 2**32; found {block[2]}"
    if size is not None and block[1] != size:
        return f"{name} must span {size} bytes for the episode's length; found nbytes {block[1]}"
    if size is None and (block[1] < 1 or block[3] < 1):
        return f"{name} must hold at least one byte and one frame; found {block!r}"
    return None


def entry_problem(entry: Any, sizes: dict[str, int], video: bool) -> str | None:
    """What is wrong with one parsed entry, or ``None``.

    Args:
        entry: the JSON value of a line.
        sizes: bytes per frame of each array stored raw (``frames`` only in raw mode).
        video: whether the store keeps frames as encoded chunks.
    """
    if not isinstance(entry, dict):
        return f"must be a JSON object; found {type(entry).__name__}"
    want = {"id", "length", "info", "shard", "arrays"} | ({"chunks"} if video else set())
    if set(entry) != want:
        return f"must have exactly the fields {sorted(want)}; found {sorted(entry)}"
    episode_id, length = entry["id"], entry["length"]
    if not isinstance(episode_id, str) or not episode_id:
        return f"field 'id' must be a non-empty string; found {episode_id!r}"
    if not _is_int(length, 1):
        return f"field 'length' must be a positive int; found {length!r}"
    if not isinstance(entry["info"], dict):
        return f"field 'info' must be a JSON object; found {entry['info']!r}"
    if not _is_int(entry["shard"]):
        return f"field 'shard' must be a non-negative int; found {entry['shard']!r}"
    arrays = entry["arrays"]
    if not isinstance(arrays, dict) or set(arrays) != set(sizes):
        found = sorted(arrays) if isinstance(arrays, dict) else arrays
        return f"field 'arrays' must map exactly {sorted(sizes)} to blocks; found {found!r}"
    for key, per_frame in sizes.items():
        problem = _block_problem(f"arrays[{key!r}]", arrays[key], per_frame * length)
        if problem:
            return problem
    if video:
        chunks = entry["chunks"]
        if not isinstance(chunks, list) or not chunks:
            return f"field 'chunks' must be a non-empty list of blocks; found {chunks!r}"
        for i, chunk in enumerate(chunks):
            problem = _block_problem(f"chunks[{i}]", chunk, None)
            if problem:
                return problem
        if sum(chunk[3] for chunk in chunks) != length:
            return f"field 'chunks' must hold {length} frames in all; found {sum(c[3] for c in chunks)}"
    return None


def parse_index(data: bytes, path: Path, first_line: int, sizes: dict[str, int], video: bool,
                known: dict[str, dict]) -> tuple[dict[str, dict], int]:
    """The entries of the committed lines of ``data`` (index bytes from a line start) and the bytes they span.

    Args:
        data: bytes of ``path`` from the start of line ``first_line`` (1-based) to the end of the file.
        path: the index file (named in errors).
        first_line: the number of the first line in ``data``.
        sizes, video: as for :func:`entry_problem`.
        known: the entries read before (an id there again is an error).

    Returns:
        ``(entries by id in line order, bytes of data that complete lines span)``; bytes after them are a torn line.

    Raises:
        ValueError: a complete line is damaged (checksum, JSON, fields) or repeats an id; names the line.
    """
    end = data.rfind(b"\n") + 1
    parsed = []
    decode = json.JSONDecoder().decode
    for number, line in enumerate(data[:end].split(b"\n")[:-1], start=first_line):
        text = line[9:]
        if line[8:9] != b" " or line[:8] != b"%08x" % zlib.crc32(text):
            raise ValueError(f"{path} line {number}: checksum mismatch: expected '<crc32 as 8 hex digits> <json>' "
                             f"whose crc32 matches the JSON text; found {line[:60]!r} (the line was changed after it "
                             f"was written)")
        try:
            parsed.append(decode(text.decode("utf-8")))
        except ValueError as err:
            raise ValueError(f"{path} line {number}: not valid JSON: {err}") from None
    if not _all_valid(parsed, sizes, video):  # then find the first bad line, to name it
        for number, entry in enumerate(parsed, start=first_line):
            problem = entry_problem(entry, sizes, video)
            if problem:
                raise ValueError(f"{path} line {number}: {problem}")
    entries = {entry["id"]: entry for entry in parsed}
    if len(entries) < len(parsed) or not known.keys().isdisjoint(entries):
        seen = set(known)
        for number, entry in enumerate(parsed, start=first_line):
            if entry["id"] in seen:
                raise ValueError(f"{path} line {number}: episode {entry['id']!r} is listed twice (each id must "
                                 f"appear once)")
            seen.add(entry["id"])
    return entries, end


def _all_valid(entries: list, sizes: dict[str, int], video: bool) -> bool:
    """Whether every entry passes :func:`entry_problem`, checked column by column (30x faster on 100k lines)."""
    if not entries:
        return True
    want = {"id", "length", "info", "shard", "arrays"} | ({"chunks"} if video else set())
    keys = list(sizes)
    if not all(type(e) is dict and e.keys() == want for e in entries):
        return False
    lengths, shards = [e["length"] for e in entries], [e["shard"] for e in entries]
    arrays = [e["arrays"] for e in entries]
    if not (all(type(e["id"]) is str and e["id"] for e in entries) and all(type(e["info"]) is dict for e in entries)
            and all(type(v) is int for v in lengths) and all(type(v) is int for v in shards)
            and all(type(a) is dict and a.keys() == sizes.keys() for a in arrays)):
        return False
    blocks = [a[k] for a in arrays for k in keys]
    if not all(type(b) is list and len(b) == 3 and type(b[0]) is type(b[1]) is type(b[2]) is int for b in blocks):
        return False
    try:
        table = np.array(blocks, dtype=np.int64).reshape(len(entries), len(keys), 3)
        length = np.array(lengths, dtype=np.int64)
        shard = np.array(shards, dtype=np.int64)
    except OverflowError:
        return False
    per_frame = np.array([sizes[k] for k in keys], dtype=np.int64)
    if not ((length >= 1).all() and (shard >= 0).all() and (table >= 0).all() and (table[..., 2] < 2**32).all()
            and (table[..., 1] == length[:, None] * per_frame).all()):
        return False
    # chunk lists vary in length: checked entry by entry (a video store has few, long episodes)
    return not video or all(entry_problem(e, sizes, True) is None for e in entries)


def entry_ranges(entry: dict) -> list[tuple[str, int, int, int]]:
    """``(name, offset, nbytes, crc32)`` of every block of an entry, arrays in :data:`ARRAYS` order, then chunks."""
    ranges = [(key, *entry["arrays"][key]) for key in ARRAYS if key in entry["arrays"]]
    ranges += [(f"chunk {i}", *chunk[:3]) for i, chunk in enumerate(entry.get("chunks", ()))]
    return ranges


def chunk_starts(entry: dict) -> np.ndarray:
    """First frame of each chunk of a video entry, and the length last: int64 ``(n_chunks + 1,)``."""
    return np.concatenate([[0], np.cumsum([chunk[3] for chunk in entry["chunks"]])]).astype(np.int64)
