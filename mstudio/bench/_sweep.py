"""``mstudio bench --sweep``: the step's cost over a grid of ``B``, ``T`` and ``hidsize``, one axis at a time around
a base point, every point and variant timed in the same interleaved rounds (so a change of the machine's load
bends no curve)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from mstudio.bench._machine import command_line, load_average, machine
from mstudio.bench._measure import matmul_timer
from mstudio.bench._rounds import Timer, run_rounds, summarize, timed
from mstudio.bench._variants import Workload, episode_batches, make_step, step_flops
from mstudio.host_memory import reuse_freed_memory

__all__ = ["SweepOptions", "run_sweep", "sweep_points"]


@dataclass(frozen=True)
class SweepOptions:
    """A scaling sweep: one axis varied at a time around ``base``."""

    base: Workload
    """The point every axis passes through."""
    batches: tuple[int, ...] = (1, 2, 4, 8)
    """Values of ``B``."""
    seqs: tuple[int, ...] = (4, 8, 16, 32)
    """Values of ``T``."""
    hidsizes: tuple[int, ...] = (64, 128, 256, 512)
    """Values of ``hidsize`` (each must be divisible by the preset's attention heads)."""
    variants: tuple[str, ...] = ("minestudio_style", "eager")
    """Variants timed at every point (``compiled`` compiles once per point: minutes each on a small CPU)."""
    repeats: int = 5
    """Timed rounds (each runs every point's variants once)."""
    warmup: int = 2
    """Untimed first rounds."""
    matmul_size: int = 2048
    """``n`` of the float32 ``(n, n) @ (n, n)`` matmul timed in every round as the peak."""


def sweep_points(options: SweepOptions) -> list[tuple[str, int, Workload]]:
    """``(axis, value, workload)`` for every point of the sweep, axis by axis."""
    axes = {"batch": options.batches, "seq": options.seqs, "hidsize": options.hidsizes}
    return [(axis, value, replace(options.base, **{axis: value})) for axis, values in axes.items() for value in values]


def run_sweep(options: SweepOptions, *, command: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Time ``options.variants`` at every :func:`sweep_points` point, all in the same rounds (order shuffled), with
    a float32 matmul as the peak; returns the JSON-ready result (one entry per point under ``"points"``)."""
    reuse_freed_memory(options.base.device)  # as a TrainStep would: every variant here then runs with it
    info = machine()
    rounds = options.warmup + options.repeats
    points: list[dict[str, Any]] = []
    timers: dict[str, Timer] = {}
    for axis, value, workload in sweep_points(options):
        policy = workload.policy()
        batches = episode_batches(workload.batch, workload.seq, workload.image, rounds, workload.device)
        points.append({"axis": axis, "value": value,
                       "workload": {**workload.describe(), "parameters": sum(p.numel() for p in policy.parameters())},
                       "flops_per_step": step_flops(policy, batches[0])})
        for name in options.variants:
            timers[f"{axis}={value}/{name}"] = timed(make_step(name, policy, workload.batch), batches)
    timers[_MATMUL], matmul_flops = matmul_timer(options.matmul_size, options.base.device)
    seconds = run_rounds(timers, rounds, progress="sweep" if progress else None)
    peak = summarize(seconds.pop(_MATMUL), options.warmup)
    peak_gflops = matmul_flops / peak["median_ms"] / 1e6
    for point in points:
        point["variants"] = {}
        for name in options.variants:
            summary = summarize(seconds[f"{point['axis']}={point['value']}/{name}"], options.warmup)
            gflops = point["flops_per_step"] / summary["median_ms"] / 1e6
            point["variants"][name] = {**summary, "frames_per_s": point["workload"]["frames_per_step"] /
                                       summary["median_ms"] * 1e3, "achieved_gflops": gflops,
                                       "fraction_of_matmul_peak": gflops / peak_gflops}
    return {
        "schema": "mstudio.bench.sweep/2",
        "command": command or command_line(),
        "machine": info,
        "load_average_end": load_average(),
        "base": options.base.describe(),
        "protocol": {"repeats": options.repeats, "warmup": options.warmup, "variants": list(options.variants),
                     "order": "every round runs every point's variants once, in an order shuffled per round; each "
                              "turn steps once untimed, then once timed; "
                              "one axis varied at a time around the base"},
        "matmul_peak": {"n": options.matmul_size, "median_ms": peak["median_ms"], "gflops": peak_gflops},
        "points": points,
    }


_MATMUL = "matmul_peak"
