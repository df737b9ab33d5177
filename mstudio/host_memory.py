"""Host memory for CPU steps: glibc's malloc told to keep the large blocks a step frees, so the next step reuses
their pages instead of faulting fresh ones in.

Why: glibc hands out a block of 32 MiB or more (smaller ones too, until its dynamic threshold has risen) as a
mapping of its own and unmaps it on ``free``. A CPU train step allocates its large activations and gradients anew
every call (eager and compiled alike: inductor's wrapper allocates its buffers per call), so every call pays a
page fault and the kernel's zeroing for each 4 KiB page of each such block on first touch. Measured on a 2-core
Xeon VM: allocating and filling a 32 MiB tensor takes 9.4 ms fresh and 2.2 ms from a kept block. On VPT ``small``
(B4 x T32, 64x64 frames, whose first CNN stage holds 32 MiB activations), ``mstudio bench`` before and after:
the MineStudio-style module loop 194.9 -> 182.7 ms a step, mstudio's eager step 194.4 -> 185.6 ms; the compiled
step, whose wrapper allocates fewer such blocks, 172.2 -> 173.1 ms. It is what the PyTorch CPU tuning guide gets
by preloading jemalloc or tcmalloc, done with two ``mallopt`` calls instead.

The cost: memory a step frees stays with the process (its resident size stays near its peak, as with CUDA's
caching allocator) instead of going back to the system between steps. ``MSTUDIO_MALLOC=system`` leaves malloc as
it is; so does a preloaded allocator (``LD_PRELOAD`` naming one), a libc other than glibc, or another OS.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import threading

import torch

__all__ = ["MALLOC_ENV", "keeps_freed_memory", "reuse_freed_memory"]

#: The environment variable that chooses: ``reuse`` (the default) or ``system``.
MALLOC_ENV = "MSTUDIO_MALLOC"
_CHOICES = ("reuse", "system")

# glibc's mallopt parameters (malloc.h) and the values set: blocks up to 1 GiB come from malloc's heap, and the
# heap's free top is never given back (mallopt takes a C int, so 2**31 - 1 is its largest value).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 2**30
TRIM_THRESHOLD = 2**31 - 1

_lock = threading.Lock()
_applied: bool | None = None


def _choice() -> str:
    choice = os.environ.get(MALLOC_ENV, "reuse").strip().lower() or "reuse"
    if choice not in _CHOICES:
        raise ValueError(f"{MALLOC_ENV}={os.environ[MALLOC_ENV]!r}: expected one of {', '.join(_CHOICES)}")
    return choice


def _glibc_mallopt():
    """glibc's ``mallopt`` as a ctypes function, or ``None`` where malloc is not glibc's own."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    if "malloc" in os.environ.get("LD_PRELOAD", ""):  # jemalloc, tcmalloc, mimalloc: the user chose one
        return None
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def reuse_freed_memory(device: str | torch.device = "cpu") -> bool:
    """For work on ``device``, make this process's malloc keep the blocks it frees (see the module docstring);
    once per process, and only for a CPU ``device`` (another device's tensors are not malloc's).

    Returns whether malloc now keeps them: ``False`` under ``MSTUDIO_MALLOC=system``, with a preloaded allocator,
    off glibc, if glibc refused a setting, or (untouched) for a device other than the CPU. Raises ``ValueError``
    for any other ``MSTUDIO_MALLOC`` value. Process-wide and not undone: a :class:`~mstudio.train.step.TrainStep`
    calls it on its first call, ``mstudio bench`` before it times anything.
    """
    if torch.device(device).type != "cpu":
        return keeps_freed_memory()
    global _applied
    with _lock:
        if _applied is None:
            mallopt = _glibc_mallopt() if _choice() == "reuse" else None
            _applied = (mallopt is not None and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                        and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
        return _applied


def keeps_freed_memory() -> bool:
    """Whether :func:`reuse_freed_memory` has made this process's malloc keep freed blocks."""
    return bool(_applied)
