"""A restricted unpickler for data from the internet: numpy arrays and scalars and builtin containers, nothing else.

MineStudio stores actions, meta data and other per-frame side data as ``pickle`` payloads. Plain ``pickle.loads``
of such a payload can run any code the file names (a ``__reduce__`` returning ``os.system``), so a downloaded
dataset must never be unpickled that way. :func:`load_pickle` resolves only the globals that pickled numpy arrays,
numpy scalars, dtypes and (protocols 0-2) bytes name, for numpy 1 and numpy 2 module paths alike; any other global
is refused when the pickle names it, before anything can call it.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import pickle
from typing import Any

import numpy as np

__all__ = ["UnsafePickleError", "load_pickle"]


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle named a global outside the allowlist; it was refused before anything it names could run."""


def _numpy_attr(module: str, name: str) -> Any:
    """``numpy._core.<module>.<name>`` (numpy 2), else ``numpy.core.<module>.<name>`` (numpy 1)."""
    for package in ("numpy._core", "numpy.core"):
        with contextlib.suppress(ImportError, AttributeError):
            return getattr(importlib.import_module(f"{package}.{module}"), name)
    raise ImportError(f"numpy has no {module}.{name}")


def _latin1(text: Any, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as pickle protocols 0-2 use it for bytes, and nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"_codecs.encode is allowed only as pickle writes bytes (str, 'latin1'); "
                                f"got ({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """What pickled numpy arrays, numpy scalars and bytes (protocols 0-5, numpy 1 and 2) name."""
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                           ("_codecs", "encode"): _latin1}
    for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer")):
        with contextlib.suppress(ImportError):
            value = _numpy_attr(module, name)
            allowed.update({(f"{package}.{module}", name): value for package in ("numpy.core", "numpy._core")})
    return allowed


_ALLOWED = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, where: str):
        super().__init__(io.BytesIO(data))
        self._where = where

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise UnsafePickleError(
                f"{self._where}: refused to unpickle the global {module}.{name}: only numpy arrays and scalars and "
                f"builtin containers are allowed, and loading anything else could run code from the data "
                f"(nothing was run)")
        return allowed


def load_pickle(data: bytes, where: str = "pickle") -> Any:
    """Unpickle ``data`` allowing only numpy arrays and scalars, dtypes and builtin types.

    Args:
        data: the pickle bytes.
        where: names the data in error messages (``"action/action-3 key '(0, 32)'"``).

    Raises:
        UnsafePickleError: the pickle names any other global (``os.system``, ``builtins.eval``, a class, ...);
            refused when its name is read, so nothing it names runs.
        ValueError: the bytes are not a valid pickle.
    """
    try:
        return _RestrictedUnpickler(data, where).load()
    except UnsafePickleError:
        raise
    except Exception as error:  # a malformed pickle can raise nearly anything; none of it is ours
        raise ValueError(f"{where}: not a valid pickle ({type(error).__name__}: {error})") from None
