"""Interleaved timing: every round runs every timer once, in an order rotated round by round.

A drift of the machine's load (other processes, thermal limits) then hits every variant alike, and no variant
always runs right after the same neighbour (whose cache footprint or freed memory it would inherit).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tqdm import tqdm

__all__ = ["Timer", "rotation", "run_rounds", "summarize", "timed"]

#: ``(round) -> seconds``: runs the work of round ``round`` once and returns how long it took.
Timer = Callable[[int], float]


def rotation(names: Sequence[str], round_: int) -> list[str]:
    """The order of round ``round_``: ``names`` rotated left by ``round_`` places."""
    k = round_ % len(names) if names else 0
    return [*names[k:], *names[:k]]


def run_rounds(timers: Mapping[str, Timer], rounds: int, *, progress: str | None = None) -> dict[str, list[float]]:
    """Run ``rounds`` rounds of every timer (order: :func:`rotation`); returns each timer's seconds, by round.

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
        for name in rotation(names, r):
            seconds[name].append(timers[name](r))
    return seconds


def timed(step: Callable[[Any], Any], inputs: Sequence[Any]) -> Timer:
    """A :data:`Timer` that calls ``step(inputs[round])``; the step must wait for its own device work (a train
    step that reads its loss does)."""

    def run(round_: int) -> float:
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
