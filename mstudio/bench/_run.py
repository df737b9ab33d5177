"""``mstudio bench``: the variants timed in interleaved rounds, with compile, memory and FLOP measurements.

:func:`run_bench` measures one :class:`Workload` and returns a plain dict (the JSON result, see :mod:`._report`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from mstudio.bench._child import measure_in_child
from mstudio.bench._machine import command_line, load_average, machine
from mstudio.bench._measure import CompileStats, matmul_timer
from mstudio.bench._minestudio import MineStudioProcess
from mstudio.bench._rounds import Timer, run_rounds, summarize, timed
from mstudio.bench._variants import VARIANTS, Step, Workload, episode_batches, make_step, step_flops
from mstudio.host_memory import reuse_freed_memory

__all__ = ["BASELINE", "BenchOptions", "run_bench"]

#: The variant every speed-up is relative to.
BASELINE = "minestudio_style"
#: Name of MineStudio's own VPTPolicy timer (``--minestudio-python``).
MINESTUDIO_REAL = "minestudio_real"
_MATMUL = "matmul_peak"
_MEMORY_NOTE = {
    "cpu": "peak resident set (VmHWM) of a fresh process running only this variant, over 2 steps after its first "
           "call (compile excluded); built = its resident set before the first step (torch, model, state, batches)",
    "cuda": "torch.cuda.max_memory_allocated in a fresh process running only this variant, over 2 steps after its "
            "first call; built = memory_allocated before the first step",
}


@dataclass(frozen=True)
class BenchOptions:
    """What :func:`run_bench` measures and how."""

    workload: Workload
    """The VPT size and batch shape."""
    variants: tuple[str, ...] = tuple(VARIANTS)
    """Variants to time (:data:`mstudio.bench.VARIANTS` names); speed-ups need ``minestudio_style``."""
    repeats: int = 20
    """Timed rounds (each runs every variant once) after the warm-up."""
    warmup: int = 3
    """Untimed first rounds (the in-process compile happens in the first)."""
    fresh_processes: bool = True
    """Also measure each variant in fresh processes: cold and warm compile (compiled) and peak memory (all)."""
    minestudio_python: str | None = None
    """Python of a venv with ``minestudio==1.1.6``: also time MineStudio's own ``VPTPolicy`` in the rounds."""
    matmul_size: int = 2048
    """``n`` of the ``(n, n) @ (n, n)`` float32 matmul timed in every round as the peak."""

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f"BenchOptions: variants must be some of {list(VARIANTS)}, got {list(self.variants)}")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"BenchOptions: repeats must be >= 1 and warmup >= 0, got repeats={self.repeats}, "
                             f"warmup={self.warmup}")


@contextlib.contextmanager
def _environment(name: str, value: str | None) -> Iterator[None]:
    """``os.environ[name] = value`` inside the block (``None``: unchanged), restored after."""
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def _counting(timer: Timer, stats: dict[str, Any]) -> Timer:
    """``timer`` adding the graphs, recompiles and cache lookups each call causes to ``stats`` (as
    :class:`CompileStats` counts them: ``{"graphs", "recompiles", "caches": {...}}``)."""

    def run(round_: int) -> float:
        with CompileStats() as counted:
            seconds = timer(round_)
        for key, value in counted.as_dict().items():
            stats[key] += value
        for key, value in counted.caches.items():
            stats["caches"][key] = stats["caches"].get(key, 0) + value
        return seconds

    return run


def _fresh_process_measurements(options: BenchOptions, cache_dir: str) -> dict[str, dict[str, Any]]:
    """Per variant, its measurements in new processes: ``{"cold", "warm"}`` for the compiled step (``cold`` with
    the empty ``cache_dir`` as inductor's cache, ``warm`` with the cache ``cold`` filled), ``{"warm"}`` else."""
    measured = {}
    for variant in options.variants:
        if variant == "compiled":
            cold = measure_in_child(options.workload, variant, cache_dir=cache_dir)
            measured[variant] = {"cold": cold, "warm": measure_in_child(options.workload, variant, cache_dir=cache_dir)}
        else:
            measured[variant] = {"warm": measure_in_child(options.workload, variant)}
    return measured


def _recording(step: Step, name: str, last_loss: dict[str, float]) -> Step:
    """``step`` storing the loss it reads in ``last_loss[name]``."""

    def run(batch: Any) -> float:
        last_loss[name] = step(batch)
        return last_loss[name]

    return run


def run_bench(options: BenchOptions, *, command: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Time ``options.variants`` on one workload in interleaved rounds, in this process, same weights and batches.

    Order of work: the fresh-process measurements first (if asked: the cold compile fills a new, empty inductor
    cache directory), then the rounds here, whose compiled variant compiles from that cache (warm). Every round
    also times a float32 matmul, the peak the achieved GFLOP/s are compared to.

    Args:
        options: what to measure.
        command: the command line to record (default: this process's ``sys.argv``).
        progress: show tqdm bars.

    Returns:
        The JSON-ready result (fields: :data:`mstudio.bench.RESULT_FIELDS`, per variant
        :data:`mstudio.bench.VARIANT_FIELDS`).
    """
    workload = options.workload
    reuse_freed_memory(workload.device)  # as a TrainStep would: every variant here then runs with it
    info = machine()
    policy = workload.policy()
    batches = episode_batches(workload.batch, workload.seq, workload.image, options.warmup + options.repeats,
                              workload.device)
    flops = step_flops(policy, batches[0])
    measured = _measure(options, policy, batches, progress)
    peak = summarize(measured["seconds"].pop(_MATMUL), options.warmup)
    peak_gflops = measured["matmul_flops"] / peak["median_ms"] / 1e6
    variants = {name: _variant_result(name, summarize(times, options.warmup), measured, workload, flops,
                                      peak_gflops, options.minestudio_python)
                for name, times in measured["seconds"].items()}
    base = variants.get(BASELINE)
    for result in variants.values():
        result["speedup_vs_baseline"] = base["median_ms"] / result["median_ms"] if base else None
    return {
        "schema": "mstudio.bench/1",
        "command": command or command_line(),
        "machine": info,
        "load_average_end": load_average(),
        "workload": {**workload.describe(), "parameters": sum(p.numel() for p in policy.parameters())},
        "protocol": {"repeats": options.repeats, "warmup": options.warmup, "rounds": options.warmup + options.repeats,
                     "order": "every round runs every timer once, in an order shuffled per round; each turn steps once untimed on the round's batch, then once timed",
                     "baseline": BASELINE, "fresh_processes": options.fresh_processes,
                     "memory_measure": _MEMORY_NOTE[torch.device(workload.device).type]},
        "flops_per_step": flops,
        "matmul_peak": {"n": options.matmul_size, "median_ms": peak["median_ms"], "min_ms": peak["min_ms"],
                        "max_ms": peak["max_ms"], "gflops": peak_gflops},
        "variants": variants,
    }


def _measure(options: BenchOptions, policy: torch.nn.Module, batches: list[dict], progress: bool) -> dict[str, Any]:
    """The fresh-process measurements, then the rounds. Returns ``{"seconds"`` (name -> per round, the matmul's
    included), ``"matmul_flops"``, ``"last_loss"``, ``"compile"`` (name -> graphs and recompiles in the rounds),
    ``"fresh"`` (name -> :func:`_fresh_process_measurements`'s, and MineStudio's process memory)``}``."""
    workload = options.workload
    last_loss: dict[str, float] = {}
    compile_stats = {name: {"graphs": 0, "recompiles": 0, "caches": {}} for name in options.variants}
    timers: dict[str, Timer] = {
        name: _counting(timed(_recording(make_step(name, policy, workload.batch), name, last_loss), batches),
                        compile_stats[name])
        for name in options.variants
    }
    timers[_MATMUL], matmul_flops = matmul_timer(options.matmul_size, workload.device)
    fresh: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        cache_dir = None
        if options.fresh_processes:
            cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="mstudio-bench-inductor-"))
            fresh = _fresh_process_measurements(options, cache_dir)
        stack.enter_context(_environment("TORCHINDUCTOR_CACHE_DIR", cache_dir))
        if options.minestudio_python:
            minestudio = stack.enter_context(
                MineStudioProcess(options.minestudio_python, policy, batches, options.warmup))
            timers[MINESTUDIO_REAL] = minestudio
        seconds = run_rounds(timers, len(batches), progress=f"bench {workload.config}" if progress else None)
        if options.minestudio_python:
            last_loss[MINESTUDIO_REAL] = minestudio.losses[-1]
            fresh[MINESTUDIO_REAL] = {"warm": minestudio.memory()}
    return {"seconds": seconds, "matmul_flops": matmul_flops, "last_loss": last_loss, "compile": compile_stats,
            "fresh": fresh}


def _variant_result(name: str, summary: dict[str, float], measured: dict[str, Any], workload: Workload,
                    flops: int, peak_gflops: float, minestudio_python: str | None) -> dict[str, Any]:
    """One variant's result, from its timing ``summary`` and the other ``measured`` figures (:func:`_measure`)."""
    gflops = flops / summary["median_ms"] / 1e6
    fresh = measured["fresh"].get(name, {})
    description = VARIANTS.get(name) or (
        f"MineStudio 1.1.6's own VPTPolicy stepped by minestudio_style.py in {minestudio_python}, a long-lived "
        "process taking its turn in the rounds; memory: that process's peak resident set over the timed rounds")
    return {
        "description": description,
        **summary,
        "frames_per_s": workload.frames / summary["median_ms"] * 1e3,
        "achieved_gflops": gflops,
        "fraction_of_matmul_peak": gflops / peak_gflops,
        "final_loss": measured["last_loss"][name],
        "compile": _compile_result(name, measured["compile"].get(name), fresh),
        "memory": _memory_result(fresh),
    }


def _compile_result(name: str, in_run: dict[str, Any] | None, fresh: dict[str, Any]) -> dict[str, Any] | None:
    """A variant's compile figures: graphs, recompiles and cache lookups in the rounds; for the compiled step also
    the first calls (compile + one step) and cache lookups of the cold and warm fresh processes."""
    if in_run is None:  # minestudio_real
        return None
    # an eager variant's fresh process measured its memory only: its first call is no compile
    cold, warm = (fresh.get("cold"), fresh.get("warm")) if name == "compiled" else (None, None)
    return {
        **in_run,
        "cold_s": cold["first_call_s"] if cold else None,
        "warm_s": warm["first_call_s"] if warm else None,
        "cold_graphs": cold["graphs"] if cold else None,
        "cold_recompiles": cold["recompiles"] if cold else None,
        "cold_caches": cold.get("caches") if cold else None,
        "warm_caches": warm.get("caches") if warm else None,
    }


def _memory_result(fresh: dict[str, Any]) -> dict[str, Any] | None:
    warm = fresh.get("warm")
    return None if warm is None else {"memory_built_mb": warm["memory_built_mb"],
                                      "peak_memory_mb": warm["peak_memory_mb"]}
