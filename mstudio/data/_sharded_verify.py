"""``ShardedStore.verify``: every block checked against the index, and what a crash leaves found (and removed).

Call with the writer lock held and the index freshly read; nothing here reads or changes the index lines.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mstudio.data._shard_files import INDEX, SHARD_NAME, TMP_FILES, map_shard, shard_name
from mstudio.data._shard_index import entry_ranges
from mstudio.data.store import _remove

__all__ = ["check_crc", "verify"]

_STEP = 1 << 24  # bytes checksummed per progress-bar update


def check_crc(data: np.ndarray, crc: int) -> None:
    """``ValueError`` unless the bytes ``data`` (uint8, contiguous) have CRC-32 ``crc``."""
    actual = 0
    for start in range(0, len(data), _STEP):
        actual = zlib.crc32(data[start:start + _STEP], actual)
    if actual != crc:
        raise ValueError(f"checksum mismatch: index.jsonl records crc32 {crc:08x}, the data's is {actual:08x} "
                         f"(its bytes changed after it was written)")


def _check_shard(root: Path, shard: int, blocks: list[tuple[int, int, int, str, str]], bar: tqdm) -> list[str]:
    """Problems of the blocks ``(offset, nbytes, crc32, episode id, block name)`` the index puts in one shard."""
    rel = f"shards/{shard_name(shard)}"
    try:
        mapped = map_shard(root, shard, 0)
    except (OSError, ValueError) as err:
        episodes = len({block[3] for block in blocks})
        bar.update(sum(block[1] for block in blocks))
        return [f"{rel}: {err}; index.jsonl lists {episodes} episodes in it"]
    problems = []
    end, owner = 0, ""
    for offset, nbytes, crc, episode_id, name in sorted(blocks):
        where = f"{rel}: episode {episode_id!r} {name} at bytes [{offset}, {offset + nbytes})"
        if offset < end:
            problems.append(f"{where}: overlaps {owner}, which ends at byte {end}")
        if offset + nbytes > len(mapped):
            problems.append(f"{where}: past the end of the file ({len(mapped)} bytes)")
        else:
            try:
                check_crc(mapped[offset:offset + nbytes], crc)
            except ValueError as err:
                problems.append(f"{where}: {err}")
        if offset + nbytes > end:
            end, owner = offset + nbytes, f"episode {episode_id!r} {name}"
        bar.update(nbytes)
    return problems


def _done(repair: bool, action: str) -> str:
    """What a problem line ends with: the repair done, if any."""
    return f" ({action})" if repair else ""


def _leftovers(root: Path, ends: dict[int, int], repair: bool) -> list[str]:
    """What a crash leaves: bytes past committed ends, shard files no line names, stray and temporary files."""
    problems = []
    shards = root / "shards"
    for child in sorted(shards.iterdir()) if shards.is_dir() else []:
        match = SHARD_NAME.fullmatch(child.name)
        plain = child.is_file() and not child.is_symlink()
        if match and int(match[1]) in ends:  # a shard the index names: never removed (a link: reported above)
            size, end = child.stat().st_size, ends[int(match[1])]
            if plain and size > end:
                if repair:
                    os.truncate(child, end)
                problems.append(f"shards/{child.name}: {size - end} bytes past the committed end at byte {end} (left "
                                f"by an interrupted append){_done(repair, 'truncated')}")
            continue
        what = ("shard file that no index.jsonl line names (left by an interrupted append)" if match and plain
                else "file that index.jsonl does not name")
        if repair:
            _remove(child)
        problems.append(f"shards/{child.name}: {what}{_done(repair, 'removed')}")
    for name in TMP_FILES:
        if (root / name).exists():
            if repair:
                (root / name).unlink()
            problems.append(f"{name}: temporary file left by an interrupted write{_done(repair, 'removed')}")
    return problems


def verify(root: Path, index: dict[str, dict], index_bytes: int, torn: int, repair: bool, progress: bool) -> list[str]:
    """The problems of the store at ``root`` whose committed entries are ``index`` (see ``ShardedStore.verify``).

    Args:
        root: the store.
        index: every committed entry, by id.
        index_bytes: bytes of ``index.jsonl`` the committed lines span.
        torn: bytes of a torn line after them.
        repair: remove what a crash leaves.
        progress: show a progress bar over the bytes checked.
    """
    problems = []
    if torn:
        if repair:
            os.truncate(root / INDEX, index_bytes)
        problems.append(f"{INDEX}: a torn last line of {torn} bytes (an append killed while writing it)"
                        + _done(repair, "truncated"))
    by_shard: dict[int, list[tuple[int, int, int, str, str]]] = {}
    for episode_id, entry in index.items():
        blocks = by_shard.setdefault(entry["shard"], [])
        blocks += [(offset, nbytes, crc, episode_id, name) for name, offset, nbytes, crc in entry_ranges(entry)]
    total = sum(block[1] for blocks in by_shard.values() for block in blocks)
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=not progress) as bar:
        for shard, blocks in sorted(by_shard.items()):
            problems += _check_shard(root, shard, blocks, bar)
    ends = {shard: max(offset + nbytes for offset, nbytes, *_ in blocks) for shard, blocks in by_shard.items()}
    return problems + _leftovers(root, ends, repair)
