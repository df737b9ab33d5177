"""EpisodeStore: episodes on disk as ``.npy`` memmaps, read as zero-decode windows.

Layout (``vpt_data_spec.md`` 5.1, with one directory per episode so that an append is a rename)::

    root/manifest.json            format version, frame size, action-space constants, user metadata
    root/index.json               the visible episodes, in append order: id -> {"dir", "length", "info"}
    root/episodes/<n>/<key>.npy   one file per array, one row per frame

An append writes the episode's arrays into a temporary directory, renames it into place, then replaces
``index.json`` atomically (write + fsync + ``os.replace``). An episode is visible only once the index names
it, so a crash at any point leaves no partial episode; a directory left by a crash is overwritten later.
Reads memory-map each array on first use, once per process (DataLoader workers open their own after fork).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mstudio.actions import N_BUTTONS, N_CAMERA
from mstudio.actions import camera as camera_quantizer

__all__ = ["FORMAT", "VERSION", "EpisodeStore", "array_spec"]

FORMAT = "mstudio-episode-store"
VERSION = 1


def array_spec(image_size: tuple[int, int]) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Per-frame dtype and trailing shape of every array an episode holds."""
    height, width = image_size
    return {
        "frames": (np.dtype(np.uint8), (height, width, 3)),  # RGB
        "buttons": (np.dtype(np.int16), ()),  # joint buttons index, [0, 8641)
        "camera": (np.dtype(np.uint8), ()),  # joint camera index, [0, 121)
        "env_buttons": (np.dtype(np.uint32), ()),  # bitmask of the env buttons (mstudio.actions order)
        "env_camera": (np.dtype(np.float32), (2,)),  # degrees (pitch, yaw) before quantization
        "flags": (np.dtype(np.uint8), ()),  # bitfield of per-frame flags
    }


def _write_json(path: Path, value: Any) -> None:
    """Write ``value`` to ``path`` atomically: a reader sees the old file or the new one, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class EpisodeStore:
    """A directory of whole episodes. Make one with :meth:`create`, open one with :meth:`open`."""

    def __init__(self, root: Path, manifest: dict, index: dict):
        self.root, self.manifest, self._index = root, manifest, index
        self.image_size = tuple(manifest["image_size"])
        self._spec = array_spec(self.image_size)
        self._maps: dict[tuple[str, str], np.ndarray] = {}
        self._pid = os.getpid()

    @classmethod
    def create(cls, path: str | os.PathLike, image_size: tuple[int, int], meta: Mapping[str, Any] | None = None):
        """A new, empty store at ``path`` (which must not exist or be an empty directory)."""
        root = Path(path)
        if root.exists() and any(root.iterdir()):
            raise FileExistsError(f"cannot create an episode store in {root}: the directory is not empty")
        height, width = image_size
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "image_size": [int(height), int(width)],
            "fps": 20,
            "n_buttons": N_BUTTONS,
            "n_camera": N_CAMERA,
            "camera_quantizer": {"scheme": "mu_law", "maxval": camera_quantizer.MAXVAL,
                                 "binsize": camera_quantizer.BINSIZE, "mu": camera_quantizer.MU},
            "meta": dict(meta or {}),
        }
        (root / "episodes").mkdir(parents=True, exist_ok=True)
        _write_json(root / "index.json", {})
        _write_json(root / "manifest.json", manifest)  # last: a directory without it is not a store
        return cls(root, manifest, {})

    @classmethod
    def open(cls, path: str | os.PathLike):
        """The store at ``path``."""
        root = Path(path)
        try:
            manifest = json.loads((root / "manifest.json").read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{root} is not an episode store: no manifest.json (make one with EpisodeStore.create)") from None
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise ValueError(f"{root / 'manifest.json'} is format {manifest.get('format')!r} version "
                             f"{manifest.get('version')!r}; this mstudio reads {FORMAT!r} version {VERSION}")
        return cls(root, manifest, json.loads((root / "index.json").read_text()))

    @property
    def episode_ids(self) -> list[str]:
        """Episode ids in append order."""
        return list(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, episode_id: str) -> bool:
        return episode_id in self._index

    def length(self, episode_id: str) -> int:
        """Number of frames of an episode."""
        return self._entry(episode_id)["length"]

    def info(self, episode_id: str) -> dict:
        """The ``info`` dict the episode was appended with."""
        return self._entry(episode_id)["info"]

    def _entry(self, episode_id: str) -> dict:
        if episode_id not in self._index:
            raise KeyError(f"no episode {episode_id!r} in the store at {self.root} ({len(self)} episodes)")
        return self._index[episode_id]

    def _check(self, arrays: Mapping[str, np.ndarray]) -> int:
        if set(arrays) != set(self._spec):
            raise ValueError(f"an episode needs exactly the arrays {sorted(self._spec)}; got {sorted(arrays)}")
        lengths = {key: len(value) for key, value in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"all arrays of an episode need the same number of frames; got {lengths}")
        for key, (dtype, shape) in self._spec.items():
            value = arrays[key]
            if not isinstance(value, np.ndarray) or value.dtype != dtype or value.shape[1:] != shape:
                got = f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
                wanted = "(N" + "".join(f", {d}" for d in shape) + ")"
                raise ValueError(f"arrays[{key!r}] must be {dtype} {wanted}; got {got}")
        n = lengths["frames"]
        if n == 0:
            raise ValueError("an episode needs at least one frame")
        if arrays["buttons"].min() < 0 or arrays["buttons"].max() >= N_BUTTONS or arrays["camera"].max() >= N_CAMERA:
            raise ValueError(f"arrays['buttons'] must lie in [0, {N_BUTTONS}) and arrays['camera'] in [0, {N_CAMERA})")
        return n

    def append(self, episode_id: str, arrays: Mapping[str, np.ndarray], info: Mapping[str, Any] | None = None) -> None:
        """Add a whole episode, atomically (see the module docstring).

        Args:
            episode_id: a new, unique id.
            arrays: ``frames`` uint8 ``(N, H, W, 3)``, ``buttons`` int16 ``(N,)``, ``camera`` uint8 ``(N,)``,
                ``env_buttons`` uint32 ``(N,)``, ``env_camera`` float32 ``(N, 2)``, ``flags`` uint8 ``(N,)``.
            info: JSON-serialisable facts about the episode (sources, segment boundaries, ...).
        """
        if not isinstance(episode_id, str) or not episode_id:
            raise ValueError(f"episode_id must be a non-empty str, got {episode_id!r}")
        if episode_id in self._index:
            raise ValueError(f"episode {episode_id!r} is already in the store at {self.root}")
        n = self._check(arrays)
        info = json.loads(json.dumps(dict(info or {})))  # fail now on what JSON cannot hold
        name = str(max((int(e["dir"]) for e in self._index.values()), default=-1) + 1)
        final = self.root / "episodes" / name
        tmp = self.root / "episodes" / f".{name}.tmp"
        for leftover in (tmp, final):  # from a crash: never indexed, so never visible
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir()
        for key, value in arrays.items():
            np.save(tmp / f"{key}.npy", np.ascontiguousarray(value))
        os.rename(tmp, final)
        index = {**self._index, episode_id: {"dir": name, "length": n, "info": info}}
        _write_json(self.root / "index.json", index)
        self._index = index

    def read(self, episode_id: str, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """Frames ``[start, stop)`` of an episode: a copy of each array's slice (no decoding)."""
        entry = self._entry(episode_id)
        stop = entry["length"] if stop is None else stop
        if not 0 <= start <= stop <= entry["length"]:
            raise IndexError(f"frames [{start}, {stop}) are outside episode {episode_id!r} of {entry['length']} frames")
        return {key: np.array(self._map(entry["dir"], key)[start:stop]) for key in self._spec}

    def _map(self, directory: str, key: str) -> np.ndarray:
        if os.getpid() != self._pid:  # a forked worker maps the files itself
            self._maps, self._pid = {}, os.getpid()
        mapped = self._maps.get((directory, key))
        if mapped is None:
            mapped = np.load(self.root / "episodes" / directory / f"{key}.npy", mmap_mode="r")
            self._maps[(directory, key)] = mapped
        return mapped
