"""EpisodeStore: episodes on disk as ``.npy`` memmaps, read as zero-decode windows.

Layout (``vpt_data_spec.md`` 5.1, with one directory per episode so that an append is a rename)::

    root/manifest.json            format version, frame size, action-space constants, user metadata
    root/index.json               the visible episodes, in append order: id -> {"dir", "length", "info"}
    root/episodes/<n>/<key>.npy   one file per array, one row per frame
    root/.lock                    the writers' lock (``fcntl.flock``, exclusive)

Writers (:meth:`EpisodeStore.create`, :meth:`EpisodeStore.append`, :meth:`EpisodeStore.verify`) hold an
exclusive lock on ``root/.lock``, so several processes may append to one store; inside the lock an append
re-reads ``index.json`` from disk, so a store opened earlier never overwrites newer entries. Readers take
no lock.

An append writes the episode's arrays into a temporary directory, renames it into place, then replaces
``index.json`` atomically (write + fsync + ``os.replace``). An episode is visible only once the index names
it, so a crash at any point leaves no partial episode; a directory left by a crash is reported (and with
``repair=True`` removed) by :meth:`EpisodeStore.verify`. Reads memory-map each array on first use, once per
process (DataLoader workers open their own after fork), and check it against the index and the spec.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from mstudio.actions import N_BUTTONS, N_CAMERA
from mstudio.actions import camera as camera_quantizer

__all__ = ["FORMAT", "VERSION", "EpisodeStore", "array_spec"]

FORMAT = "mstudio-episode-store"
VERSION = 1

_DIR_NAME = re.compile(r"[0-9]+")  # what append names an episode directory: no '..', '/', absolute paths
_TMP_FILES = (".index.json.tmp", ".manifest.json.tmp")  # what an interrupted _write_json leaves
_NPY_MAGIC = b"\x93NUMPY"


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


def _read_json(path: Path) -> Any:
    """The JSON value in ``path``; ``ValueError`` naming the file when it is not valid JSON."""
    data = path.read_bytes()
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: expected UTF-8 text; found byte {data[err.start]:#04x} "
                         f"at offset {err.start}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno} "
                         f"(the file is {len(data)} bytes)") from None


@contextlib.contextmanager
def _writer_lock(root: Path) -> Iterator[None]:
    """Hold the store's exclusive writer lock (``root/.lock``); released on exit, or by the OS on a crash."""
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _check_index(index: Any, path: Path) -> dict:
    """``index`` (the content of ``path``) if every entry is valid; else ``ValueError`` naming the entry."""
    if not isinstance(index, dict):
        raise ValueError(f"{path} must hold a JSON object (episode id -> entry); found {type(index).__name__}")
    owners: dict[str, str] = {}
    for episode_id, entry in index.items():
        where = f"{path}: episode {episode_id!r}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be an object with 'dir', 'length' and 'info'; found {entry!r}")
        directory, length, info = entry.get("dir"), entry.get("length"), entry.get("info")
        if not isinstance(directory, str) or not _DIR_NAME.fullmatch(directory):
            raise ValueError(f"{where} field 'dir' must be a plain directory name inside episodes/ "
                             f"(decimal digits, like '12'); found {directory!r}")
        if directory in owners:
            raise ValueError(f"{where} field 'dir' must name a directory of its own; found {directory!r}, "
                             f"which is also the dir of episode {owners[directory]!r}")
        owners[directory] = episode_id
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"{where} field 'length' must be a positive int; found {length!r}")
        if not isinstance(info, dict):
            raise ValueError(f"{where} field 'info' must be a JSON object; found {info!r}")
    return index


def _load_index(root: Path) -> dict:
    """The validated content of ``root/index.json``."""
    return _check_index(_read_json(root / "index.json"), root / "index.json")


def _load_array(path: Path) -> np.ndarray:
    """Memory-map the ``.npy`` file ``path`` (never unpickling); ``ValueError`` naming it if it is damaged."""
    with open(path, "rb") as f:
        magic = f.read(len(_NPY_MAGIC))
    if magic != _NPY_MAGIC:
        raise ValueError(f"{path} is not a .npy file: expected it to start with {_NPY_MAGIC!r}; found {magic!r}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path} is a damaged .npy file: {err}") from None


def _mismatch(array: np.ndarray, spec: tuple[np.dtype, tuple[int, ...]], length: int) -> str | None:
    """What is wrong with ``array`` for an episode of ``length`` frames, or ``None``."""
    dtype, shape = spec
    expected = (length, *shape)
    if array.dtype != dtype or array.shape != expected:
        return f"expected {dtype} {expected}; found {array.dtype} {array.shape}"
    return None


def _create_blockers(root: Path) -> list[str]:
    """What in ``root`` an unfinished :meth:`EpisodeStore.create` does not leave (empty: ``root`` is reusable)."""
    if not root.exists():
        return []
    if not root.is_dir():
        return [f"{root} (a file)"]
    blockers = []
    for child in sorted(root.iterdir()):
        name = child.name
        if name == ".lock" and child.is_file() or name in _TMP_FILES and child.is_file():
            continue
        if name == "episodes" and child.is_dir() and not child.is_symlink() and not any(child.iterdir()):
            continue
        if name == "index.json" and child.is_file():
            with contextlib.suppress(ValueError, OSError):
                if _read_json(child) == {}:
                    continue
        blockers.append(name + ("/" if child.is_dir() else ""))
    return blockers


def _refuse_unless_reusable(root: Path) -> None:
    """``FileExistsError`` naming what is in ``root`` unless a store may be created there."""
    blockers = _create_blockers(root)
    if "manifest.json" in blockers:
        raise FileExistsError(f"cannot create an episode store in {root}: it is already one (it holds "
                              f"manifest.json); open it with EpisodeStore.open")
    if blockers:
        raise FileExistsError(f"cannot create an episode store in {root}: the directory is not empty; expected "
                              f"nothing or what an unfinished create leaves (an empty episodes/, index.json "
                              f"of {{}}, .lock, temp files); found {', '.join(blockers)}")


def _new_manifest(image_size: tuple[int, int], meta: Mapping[str, Any] | None) -> dict:
    """The manifest of a new store of ``image_size`` frames."""
    height, width = image_size
    return {
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


def _check_manifest(manifest: Any, path: Path) -> dict:
    """``manifest`` (the content of ``path``) if this mstudio reads it; else ``ValueError`` naming the problem."""
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} must hold a JSON object; found {type(manifest).__name__}")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{path} is format {manifest.get('format')!r} version {manifest.get('version')!r}; "
                         f"this mstudio reads {FORMAT!r} version {VERSION}")
    size = manifest.get("image_size")
    if (not isinstance(size, list) or len(size) != 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in size)):
        raise ValueError(f"{path} field 'image_size' must be [height, width] of positive ints; found {size!r}")
    return manifest


def _leftovers(root: Path, index: Mapping[str, dict]) -> list[tuple[Path, str]]:
    """Files and directories a crash can leave that no index entry owns, with what each is."""
    found = [(root / name, "temporary file left by an interrupted write") for name in _TMP_FILES
             if (root / name).exists()]
    owned = {entry["dir"] for entry in index.values()}
    episodes = root / "episodes"
    for child in sorted(episodes.iterdir()) if episodes.is_dir() else []:
        if child.name in owned:
            continue
        if child.name.endswith(".tmp"):
            found.append((child, "temporary directory left by an interrupted append"))
        elif child.is_dir():
            found.append((child, "episode directory that index.json does not name (left by an interrupted append)"))
        else:
            found.append((child, "file that index.json does not name"))
    return found


def _remove(path: Path) -> None:
    """Delete ``path`` (a directory tree, or a file or link, which is never followed)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


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
        """A new, empty store at ``path``.

        ``path`` must not exist, be an empty directory, or hold only what an interrupted ``create`` leaves
        (an empty ``episodes/``, ``index.json`` of ``{}``, ``.lock``, temp files; no ``manifest.json``).
        Anything else raises ``FileExistsError`` naming what is there.
        """
        root = Path(path)
        _refuse_unless_reusable(root)  # before the lock file: never leave one in a directory we refuse
        manifest = _new_manifest(image_size, meta)
        root.mkdir(parents=True, exist_ok=True)
        with _writer_lock(root):
            _refuse_unless_reusable(root)  # another process may have created a store meanwhile
            (root / "episodes").mkdir(exist_ok=True)
            _write_json(root / "index.json", {})
            _write_json(root / "manifest.json", manifest)  # last: a directory without it is not a store
        return cls(root, manifest, {})

    @classmethod
    def open(cls, path: str | os.PathLike):
        """The store at ``path``; ``ValueError`` naming the file if its manifest or index is invalid."""
        root = Path(path)
        if not (root / "manifest.json").is_file():
            raise FileNotFoundError(f"{root} is not an episode store: no manifest.json (make one with EpisodeStore.create)")
        manifest = _check_manifest(_read_json(root / "manifest.json"), root / "manifest.json")
        return cls(root, manifest, _load_index(root))

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
        """Add a whole episode, atomically and safely beside other writing processes (see the module docstring).

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
        with _writer_lock(self.root):
            self._index = _load_index(self.root)  # other processes may have appended since we read it
            if episode_id in self._index:
                raise ValueError(f"episode {episode_id!r} is already in the store at {self.root}")
            name = str(max((int(e["dir"]) for e in self._index.values()), default=-1) + 1)
            self._write_episode(name, arrays)
            index = {**self._index, episode_id: {"dir": name, "length": n, "info": info}}
            _write_json(self.root / "index.json", index)
            self._index = index

    def _write_episode(self, name: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Write ``arrays`` to ``episodes/<name>`` through a temporary directory (call with the lock held)."""
        final = self.root / "episodes" / name
        tmp = self.root / "episodes" / f".{name}.tmp"
        for leftover in (tmp, final):  # from a crash: never indexed, so never visible
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir()
        for key, value in arrays.items():
            np.save(tmp / f"{key}.npy", np.ascontiguousarray(value), allow_pickle=False)
        os.rename(tmp, final)

    def read(self, episode_id: str, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """Frames ``[start, stop)`` of an episode: a copy of each array's slice (no decoding).

        Raises ``ValueError`` naming the file if a file does not match the index or the spec.
        """
        entry = self._entry(episode_id)
        stop = entry["length"] if stop is None else stop
        if not 0 <= start <= stop <= entry["length"]:
            raise IndexError(f"frames [{start}, {stop}) are outside episode {episode_id!r} of {entry['length']} frames")
        return {key: np.array(self._map(episode_id, key)[start:stop]) for key in self._spec}

    def _map(self, episode_id: str, key: str) -> np.ndarray:
        """The memory map of one array of an episode, checked against the index and the spec on first use."""
        if os.getpid() != self._pid:  # a forked worker maps the files itself
            self._maps, self._pid = {}, os.getpid()
        entry = self._index[episode_id]
        mapped = self._maps.get((entry["dir"], key))
        if mapped is None:
            path = self.root / "episodes" / entry["dir"] / f"{key}.npy"
            mapped = _load_array(path)
            problem = _mismatch(mapped, self._spec[key], entry["length"])
            if problem is not None:
                raise ValueError(f"{path} does not match {self.root / 'index.json'} for episode {episode_id!r}: "
                                 f"{problem}")
            self._maps[(entry["dir"], key)] = mapped
        return mapped

    def verify(self, repair: bool = False) -> list[str]:
        """Problems a crash can leave, one line each (empty: the store is sound).

        Reports temporary files and directories, episode directories ``index.json`` does not name, and index
        entries whose files are missing, damaged or of the wrong dtype or length. Holds the writer lock and
        re-reads ``index.json``.

        Args:
            repair: remove the leftovers (never anything an index entry owns); their lines end with
                ``(removed)``. Index entries with missing or wrong files are reported, never dropped.

        Returns:
            One line per problem found, naming the file or directory relative to the store root.
        """
        with _writer_lock(self.root):
            self._index = _load_index(self.root)
            problems = [p for e in self._index for p in self._entry_problems(e)]
            for path, what in _leftovers(self.root, self._index):
                if repair:
                    _remove(path)
                problems.append(f"{path.relative_to(self.root)}: {what}" + (" (removed)" if repair else ""))
        return problems

    def _entry_problems(self, episode_id: str) -> list[str]:
        """What is wrong with the files of an indexed episode, one line each."""
        entry = self._index[episode_id]
        directory = self.root / "episodes" / entry["dir"]
        if not directory.is_dir():
            return [f"{directory.relative_to(self.root)}: missing; index.json lists episode {episode_id!r} "
                    f"({entry['length']} frames) there"]
        problems = []
        for key, spec in self._spec.items():
            path = directory / f"{key}.npy"
            if not path.is_file():
                problems.append(f"{path.relative_to(self.root)}: missing; episode {episode_id!r} needs it")
                continue
            try:
                problem = _mismatch(_load_array(path), spec, entry["length"])
            except ValueError as err:
                problems.append(f"{path.relative_to(self.root)}: episode {episode_id!r}: {err}")
                continue
            if problem is not None:
                problems.append(f"{path.relative_to(self.root)}: episode {episode_id!r}: {problem}")
        return problems
