"""Measurements beside the clock: FLOPs, the matmul peak, compile counts, and memory.

Memory, honestly measured per device:

- CPU: the resident set of a process (``VmRSS``/``VmHWM`` in ``/proc/<pid>/status``; the peak is reset by
  writing ``5`` to ``/proc/<pid>/clear_refs``), so each variant is measured in its own process. It counts
  everything the process holds: tensors, the allocator's free-but-kept pages, torch's code.
- CUDA: ``torch.cuda.max_memory_allocated`` (tensors only), reset with ``reset_peak_memory_stats``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["CompileStats", "count_flops", "matmul_timer", "memory_mb", "peak_memory_mb", "reset_peak_memory"]


def count_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of the aten ops ``fn()`` runs (its backward too, if it calls one), as
    ``FlopCounterMode`` counts them: ``2 m n k`` per ``(m, k) @ (k, n)`` matmul, likewise convolutions and
    attention; elementwise ops, norms and bias additions count 0."""
    mode = FlopCounterMode(display=False)
    with mode:
        fn()
    return mode.get_total_flops()


def matmul_timer(n: int = 2048, device: torch.device | str = "cpu") -> tuple[Callable[[int], float], int]:
    """A float32 ``(n, n) @ (n, n)`` timer for the rounds, and the FLOPs of one call (``2 n^3``).

    The timer ``(round) -> seconds`` runs ``torch.mm(a, b, out=c)`` (no allocation) and waits for the device,
    as a train step's loss read does; once untimed, then once timed.
    """
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=generator).to(device) for _ in range(2))
    c = torch.empty(n, n, device=device)

    def multiply() -> None:
        torch.mm(a, b, out=c)
        if c.is_cuda:
            torch.cuda.synchronize(c.device)

    def run(_round: int) -> float:
        multiply()  # untimed, as every timer's turn starts (mstudio.bench._rounds)
        start = time.perf_counter()
        multiply()
        return time.perf_counter() - start

    return run, 2 * n**3


class CompileStats:
    """Counts what ``torch.compile`` does inside a ``with`` block: graphs, recompilations and cache lookups.

    ``graphs`` is the change of ``torch._dynamo.utils.counters["stats"]["unique_graphs"]``; ``recompiles`` counts
    the compilations dynamo recorded in the block (``torch._dynamo.utils.get_compilation_metrics()``) with a
    ``recompile_reason``: a frame compiled again because its guards failed. ``caches`` holds the changes of
    inductor's FX-graph cache and AOTAutograd's cache counters (``fxgraph_cache_hit``, ``autograd_cache_miss``,
    ...): a warm compile hits both. Counts are process-wide.
    """

    #: ``(counters group, counter)`` of the cache lookups counted.
    CACHE_COUNTERS = (("inductor", "fxgraph_cache_hit"), ("inductor", "fxgraph_cache_miss"),
                      ("inductor", "fxgraph_cache_bypass"), ("aot_autograd", "autograd_cache_hit"),
                      ("aot_autograd", "autograd_cache_miss"), ("aot_autograd", "autograd_cache_bypass"))

    def __init__(self) -> None:
        self.graphs = 0
        self.recompiles = 0
        self.caches = {name: 0 for _, name in self.CACHE_COUNTERS}

    def _read(self) -> dict[str, int]:
        from torch._dynamo.utils import counters

        return {"graphs": counters["stats"]["unique_graphs"],
                **{name: counters[group][name] for group, name in self.CACHE_COUNTERS}}

    def __enter__(self) -> CompileStats:
        from torch._dynamo.utils import get_compilation_metrics

        self._before = self._read()
        self._seen = {id(m) for m in get_compilation_metrics()}
        return self

    def __exit__(self, *exc: object) -> None:
        from torch._dynamo.utils import get_compilation_metrics

        change = {k: v - self._before[k] for k, v in self._read().items()}
        self.graphs = change.pop("graphs")
        self.caches = change
        new = [m for m in get_compilation_metrics() if id(m) not in self._seen]
        self.recompiles = sum(m.recompile_reason is not None for m in new)

    def as_dict(self) -> dict[str, int]:
        """``{"graphs", "recompiles"}``."""
        return {"graphs": self.graphs, "recompiles": self.recompiles}


def _status_kb(pid: int | str, field: str) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # not Linux, or the process is gone
        return None
    found = re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) if found else None


def memory_mb(device: torch.device | str = "cpu", pid: int | str = "self") -> float | None:
    """Memory in use now, in MiB: CUDA tensors allocated, or the resident set of process ``pid`` (``None`` where
    ``/proc`` is missing)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    kb = _status_kb(pid, "VmRSS")
    return None if kb is None else kb / 1024


def reset_peak_memory(device: torch.device | str = "cpu", pid: int | str = "self") -> None:
    """Start a new peak: CUDA's allocator peak, or the process's peak resident set (``/proc/<pid>/clear_refs``)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:  # not Linux: peak_memory_mb then reports the peak since the process started
        pass


def peak_memory_mb(device: torch.device | str = "cpu", pid: int | str = "self") -> float | None:
    """Peak since :func:`reset_peak_memory`, in MiB: CUDA tensors allocated, or the process's peak resident set."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kb = _status_kb(pid, "VmHWM")
    return None if kb is None else kb / 1024
