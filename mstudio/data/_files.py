"""The array files of an episode store: written with their CRC-32, memory-mapped only after checks.

CRC-32 (zlib's) is the checksum: 2.9-4.6 GB/s on one core of the 2-core development VM, against 0.6-0.8 GB/s
for BLAKE2b and 1.3-1.5 GB/s for SHA-256, and it detects every burst of damage up to 32 bits and any other with
probability 1 - 2**-32. It guards against damage (a bad disk, a truncated copy, an edited file), not against an
attacker, who could rewrite ``index.json`` as easily.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ARRAYS", "open_array", "save_array"]

#: The arrays of an episode, one ``<key>.npy`` file each.
ARRAYS = ("frames", "buttons", "camera", "env_buttons", "env_camera", "flags")
_NPY_MAGIC = b"\x93NUMPY"
_CHUNK = 1 << 22  # bytes hashed per read: large enough for crc32's full speed, small enough for the cache


class _Crc32Writer:
    """A binary file that keeps the CRC-32 of every byte written through it (``np.save`` writes in chunks)."""

    def __init__(self, file: Any):
        self.file, self.crc = file, 0

    def write(self, data: bytes) -> int:
        self.crc = zlib.crc32(data, self.crc)
        return self.file.write(data)


def save_array(path: Path, array: np.ndarray) -> int:
    """Write ``array`` as a ``.npy`` file at ``path``; returns the file's CRC-32.

    Not fsynced (that costs 4-7 ms per file here, several times what a small episode takes to write): a power
    loss can leave the newest files short or empty, which their checksums then reveal.
    """
    with open(path, "wb") as f:
        writer = _Crc32Writer(f)
        np.save(writer, np.ascontiguousarray(array), allow_pickle=False)
    return writer.crc


def _crc32(path: Path) -> int:
    """The CRC-32 of the file at ``path``, read in chunks."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def open_array(root: Path, directory: str, key: str, spec: tuple[np.dtype, tuple[int, ...]], length: int,
               crc: int | None) -> np.ndarray:
    """Memory-map ``episodes/<directory>/<key>.npy`` after checking it lies in the store, is a ``.npy`` of the
    ``spec`` dtype and shape for ``length`` frames, and (with ``crc``) has that checksum; never unpickles.

    Raises:
        FileNotFoundError: the file is missing or not a regular file.
        ValueError: anything else wrong with it, said without the path (the caller names the file).
    """
    path = root / "episodes" / directory / f"{key}.npy"
    inside = root.resolve() / "episodes" / directory / f"{key}.npy"
    if path.resolve() != inside:  # an index entry never leads outside the store, nor may a link in it
        raise ValueError(f"outside the store: it resolves to {path.resolve()}; an episode's files must lie in its "
                         f"own directory (no links)")
    if not path.is_file():
        raise FileNotFoundError("is a directory, not a .npy file" if path.is_dir() else "missing")
    with open(path, "rb") as f:
        magic = f.read(len(_NPY_MAGIC))
    if magic != _NPY_MAGIC:
        raise ValueError(f"not a .npy file: expected it to start with {_NPY_MAGIC!r}; found {magic!r}")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"a damaged .npy file: {err}") from None
    dtype, shape = spec
    if array.dtype != dtype or array.shape != (length, *shape):
        raise ValueError(f"expected {dtype} {(length, *shape)} for the {length} frames index.json lists; found "
                         f"{array.dtype} {array.shape}")
    actual = None if crc is None else _crc32(path)
    if actual != crc:
        raise ValueError(f"checksum mismatch: index.json records crc32 {crc:08x}, the file's is {actual:08x} "
                         f"(its bytes changed after it was written)")
    return array
