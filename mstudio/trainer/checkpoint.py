"""Exact-resume checkpoints of the train state, and policy export, in safetensors: loading runs no code.

A checkpoint is a directory, published by one atomic rename once everything in it is on disk::

    <run_dir>/checkpoints/
        step_<N>/                            one per saved step, N not zero-padded (``step_12``)
            state.safetensors                every tensor leaf of the state, keyed by its path
            meta.json                        format, version, step, mstudio version, leaves, the sha256 of
                                             state.safetensors, caller's meta
        .tmp-step_<N>-<pid>-<hex>/           a write in progress, a checkpoint being deleted, or the debris
                                             of a writer that crashed (removed by the next save)

A leaf's path joins its optree entries with ``/``: dict keys, NamedTuple field names and sequence indices,
e.g. ``"params/net.img_process.cnn.weight"`` or ``"opt_state/1/mu/net.fc.bias"``. ``meta.json``'s
``"leaves"`` lists every leaf in flatten order as ``{path, dtype, shape}``, or ``{path, none: true}`` for a
``None`` leaf, so a checkpoint can be inspected without torch.

Nothing is pickled: a checkpoint or policy file from a stranger is JSON and raw tensor bytes. Both carry a
sha256 that loading verifies: a checkpoint's ``meta.json`` records that of ``state.safetensors`` (the whole
file), a policy export records that of its tensors in its own metadata (see
:func:`mstudio.models.vpt.weights.tensor_digest`). sha256 hashes about 1.4 GB/s on a 2-core x86 VM with SHA-NI,
against ~0.4 GB/s for writing and fsyncing the file (a 432 MB state: 0.33 s of a 1.67 s save), and unlike a CRC
it also tells a state file swapped in from another checkpoint.
"""

from __future__ import annotations

__all__ = [
    "atomic_path",
    "export_policy",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "read_checkpoint_meta",
    "read_policy_config",
    "save_checkpoint",
]

import contextlib
import glob
import hashlib
import json
import os
import re
import secrets
import shutil
from numbers import Integral
from pathlib import Path
from typing import Any, Iterator

import optree
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from mstudio import __version__
from mstudio.models.vpt.weights import DIGEST_KEY, MSTUDIO_FORMAT, tensor_digest

_FORMAT = "mstudio-checkpoint"
_VERSION = 2  # 2: meta.json records the sha256 of state.safetensors
_READABLE = (1, 2)  # version 1 (no digest) still loads, unverified: a user's existing runs must resume
_STATE = "state.safetensors"
_META = "meta.json"
_DIGEST = "state_sha256"
# Only the names save_checkpoint writes: `step_007` or `step_5.bak` (a user's copy) are never taken for a step.
_STEP_DIR = re.compile(r"step_(0|[1-9]\d*)")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TMP_DIR = re.compile(r"\.tmp-step_\d+-(\d+)-[0-9a-f]+")
_TMP_FILE = re.compile(r"\.tmp-(\d+)-[0-9a-f]+")  # after `.<name>` in atomic_path's temporary files
_MAX_LISTED = 20

# Names of the `.tmp-*` dirs this process is using right now. A dir carrying our own pid but not listed here
# is debris from an earlier process that had the same pid (containers often run the trainer as pid 1).
_IN_FLIGHT: set[str] = set()


def save_checkpoint(
    run_dir: str | os.PathLike[str], step: int, tree: Any, meta: dict[str, Any], *, keep: int | None = 3
) -> Path:
    """Atomically writes ``tree`` as ``<run_dir>/checkpoints/step_<step>/`` (layout in the module docstring).

    The files are written into a ``.tmp-step_<step>-<pid>-<hex>`` dir, each fsynced, and the dir is renamed to
    ``step_<step>`` only then, so a crash at any point leaves every earlier checkpoint intact and no partial
    ``step_*`` dir. An existing ``step_<step>`` is replaced: renamed aside, the new one renamed in, the old one
    deleted (a crash between those two renames loses that step, leaving the earlier ones).

    Afterwards, stale ``.tmp-*`` dirs are deleted. A ``.tmp-*`` dir is stale when the pid in its name is not
    a running process, or is this process but not one of its writes in flight; a concurrent writer's dir is
    never touched. This assumes the writers share a host (in distributed training only rank 0 saves), and a
    single writer per step.

    Args:
        run_dir: the run's directory; ``checkpoints/`` is created in it when missing.
        step: the number of updates done, an int ``>= 0``.
        tree: an optree pytree whose leaves are tensors (any device, dtype and strides) or ``None``.
        meta: the caller's JSON-serializable data (e.g. data-loader position, config), stored under ``"meta"``.
        keep: how many ``step_*`` checkpoints to keep, the newest by step; ``None`` keeps all. The checkpoint
            just written is never pruned, even when ``keep`` newer-numbered ones exist. ``step`` and ``keep`` may
            be any integers (``numpy.int64`` too), never bools.

    Returns:
        The ``step_<step>`` directory.

    Raises:
        ValueError: ``step`` or ``keep`` is out of range, or two leaf paths coincide once joined.
        TypeError: a leaf is neither a tensor nor ``None``, or ``meta`` is not JSON-serializable.
    """
    step = _integer("step", step, minimum=0)
    keep = None if keep is None else _integer("keep", keep, minimum=1, also="or None (keep all)")
    keys, leaves, _ = _flatten(tree, what="tree")
    tensors = {key: _owned_cpu_copy(leaf) for key, leaf in zip(keys, leaves) if leaf is not None}
    header = {
        "format": _FORMAT,
        "version": _VERSION,
        "step": step,
        "mstudio_version": __version__,
        "leaves": [_describe_leaf(key, leaf) for key, leaf in zip(keys, leaves)],
        "meta": meta,
    }
    _json_bytes(header, "meta")  # before anything touches the disk: unserializable meta leaves no debris
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    with _scratch_dir(root, final.name) as tmp:
        tmp.mkdir()
        save_file(tensors, tmp / _STATE)
        _fsync(tmp / _STATE)
        # Hashed as read back from the file, so the digest covers the bytes that were written.
        header[_DIGEST] = _file_sha256(tmp / _STATE)
        _write_durably(tmp / _META, _json_bytes(header, "meta"))
        _fsync(tmp)
        _publish(tmp, final)
    _remove_stale_tmp_dirs(root)
    if keep is not None:
        for old in list_checkpoints(run_dir)[:-keep]:
            if old != final:
                _delete_checkpoint(old)
    return final


def load_checkpoint(path: str | os.PathLike[str], template: Any) -> tuple[Any, dict[str, Any]]:
    """Reads a ``step_<N>`` directory written by :func:`save_checkpoint` into ``template``'s structure.

    Args:
        path: the ``step_<N>`` directory (e.g. :func:`latest_checkpoint`'s answer).
        template: a tree of the same structure as the saved one, e.g. a freshly built state of the same run;
            each stored tensor must match its template leaf's dtype and shape, and goes to its device.

    Returns:
        ``(tree, meta)``: the stored tree, with exactly ``template``'s structure, and the caller's ``meta``.

    Raises:
        FileNotFoundError: ``path``, its ``meta.json`` or its ``state.safetensors`` is missing.
        ValueError: a file is corrupt, truncated or not a checkpoint (its sha256 differs from the one
            ``meta.json`` records; a pickle is refused, never unpickled), the directory is named for another
            step, or the checkpoint does not match ``template`` (the message names the paths, expected and found).
    """
    path = Path(path)
    header = _read_header(path)
    stored = {entry["path"]: entry for entry in header["leaves"]}
    keys, wanted, treespec = _flatten(template, what="template")
    _check_same_paths(path, expected=keys, found=list(stored))
    state_file = path / _STATE
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file} is missing: {path} is not a complete checkpoint")
    found = _file_sha256(state_file) if _DIGEST in header else None  # version 1 recorded none
    if found != header.get(_DIGEST):
        raise ValueError(
            f"{state_file} is corrupt: its sha256 is expected to be {header[_DIGEST]} (recorded in {_META}) but "
            f"found {found}; it changed after it was written. Restore it, or delete {path} to fall back to an "
            "earlier checkpoint"
        )
    try:
        tensors = load_file(state_file)
    except SafetensorError as error:
        raise ValueError(f"{state_file} is not a valid safetensors file (truncated or corrupt?): {error}") from error
    leaves = [_restore(key, want, stored[key], tensors, state_file) for key, want in zip(keys, wanted)]
    return optree.tree_unflatten(treespec, leaves), header["meta"]


def read_checkpoint_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The caller's ``meta`` stored in a ``step_<N>`` directory (e.g. the run's config), without its tensors.

    Raises:
        FileNotFoundError: ``path`` or its ``meta.json`` is missing.
        ValueError: ``meta.json`` is corrupt or not an mstudio checkpoint's.
    """
    return _read_header(Path(path))["meta"]


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """The complete ``step_<N>`` directories of a run (both files present), sorted by ``N`` ascending.

    ``.tmp-*`` dirs, ``step_*`` dirs lacking ``meta.json`` or ``state.safetensors`` (a crash never leaves one:
    a checkpoint appears by one rename) and names :func:`save_checkpoint` does not write (``step_007``) are
    left out.
    """
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.fullmatch(child.name)
        if match and (child / _META).is_file() and (child / _STATE).is_file():
            found.append((int(match[1]), child))
    return [child for _, child in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The complete ``step_<N>`` directory with the largest ``N``, or ``None`` when the run has none."""
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def export_policy(
    path: str | os.PathLike[str], state_dict: dict[str, Tensor], config: dict[str, Any] | None = None
) -> Path:
    """Atomically writes a policy's ``state_dict`` as a plain safetensors file (tmp file, fsync, ``os.replace``).

    The file's safetensors metadata is ``{"format": "mstudio-policy", "tensors_sha256": <digest>}`` (the digest
    of :func:`mstudio.models.vpt.weights.tensor_digest`, verified when the file is read), plus ``"config":
    json.dumps(config)`` when ``config`` is given (MineStudio's hub ``config.json`` content, e.g.
    ``{"policy_kwargs": {...}, "temperature": 1.0}``), which :func:`read_policy_config` reads back.

    Args:
        path: the file to write, normally ``<run_dir>/policy.safetensors``; its directory is created.
        state_dict: ``module.state_dict()``, name -> tensor (any device; tied tensors are stored separately).
        config: JSON-serializable settings needed to rebuild the policy, or ``None``.

    Returns:
        ``path``.

    Raises:
        TypeError: a value of ``state_dict`` is not a tensor, or ``config`` is not JSON-serializable.
    """
    path = Path(path)
    for name, tensor in state_dict.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"state_dict[{name!r}] is a {type(tensor).__name__}; a policy export holds tensors only")
    tensors = {name: _owned_cpu_copy(tensor) for name, tensor in state_dict.items()}
    metadata = {"format": MSTUDIO_FORMAT, DIGEST_KEY: tensor_digest(tensors)}
    if config is not None:
        metadata["config"] = _json_bytes(config, "config", indent=None).decode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A fresh temporary sibling of ``path`` for the block to write; when the block succeeds it is fsynced and
    renamed over ``path``, so ``path`` holds the old content or the new, never part of it (whatever kills the
    process). The temporary files of dead writers of ``path`` (``.<name>.tmp-<pid>-<hex>``) are deleted first.
    """
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        match = _TMP_FILE.fullmatch(stale.name.removeprefix(f".{path.name}"))
        # This pid's own leftovers are an earlier process's too (pids are reused), as in _remove_stale_tmp_dirs.
        if match is not None and (int(match[1]) == os.getpid() or not _pid_alive(int(match[1]))):
            stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync(path.parent)


def read_policy_config(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``config`` that :func:`export_policy` stored in a policy file's metadata, or ``None`` if it has none.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a valid safetensors file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no policy file at {path}")
    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
    except SafetensorError as error:
        raise ValueError(f"{path} is not a valid safetensors file (truncated or corrupt?): {error}") from error
    if "config" not in metadata:
        return None
    try:
        return json.loads(metadata["config"])
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: its safetensors metadata 'config' is not valid JSON: {error}") from None


def _integer(name: str, value: Any, *, minimum: int, also: str = "") -> int:
    """``value`` as an ``int``; ``ValueError`` unless it is an integer (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{' ' + also if also else ''}, got {value!r}")
    return int(value)


def _json_bytes(value: Any, what: str, indent: int | None = 1) -> bytes:
    try:
        return json.dumps(value, indent=indent).encode()
    except (TypeError, ValueError) as error:  # ValueError: a container that holds itself
        raise TypeError(f"{what} must be JSON-serializable (dicts, lists, str, numbers, bools, None): {error}") from None


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _flatten(tree: Any, *, what: str) -> tuple[list[str], list[Tensor | None], optree.PyTreeSpec]:
    """``(paths, leaves, treespec)`` of a tree of tensors and ``None``s; other leaves raise ``TypeError``."""
    accessors, leaves, treespec = optree.tree_flatten_with_accessor(tree, none_is_leaf=True)
    keys = ["/".join(_entry_name(entry) for entry in accessor) for accessor in accessors]
    for key, leaf in zip(keys, leaves):
        if leaf is not None and not isinstance(leaf, Tensor):
            raise TypeError(f"{what} leaf {key!r} is a {type(leaf).__name__}; leaves must be tensors or None")
    if len(set(keys)) != len(keys):
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        raise ValueError(f"{what} paths collide once joined with '/': {repeated[:_MAX_LISTED]}; rename those keys")
    return keys, leaves, treespec


def _entry_name(entry: optree.PyTreeEntry) -> str:
    # Field names for NamedTuples and dataclasses (stable when fields are added), keys and indices otherwise.
    name = getattr(entry, "field", None) or getattr(entry, "name", None)
    return str(entry.entry if name is None else name)


def _owned_cpu_copy(tensor: Tensor) -> Tensor:
    # safetensors refuses non-contiguous tensors and tensors sharing storage (tied weights, views).
    return tensor.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)


def _describe_leaf(key: str, leaf: Tensor | None) -> dict[str, Any]:
    if leaf is None:
        return {"path": key, "none": True}
    return {"path": key, "dtype": _dtype_name(leaf.dtype), "shape": list(leaf.shape)}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _read_header(path: Path) -> dict[str, Any]:
    """``meta.json`` of a checkpoint dir, after checking its format and version."""
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    file = path / _META
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: {path} is not a complete checkpoint")
    try:
        header = json.loads(file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{file} is not valid JSON (truncated or corrupt?): {error}") from error
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise ValueError(f"{file}: format is {found!r}, expected {_FORMAT!r}; is {path} an mstudio checkpoint?")
    if header.get("version") not in _READABLE:
        raise ValueError(
            f"{file}: checkpoint version {header.get('version')!r} (written by mstudio "
            f"{header.get('mstudio_version')}), this mstudio {__version__} reads versions {list(_READABLE)}"
        )
    _check_header_fields(file, header)
    step = _STEP_DIR.fullmatch(path.name)
    if step is not None and int(step[1]) != header["step"]:
        raise ValueError(f"{path} is named for step {step[1]} but its {_META} holds step {header['step']}; "
                         f"rename it step_{header['step']}")
    return header


def _check_header_fields(file: Path, header: dict[str, Any]) -> None:
    """``ValueError`` naming the first entry of ``meta.json`` that is missing or of the wrong type."""
    leaves, step, digest = header.get("leaves"), header.get("step"), header.get(_DIGEST)
    leaves_ok = isinstance(leaves, list) and all(isinstance(e, dict) and isinstance(e.get("path"), str) for e in leaves)
    checks = [
        ("leaves", leaves_ok, "a list of {path, ...}"),
        ("step", isinstance(step, int) and not isinstance(step, bool) and step >= 0, "an int >= 0"),
        (_DIGEST, (header["version"] == 1 and _DIGEST not in header)
         or (isinstance(digest, str) and _SHA256.fullmatch(digest) is not None), "a sha256 (64 hex digits)"),
        ("meta", isinstance(header.get("meta"), dict), "an object"),
    ]
    for key, ok, expected in checks:
        if not ok:
            found = f"{type(header[key]).__name__} {header[key]!r:.80}" if key in header else "nothing"
            raise ValueError(f"{file}: {key!r} must be {expected}, found {found}; the file is corrupt")


def _check_same_paths(path: Path, *, expected: list[str], found: list[str]) -> None:
    expected_set, found_set = set(expected), set(found)
    missing = [key for key in expected if key not in found_set]
    unexpected = [key for key in found if key not in expected_set]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match the template: {len(missing)} leaves missing from the "
            f"checkpoint {missing[:_MAX_LISTED]}, {len(unexpected)} unexpected leaves in it "
            f"{unexpected[:_MAX_LISTED]}; build the template with the same policy, optimizer and batch size"
        )


def _restore(key: str, want: Tensor | None, entry: dict[str, Any], tensors: dict[str, Tensor], file: Path) -> Any:
    """The stored leaf at ``key``, checked against the template leaf ``want`` and moved to its device."""
    if want is None or entry.get("none"):
        if want is None and entry.get("none"):
            return None
        expected, found = ("None", "a tensor") if want is None else ("a tensor", "None")
        raise ValueError(f"checkpoint leaf {key!r}: expected {expected} (as in the template), found {found}")
    if key not in tensors:
        raise ValueError(f"{file} lacks the tensor {key!r} that meta.json lists; the checkpoint is corrupt")
    found = tensors[key]
    if found.dtype != want.dtype or found.shape != want.shape:
        raise ValueError(
            f"checkpoint leaf {key!r}: expected {_dtype_name(want.dtype)} {tuple(want.shape)} (as in the "
            f"template), found {_dtype_name(found.dtype)} {tuple(found.shape)}"
        )
    return found.to(want.device)


@contextlib.contextmanager
def _scratch_dir(root: Path, name: str) -> Iterator[Path]:
    """A fresh ``.tmp-<name>-<pid>-<hex>`` path in ``root`` (not created), deleted when the block exits."""
    path = root / f".tmp-{name}-{os.getpid()}-{secrets.token_hex(4)}"
    _IN_FLIGHT.add(path.name)
    try:
        yield path
    finally:
        # After a successful publish the path is gone; after a failure it holds a partial write.
        shutil.rmtree(path, ignore_errors=True)
        _IN_FLIGHT.discard(path.name)


def _publish(tmp: Path, final: Path) -> None:
    """Renames the complete ``tmp`` dir to ``final``, replacing an existing ``final``."""
    if final.exists():
        with _scratch_dir(final.parent, final.name) as old:
            # A directory cannot be renamed over a non-empty one: move the old one aside, and delete it only
            # once the new one is durably in place.
            os.rename(final, old)
            os.rename(tmp, final)
            _fsync(final.parent)
    else:
        os.rename(tmp, final)
        _fsync(final.parent)


def _delete_checkpoint(path: Path) -> None:
    # Renamed first so that a crash midway through rmtree leaves a stale `.tmp-*` dir, not a half `step_*`.
    with _scratch_dir(path.parent, path.name) as doomed:
        os.rename(path, doomed)


def _remove_stale_tmp_dirs(root: Path) -> None:
    """Deletes the ``.tmp-*`` dirs of writers that died (rule in :func:`save_checkpoint`'s docstring)."""
    for child in root.iterdir():
        match = _TMP_DIR.fullmatch(child.name)
        if match is None or child.name in _IN_FLIGHT:
            continue
        pid = int(match[1])
        if pid == os.getpid() or not _pid_alive(pid):
            shutil.rmtree(child, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    return True


def _write_durably(file: Path, data: bytes) -> None:
    with open(file, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync(path: Path) -> None:
    """fsyncs a file, or a directory (which makes the creations and renames inside it durable)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
