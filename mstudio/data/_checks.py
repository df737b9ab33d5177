"""Validation at the edge of :mod:`mstudio.data`: arguments, index entries and episodes, checked before any work
or any write, each error naming the argument, file or key, what was expected and what came.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mstudio.actions import N_BUTTONS, N_CAMERA
from mstudio.data._files import ARRAYS

__all__ = ["DIR_NAME", "as_path", "check_arrays", "check_index", "entry_problem", "image_size_of", "integer",
           "json_object"]

DIR_NAME = re.compile(r"[0-9]+")  # what append names an episode directory: no '..', '/', absolute paths


def integer(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as a Python int (numpy integers too, bools not); ``TypeError``/``ValueError`` naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        wanted = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise TypeError(f"{name} must be {wanted}; got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value!r}")
    return int(value)


def json_object(value: Any, name: str) -> dict:
    """``value`` as the plain dict JSON gives back; ``TypeError``/``ValueError`` naming ``name`` if it is not one."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping (a JSON object); got {type(value).__name__}")
    try:
        return json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be JSON-serialisable (str keys; str, finite number, bool, None, list or dict "
                         f"values): {_non_finite(value, name) or err}") from None


def _non_finite(value: Any, where: str) -> str | None:
    """``"<where>[key]... is nan"`` for the first NaN or infinite float inside ``value`` (JSON cannot hold one)."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where} is {value}"
    items = value.items() if isinstance(value, Mapping) else enumerate(value) if isinstance(value, (list, tuple)) \
        else ()
    for key, item in items:
        found = _non_finite(item, f"{where}[{key!r}]")
        if found:
            return found
    return None


def as_path(path: Any) -> Path:
    """``path`` as a Path; ``TypeError`` naming the argument if it is not a path."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__} {path!r}")
    return Path(path)


def image_size_of(image_size: Any) -> tuple[int, int]:
    """``image_size`` as ``(height, width)`` Python ints; ``ValueError`` saying what is wrong otherwise."""
    ok = (isinstance(image_size, Sequence) and not isinstance(image_size, str) and len(image_size) == 2
          and all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in image_size))
    if not ok:
        raise ValueError(f"image_size must be (height, width) of positive integers; got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def entry_problem(entry: dict) -> str | None:
    """What is wrong with an index entry or an ``episode.json`` record (``dir`` aside), or ``None``."""
    length, info, sums = entry.get("length"), entry.get("info"), entry.get("crc32")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        return f"field 'length' must be a positive int; found {length!r}"
    if not isinstance(info, dict):
        return f"field 'info' must be a JSON object; found {info!r}"
    if "crc32" in entry:  # absent in stores written before checksums
        valid = isinstance(sums, dict) and sorted(sums) == sorted(ARRAYS) and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32 for v in sums.values())
        if not valid:
            return f"field 'crc32' must map each of {list(ARRAYS)} to an int in [0, 2**32); found {sums!r}"
    return None


def check_index(index: Any, path: Path) -> dict:
    """``index`` (the content of ``path``) if every entry is valid; else ``ValueError`` naming the entry."""
    if not isinstance(index, dict):
        raise ValueError(f"{path} must hold a JSON object (episode id -> entry); found {type(index).__name__}")
    owners: dict[str, str] = {}
    for episode_id, entry in index.items():
        where = f"{path}: episode {episode_id!r}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be an object with 'dir', 'length', 'info' and 'crc32'; found {entry!r}")
        directory = entry.get("dir")
        if not isinstance(directory, str) or not DIR_NAME.fullmatch(directory):
            raise ValueError(f"{where} field 'dir' must be a plain directory name inside episodes/ "
                             f"(decimal digits, like '12'); found {directory!r}")
        if directory in owners:
            raise ValueError(f"{where} field 'dir' must name a directory of its own; found {directory!r}, "
                             f"which is also the dir of episode {owners[directory]!r}")
        problem = entry_problem(entry)
        if problem is not None:
            raise ValueError(f"{where} {problem}")
        owners[directory] = episode_id
    return index


def check_arrays(arrays: Any, spec: Mapping[str, tuple[np.dtype, tuple[int, ...]]]) -> int:
    """The frame count of ``arrays`` (an episode to append); ``TypeError``/``ValueError`` naming what is wrong."""
    if not isinstance(arrays, Mapping):
        raise TypeError(f"arrays must be a mapping of array name -> numpy array; got {type(arrays).__name__}")
    if set(arrays) != set(spec):
        raise ValueError(f"an episode needs exactly the arrays {sorted(spec)}; got {sorted(arrays)}")
    for key, (dtype, shape) in spec.items():
        value = arrays[key]
        if not isinstance(value, np.ndarray) or value.dtype != dtype or value.shape[1:] != shape:
            got = f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
            wanted = "(N" + "".join(f", {d}" for d in shape) + ")"
            raise ValueError(f"arrays[{key!r}] must be {dtype} {wanted}; got {got}")
    lengths = {key: len(value) for key, value in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"all arrays of an episode need the same number of frames; got {lengths}")
    if lengths["frames"] == 0:
        raise ValueError("an episode needs at least one frame")
    for key, high in (("buttons", N_BUTTONS), ("camera", N_CAMERA)):
        bad = np.flatnonzero((arrays[key] < 0) | (arrays[key] >= high))
        if len(bad):
            raise ValueError(f"arrays[{key!r}] must lie in [0, {high}); found {arrays[key][bad[0]]} at frame {bad[0]}")
    bad = np.flatnonzero(~np.isfinite(arrays["env_camera"]).all(axis=1))
    if len(bad):
        raise ValueError(f"arrays['env_camera'] must be finite; found {arrays['env_camera'][bad[0]].tolist()} at "
                         f"frame {bad[0]}")
    return lengths["frames"]
