"""Either kind of episode store by name: :func:`open_store` (by its manifest), :func:`create_store`, and
:func:`describe_store` (what ``mstudio store info`` prints).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

from mstudio.data import sharded, store
from mstudio.data._base import Store
from mstudio.data._checks import as_path
from mstudio.data.sharded import ShardedStore
from mstudio.data.store import EpisodeStore, _read_json, array_spec
from mstudio.data.video_codec import VideoCodec

__all__ = ["BACKENDS", "create_store", "describe_store", "open_store"]

#: Store kinds by name: ``episodes`` (one directory of ``.npy`` memmaps per episode, for small data) and
#: ``sharded`` (episodes packed into shard files, frames raw or as video chunks, for corpus-sized data).
BACKENDS = {"episodes": EpisodeStore, "sharded": ShardedStore}
_FORMATS = {store.FORMAT: EpisodeStore, sharded.FORMAT: ShardedStore}


def open_store(path: str | os.PathLike, **kwargs: Any) -> Store:
    """The store at ``path``, of whichever kind its ``manifest.json`` names; ``kwargs`` go to its ``open``
    (``checksums=``).

    Raises:
        FileNotFoundError: ``path`` holds no ``manifest.json``.
        ValueError: the manifest is not valid JSON or names an unknown format (the message lists the known ones).
    """
    root = as_path(path)
    manifest = root / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{root} is not an episode store: no manifest.json (make one with create_store)")
    value = _read_json(manifest)
    kind = _FORMATS.get(value.get("format")) if isinstance(value, dict) else None
    if kind is None:
        found = value.get("format") if isinstance(value, dict) else type(value).__name__
        raise ValueError(f"{manifest} field 'format' must be one of {sorted(_FORMATS)}; found {found!r}")
    return kind.open(root, **kwargs)


def create_store(path: str | os.PathLike, image_size: tuple[int, int], meta: Mapping[str, Any] | None = None, *,
                 backend: str = "episodes", codec: VideoCodec | None = None, **kwargs: Any) -> Store:
    """A new, empty store of kind ``backend`` (a key of :data:`BACKENDS`).

    Args:
        path, image_size, meta: as for :meth:`EpisodeStore.create`.
        backend: ``"episodes"`` or ``"sharded"``.
        codec: video settings for the frames (sharded only; ``None`` stores them raw).
        **kwargs: more options of the kind's ``create`` (``shard_bytes=`` for sharded).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}; got {backend!r}")
    if backend == "episodes":
        if codec is not None or kwargs:
            extra = ["codec"] * (codec is not None) + sorted(kwargs)
            raise ValueError(f"{extra} apply to backend='sharded' only; an 'episodes' store keeps raw .npy files")
        return EpisodeStore.create(path, image_size, meta)
    return ShardedStore.create(path, image_size, meta, codec=codec, **kwargs)


def _disk_bytes(root: Path) -> int:
    """Bytes of every regular file under ``root`` (links not followed)."""
    total = 0
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                total += os.stat(path).st_size
    return total


def describe_store(store: Store) -> dict[str, Any]:
    """What ``mstudio store info`` prints: a dict of plain values (episodes, frames, bytes, backend, codec)."""
    frames = sum(store.length(e) for e in store.episode_ids)
    size = _disk_bytes(store.root)
    height, width = store.image_size
    facts: dict[str, Any] = {
        "store": str(store.root),
        "backend": "sharded" if isinstance(store, ShardedStore) else "episodes",
        "episodes": len(store),
        "frames": frames,
        "image_size": f"{height}x{width}",
        "bytes_on_disk": size,
        "bytes_per_frame": round(size / frames, 1) if frames else None,
        # what a frame with its actions takes uncompressed, for comparison
        "raw_bytes_per_frame": sum(d.itemsize * math.prod(s) for d, s in array_spec(store.image_size).values()),
    }
    if isinstance(store, ShardedStore):
        facts["frames_encoding"] = "raw" if store.codec is None else "video"
        if store.codec is not None:
            facts["codec"] = " ".join(f"{k}={v}" for k, v in store.codec.to_json().items())
        facts["shards"] = len({store.shard_of(e) for e in store.episode_ids})
        facts["shard_bytes"] = store.shard_bytes
    return facts
