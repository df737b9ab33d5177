"""``mstudio bench``: how fast the train step is, measured against MineStudio's loop in one process.

The variants (:data:`VARIANTS`: MineStudio's eager loop on the module, mstudio's step eager, and compiled, and
optionally MineStudio's own ``VPTPolicy`` in its venv) train copies of one policy on the same batches in
interleaved rounds (:func:`run_rounds`), so ratios hold even on a busy machine. Beside the medians: FLOPs per
step and the share of a float32 matmul peak timed in the same rounds, cold and warm compile times and peak
memory from fresh processes, graphs and recompiles. :func:`run_sweep` shows how the cost grows with ``B``,
``T`` and ``hidsize``.

    from mstudio.bench import BenchOptions, Workload, bench_markdown, run_bench
    result = run_bench(BenchOptions(Workload.preset("tiny"), repeats=10))
    print(bench_markdown(result))

Attributes load on first use, so the command line reads :data:`VARIANTS` and :data:`SHAPES` without torch.
"""

from __future__ import annotations

import importlib

_ATTRIBUTES = {
    "machine": "_machine",
    "CompileStats": "_measure", "count_flops": "_measure",
    "HYPER": "_presets", "SHAPES": "_presets", "VARIANTS": "_presets",
    "RESULT_FIELDS": "_report", "VARIANT_FIELDS": "_report", "bench_markdown": "_report", "plot_sweep": "_report",
    "sweep_markdown": "_report", "write_json": "_report",
    "round_order": "_rounds", "run_rounds": "_rounds", "summarize": "_rounds", "timed": "_rounds",
    "BASELINE": "_run", "BenchOptions": "_run", "run_bench": "_run",
    "SweepOptions": "_sweep", "run_sweep": "_sweep", "sweep_points": "_sweep",
    "Workload": "_variants", "episode_batches": "_variants", "make_step": "_variants", "step_flops": "_variants",
}

__all__ = sorted(_ATTRIBUTES)


def __getattr__(name: str):
    if name in _ATTRIBUTES:
        return getattr(importlib.import_module(f"mstudio.bench.{_ATTRIBUTES[name]}"), name)
    raise AttributeError(f"module 'mstudio.bench' has no attribute {name!r}")


def __dir__():
    return __all__
