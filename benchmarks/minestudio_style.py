"""Moved to :mod:`mstudio.bench.minestudio_style` (``mstudio bench`` runs it from the installed package); this name
stays so that ``from benchmarks.minestudio_style import make_minestudio_step`` (tests) keeps working."""

from mstudio.bench.minestudio_style import MineStudioStep, Objective, make_minestudio_step, reset_memory

__all__ = ["MineStudioStep", "Objective", "make_minestudio_step", "reset_memory"]
