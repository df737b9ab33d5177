"""EpisodeStore: episodes on disk as ``.npy`` memmaps, read as zero-decode windows.

Layout (``vpt_data_spec.md`` 5.1, with one directory per episode so that an append is a rename)::

    root/manifest.json                  format version, frame size, action-space constants, user metadata
    root/index.json                     the visible episodes, in append order: id -> {"dir", "length", "info", "crc32"}
    root/episodes/<n>/<key>.npy         one file per array, one row per frame
    root/episodes/<n>/episode.json      the episode's own record: {"id", "length", "info", "crc32"}
    root/.lock                          the writers' lock (``fcntl.flock``, exclusive)

``crc32`` holds the CRC-32 of every array file as written. Reads check a file against it the first time a
process maps that file, and :meth:`EpisodeStore.verify` checks them all. Stores written before checksums
existed have none: they open and read as before, and verify notes it.

Writers (:meth:`EpisodeStore.create`, :meth:`EpisodeStore.append`, :meth:`EpisodeStore.verify`) hold an
exclusive lock on ``root/.lock``, so several processes may append to one store; inside the lock an append
re-reads ``index.json`` from disk, so a store opened earlier never overwrites newer entries. Readers take
no lock.

An append writes the episode's array files and its ``episode.json`` into a temporary directory, renames it to
a directory name never used before, then replaces ``index.json`` atomically (write + fsync + ``os.replace``).
An episode is visible only once the index names it, so a process killed at any point leaves no partial
episode. (Array files are not fsynced, for speed: after a power loss, checksums reveal any damage to the
newest episodes.) :meth:`EpisodeStore.verify` with ``repair=True`` removes what a crash leaves (temporary
files and directories) and puts back into the index a complete episode directory the index does not name (a
crash between the rename and the index update, or an ``index.json`` restored from an older copy): no
complete, checksummed episode is ever deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from mstudio.actions import N_BUTTONS, N_CAMERA
from mstudio.actions import camera as camera_quantizer
from mstudio.data._base import Store, select_keys, window_bounds
from mstudio.data._checks import DIR_NAME, as_path, check_arrays, check_index, entry_problem, image_size_of, json_object
from mstudio.data._files import ARRAYS, open_array, save_array

__all__ = ["FORMAT", "VERSION", "EpisodeStore", "array_spec"]

FORMAT = "mstudio-episode-store"
VERSION = 1

_TMP_FILES = (".index.json.tmp", ".manifest.json.tmp")  # what an interrupted _write_json leaves
_RECORD = "episode.json"  # an episode directory's own record (id, length, info, checksums)


def array_spec(image_size: tuple[int, int]) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Per-frame dtype and trailing shape of every array an episode holds (keys in :data:`ARRAYS` order)."""
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
        json.dump(value, f, indent=1, allow_nan=False)
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


def _load_index(root: Path) -> dict:
    """The validated content of ``root/index.json``."""
    return check_index(_read_json(root / "index.json"), root / "index.json")


def _create_blockers(root: Path) -> list[str]:
    """What in ``root`` an unfinished :meth:`EpisodeStore.create` does not leave (empty: ``root`` is reusable)."""
    if not root.exists():
        return []
    if not root.is_dir():
        return [f"{root} (a file)"]
    blockers = []
    for child in sorted(root.iterdir()):
        name = child.name
        # not is_dir(): a temp file another process's create replaces meanwhile is gone by now
        if (name == ".lock" or name in _TMP_FILES) and not child.is_dir():
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


def _new_manifest(image_size: tuple[int, int], meta: dict) -> dict:
    """The manifest of a new store of ``image_size`` frames."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "image_size": list(image_size),
        "fps": 20,
        "n_buttons": N_BUTTONS,
        "n_camera": N_CAMERA,
        "camera_quantizer": {"scheme": "mu_law", "maxval": camera_quantizer.MAXVAL,
                             "binsize": camera_quantizer.BINSIZE, "mu": camera_quantizer.MU},
        "meta": meta,
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


def _record(directory: Path) -> tuple[str, dict] | None:
    """``(episode id, entry)`` from an episode directory's ``episode.json``, or ``None`` if it has no valid one."""
    try:
        record = _read_json(directory / _RECORD)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("id"), str) or "crc32" not in record:
        return None
    entry = {"dir": directory.name, "length": record.get("length"), "info": record.get("info"),
             "crc32": record.get("crc32")}
    return (record["id"], entry) if entry_problem(entry) is None else None


def _dir_order(path: Path) -> tuple[int, str]:
    """Sort key of the entries of ``episodes/``: episode directories by number (append order), then the rest."""
    return (int(path.name), "") if DIR_NAME.fullmatch(path.name) else (-1, path.name)


def _remove(path: Path) -> None:
    """Delete ``path`` (a directory tree, or a file or link, which is never followed)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


class EpisodeStore(Store):
    """A directory of whole episodes. Make one with :meth:`create`, open one with :meth:`open`."""

    def __init__(self, root: Path, manifest: dict, index: dict, checksums: bool = True):
        self.root, self.manifest, self._index = root, manifest, index
        self.image_size = tuple(manifest["image_size"])
        self.checksums = checksums
        self._spec = array_spec(self.image_size)
        self._maps: dict[tuple[str, str], np.ndarray] = {}
        self._pid = os.getpid()

    @classmethod
    def create(cls, path: str | os.PathLike, image_size: tuple[int, int], meta: Mapping[str, Any] | None = None):
        """A new, empty store at ``path``.

        ``path`` must not exist, be an empty directory, or hold only what an interrupted ``create`` leaves
        (an empty ``episodes/``, ``index.json`` of ``{}``, ``.lock``, temp files; no ``manifest.json``).
        Anything else raises ``FileExistsError`` naming what is there. ``image_size`` (positive ints) and
        ``meta`` (a JSON object) are checked before anything is written.
        """
        root = as_path(path)
        manifest = _new_manifest(image_size_of(image_size), json_object({} if meta is None else meta, "meta"))
        _refuse_unless_reusable(root)  # before the lock file: never leave one in a directory we refuse
        root.mkdir(parents=True, exist_ok=True)
        with _writer_lock(root):
            _refuse_unless_reusable(root)  # another process may have created a store meanwhile
            (root / "episodes").mkdir(exist_ok=True)
            _write_json(root / "index.json", {})
            _write_json(root / "manifest.json", manifest)  # last: a directory without it is not a store
        return cls(root, manifest, {})

    @classmethod
    def open(cls, path: str | os.PathLike, *, checksums: bool = True):
        """The store at ``path``; ``ValueError`` naming the file if its manifest or index is invalid.

        Args:
            path: the store's directory.
            checksums: check each array file against its recorded CRC-32 the first time this process maps it.
                That reads each file once more: 5-45 % of the loader's frames/s during the first epoch on a 2-core
                VM, nothing after. ``False`` skips the check for speed; :meth:`verify` always does it.
        """
        root = as_path(path)
        if not (root / "manifest.json").is_file():
            raise FileNotFoundError(f"{root} is not an episode store: no manifest.json (make one with EpisodeStore.create)")
        manifest = _check_manifest(_read_json(root / "manifest.json"), root / "manifest.json")
        return cls(root, manifest, _load_index(root), checksums)

    def episodes_without_checksums(self) -> list[str]:
        """Ids of the episodes written before mstudio recorded checksums (their files are checked for shape only)."""
        return [episode_id for episode_id, entry in self._index.items() if "crc32" not in entry]

    def append(self, episode_id: str, arrays: Mapping[str, np.ndarray], info: Mapping[str, Any] | None = None) -> None:
        """Add a whole episode, atomically and safely beside other writing processes (see the module docstring).

        Everything is checked before anything is written.

        Args:
            episode_id: a new, unique id.
            arrays: ``frames`` uint8 ``(N, H, W, 3)``, ``buttons`` int16 ``(N,)`` in ``[0, 8641)``, ``camera``
                uint8 ``(N,)`` in ``[0, 121)``, ``env_buttons`` uint32 ``(N,)``, ``env_camera`` float32 ``(N, 2)``
                finite, ``flags`` uint8 ``(N,)``; ``N >= 1``.
            info: a JSON object of facts about the episode (sources, segment boundaries, ...).
        """
        if not isinstance(episode_id, str) or not episode_id:
            raise ValueError(f"episode_id must be a non-empty str, got {episode_id!r}")
        if episode_id in self._index:
            raise ValueError(f"episode {episode_id!r} is already in the store at {self.root}")
        n = check_arrays(arrays, self._spec)
        info = json_object({} if info is None else info, "info")
        with _writer_lock(self.root):
            self._index = _load_index(self.root)  # other processes may have appended since we read it
            if episode_id in self._index:
                raise ValueError(f"episode {episode_id!r} is already in the store at {self.root}")
            entry = self._write_episode(episode_id, arrays, n, info)
            index = {**self._index, episode_id: entry}
            _write_json(self.root / "index.json", index)
            self._index = index

    def _next_dir(self) -> str:
        """A directory name no episode has used: past every indexed one and every one on disk (call locked)."""
        episodes = self.root / "episodes"
        used = [int(e["dir"]) for e in self._index.values()]
        used += [int(p.name) for p in episodes.iterdir() if DIR_NAME.fullmatch(p.name)] if episodes.is_dir() else []
        return str(max(used, default=-1) + 1)

    def _write_episode(self, episode_id: str, arrays: Mapping[str, np.ndarray], n: int, info: dict) -> dict:
        """Write an episode's directory through a temporary one (call with the lock held); returns its entry."""
        name = self._next_dir()
        tmp = self.root / "episodes" / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # from a crash: never indexed, so never visible
        tmp.mkdir()
        sums = {key: save_array(tmp / f"{key}.npy", arrays[key]) for key in ARRAYS}
        # the directory's rename makes the record atomic: no temp file or fsync of its own
        (tmp / _RECORD).write_text(json.dumps({"id": episode_id, "length": n, "info": info, "crc32": sums}))
        os.rename(tmp, self.root / "episodes" / name)
        return {"dir": name, "length": n, "info": info, "crc32": sums}

    def read(self, episode_id: str, start: int = 0, stop: int | None = None, *,
             keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Frames ``[start, stop)`` of an episode: a copy of each array's slice (no decoding), for every array of
        ``keys`` (default: all; ``("flags",)`` maps and checks only the flags file).

        Raises ``ValueError`` (``FileNotFoundError`` for a missing file) naming the file and the episode if a
        file does not match the index, the spec or its checksum.
        """
        entry = self._entry(episode_id)
        start, stop = window_bounds(episode_id, entry["length"], start, stop)
        return {key: np.array(self._map(episode_id, key)[start:stop]) for key in select_keys(keys, self._spec)}

    def _map(self, episode_id: str, key: str) -> np.ndarray:
        """The memory map of one array of an episode, checked (and its checksum verified) on first use."""
        if os.getpid() != self._pid:  # a forked worker maps (and checks) the files itself
            self._maps, self._pid = {}, os.getpid()
        entry = self._index[episode_id]
        mapped = self._maps.get((entry["dir"], key))
        if mapped is None:
            crc = entry.get("crc32", {}).get(key) if self.checksums else None
            try:
                mapped = open_array(self.root, entry["dir"], key, self._spec[key], entry["length"], crc)
            except (OSError, ValueError) as err:
                path = self.root / "episodes" / entry["dir"] / f"{key}.npy"
                raise type(err)(f"{path}: episode {episode_id!r}: {err}") from None
            self._maps[(entry["dir"], key)] = mapped
        return mapped

    def verify(self, repair: bool = False) -> list[str]:
        """Problems a crash or damage left, one line each (empty: the store is sound).

        Checks every indexed episode's files (present, inside the store, dtype, shape, checksum) and reports
        temporary files and directories and episode directories ``index.json`` does not name. Holds the writer
        lock and re-reads ``index.json``. Episodes without recorded checksums are not problems (see
        :meth:`episodes_without_checksums`).

        Args:
            repair: fix what a crash leaves; each such line ends with what was done. Temporary files and
                directories, and episode directories without a complete, valid record (or holding a copy of an
                indexed episode), are ``(removed)``; a complete episode directory the index does not name is
                ``(added to index.json)``. Indexed episodes with missing or damaged files are reported, never
                touched.

        Returns:
            One line per problem found, naming the file or directory relative to the store root.
        """
        with _writer_lock(self.root):
            self._index = indexed = _load_index(self.root)
            problems = [p for e in self._index for p in self._entry_problems(e, self._index[e])]
            for path, what, adopt in self._leftovers():  # lazy: an orphan sees the ones adopted before it
                if repair and adopt is not None:
                    self._index = {**self._index, adopt[0]: adopt[1]}
                elif repair:
                    _remove(path)
                done = "added to index.json" if adopt is not None else "removed"
                problems.append(f"{path.relative_to(self.root)}: {what}" + (f" ({done})" if repair else ""))
            if self._index is not indexed:
                _write_json(self.root / "index.json", self._index)
        return problems

    def _entry_problems(self, episode_id: str, entry: dict) -> list[str]:
        """What is wrong with the files of one episode (its ``entry``), one line each."""
        directory = self.root / "episodes" / entry["dir"]
        if not directory.is_dir():
            return [f"{directory.relative_to(self.root)}: missing; index.json lists episode {episode_id!r} "
                    f"({entry['length']} frames) there"]
        problems = []
        for key, spec in self._spec.items():
            try:
                open_array(self.root, entry["dir"], key, spec, entry["length"], entry.get("crc32", {}).get(key))
            except (OSError, ValueError) as err:
                problems.append(f"episodes/{entry['dir']}/{key}.npy: episode {episode_id!r}: {err}")
        return problems

    def _leftovers(self) -> Iterator[tuple[Path, str, tuple[str, dict] | None]]:
        """What a crash can leave that no index entry owns: ``(path, what it is, (id, entry) to adopt or None)``."""
        for name in _TMP_FILES:
            if (self.root / name).exists():
                yield self.root / name, "temporary file left by an interrupted write", None
        owned = {entry["dir"] for entry in self._index.values()}
        episodes = self.root / "episodes"
        for child in sorted(episodes.iterdir(), key=_dir_order) if episodes.is_dir() else []:
            if child.name in owned:
                continue
            if DIR_NAME.fullmatch(child.name) and child.is_dir() and not child.is_symlink():
                yield child, *self._orphan(child)
            elif child.name.endswith(".tmp"):
                yield child, "temporary directory left by an interrupted append", None
            else:
                yield child, "file that index.json does not name", None

    def _orphan(self, directory: Path) -> tuple[str, tuple[str, dict] | None]:
        """What an episode directory the index does not name is, and ``(id, entry)`` if it is to be re-indexed."""
        record = _record(directory)
        if record is None:
            return "episode directory that index.json does not name, without a valid episode.json", None
        episode_id, entry = record
        if episode_id in self._index:
            return (f"copy of episode {episode_id!r}, which index.json names in episodes/"
                    f"{self._index[episode_id]['dir']} (an interrupted append, then rerun)"), None
        problems = self._entry_problems(episode_id, entry)
        if problems:
            return f"episode {episode_id!r} that index.json does not name, with damaged files: {problems[0]}", None
        return (f"complete episode {episode_id!r} that index.json does not name (an append interrupted before "
                f"its index update, or an index.json restored from an older copy)"), (episode_id, entry)
