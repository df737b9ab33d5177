"""Interleaved timing: every round runs every timer once, in an order shuffled round by round; each turn steps
once untimed, then once timed.

A drift of the machine's load (other processes, thermal limits) then hits every variant alike. The order is
shuffled, not rotated: a rotation keeps every timer right behind the same neighbour, and a neighbour leaves
something behind: its cache footprint, or, from another process (MineStudio's, in its own venv), OpenMP worker
threads that spin-wait for milliseconds after their last parallel region and share the cores with whatever runs
next (measured on 2 cores: the MineStudio-style loop timed right after MineStudio's process took 25 ms a step,
21 ms otherwise). An idle pause instead does not help: the next step then pays for waking threads that went to
sleep (every variant slowed by 1-2 ms). The untimed step absorbs the switch, so the timed one runs as a step of
a training loop does: right after a step of its own.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tqdm import tqdm

__all__ = ["Timer", "round_order", "run_rounds", "summarize", "timed"]

#: ``(round) -> seconds``: runs the work of round ``round`` once and returns how long it took.
Timer = Callable[[int], float]


def round_order(names: Sequence[str], round_: int) -> list[str]:
    """The order of round ``round_``: ``names`` shuffled by a generator seeded with ``round_`` (the same order
    for the same round in every run; over many rounds every name runs after every other about equally often)."""
    return random.Random(round_).sample(list(names), len(names))


def run_rounds(timers: Mapping[str, Timer], rounds: int, *, progress: str | None = None) -> dict[str, list[float]]:
    """Run ``rounds`` rounds of every timer (order: :func:`round_order`); returns each timer's seconds, by round.

    Args:
        timers: name -> :data:`Timer`; round ``r`` calls each with ``r``.
        rounds: rounds to run (>= 1).
        progress: a tqdm bar with this description; ``None`` for none.
    """
    if rounds < 1:
        raise ValueError(f"run_rounds: rounds must be >= 1, got {rounds}")
    names = list(timers)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in tqdm(range(rounds), desc=progress, disable=progress is None, leave=False):
        for name in round_order(names, r):
            seconds[name].append(timers[name](r))
    return seconds


def timed(step: Callable[[Any], Any], inputs: Sequence[Any], *, lead: int = 1) -> Timer:
    """A :data:`Timer` that calls ``step(inputs[round])`` ``lead`` times untimed, then once timed (see the module
    docstring); in round 0 only the timed call, the first call of all (the compile, for a compiled step). The step
    must wait for its own device work (a train step that reads its loss does)."""
    if lead < 0:
        raise ValueError(f"timed: lead must be >= 0, got {lead}")

    def run(round_: int) -> float:
        for _ in range(lead if round_ else 0):
            step(inputs[round_])
        start = time.perf_counter()
        step(inputs[round_])
        return time.perf_counter() - start

    return run


def summarize(seconds: Sequence[float], warmup: int) -> dict[str, float]:
    """The first call in seconds, and the median, min and max in ms of the calls after the first ``warmup``."""
    if not 0 <= warmup < len(seconds):
        raise ValueError(f"summarize: warmup must be in [0, {len(seconds)}) for {len(seconds)} timings, got {warmup}")
    kept = seconds[warmup:]
    return {"first_call_s": seconds[0], "median_ms": 1e3 * statistics.median(kept), "min_ms": 1e3 * min(kept),
            "max_ms": 1e3 * max(kept), "timed_steps": len(kept)}
