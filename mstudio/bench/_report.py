"""Bench results written out: JSON as measured, a markdown table, and the sweep's plot (matplotlib, optional)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["RESULT_FIELDS", "VARIANT_FIELDS", "bench_markdown", "plot_sweep", "sweep_markdown", "write_json"]

#: Top-level fields of a :func:`mstudio.bench.run_bench` result.
RESULT_FIELDS = ("schema", "command", "machine", "load_average_end", "workload", "protocol", "flops_per_step",
                 "matmul_peak", "variants")
#: Fields of each variant's result.
VARIANT_FIELDS = ("description", "first_call_s", "median_ms", "min_ms", "max_ms", "timed_steps", "frames_per_s",
                  "achieved_gflops", "fraction_of_matmul_peak", "final_loss", "compile", "memory",
                  "speedup_vs_baseline")

_COLUMNS = ("variant", "ms/step (median, min-max)", "frames/s", "speed-up vs minestudio_style", "GFLOP/s",
            "of matmul peak", "first call s", "cold compile s", "warm compile s", "graphs", "recompiles",
            "peak memory MiB (built)", "final loss")


def write_json(result: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``result`` as indented JSON to ``path`` (parent directories created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def _num(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def _machine_lines(result: Mapping[str, Any]) -> list[str]:
    m = result["machine"]
    commit = (m["git_commit"] or "unknown (not a git work tree)")[:12]
    return [
        f"- Machine: {m['cpu']}, {m['cpus_available']} of {m['cpus_total']} CPUs available"
        + (f", {m['cuda_device']}" if m.get("cuda_device") else "")
        + f"; torch {m['torch']} ({m['torch_threads']} threads), Python {m['python']}, {m['platform']}",
        f"- mstudio commit: {commit}; load average (1, 5, 15 min) at start {m['load_average']}, at end "
        f"{result['load_average_end']}",
        f"- Command: `{result['command']}`",
        "- malloc: " + ("keeps freed blocks (mstudio.host_memory), for every variant in this process; MineStudio's "
                        "own process, if timed, runs as shipped" if m.get("malloc_keeps_freed_memory")
                        else "as the system has it"),
        "- C++ kernels of the compiled step: " + ("built in batches, one per compile worker (mstudio.kernel_builds)"
                                                  if m.get("cpu_kernels_batched")
                                                  else "one g++ run each (inductor's own builds)"),
    ]


def _variant_row(name: str, v: Mapping[str, Any]) -> str:
    compile_, memory = v["compile"] or {}, v["memory"] or {}
    cells = [
        name,
        f"{v['median_ms']:.2f} ({v['min_ms']:.2f}-{v['max_ms']:.2f})",
        f"{v['frames_per_s']:.1f}",
        _num(v["speedup_vs_baseline"], suffix="x"),
        f"{v['achieved_gflops']:.1f}",
        f"{100 * v['fraction_of_matmul_peak']:.0f} %",
        f"{v['first_call_s']:.2f}",
        _num(compile_.get("cold_s"), 1),
        _num(compile_.get("warm_s"), 1),
        str(compile_.get("graphs", "n/a")),
        str(compile_.get("recompiles", "n/a")),
        f"{_num(memory.get('peak_memory_mb'), 0)} ({_num(memory.get('memory_built_mb'), 0)})",
        f"{v['final_loss']:.6f}",
    ]
    return "| " + " | ".join(cells) + " |"


def _caches(counts: Mapping[str, int] | None) -> str:
    if not counts:
        return "n/a"
    return (f"FX graph {counts.get('fxgraph_cache_hit', 0)} hit / {counts.get('fxgraph_cache_miss', 0)} miss, "
            f"AOTAutograd {counts.get('autograd_cache_hit', 0)} hit / {counts.get('autograd_cache_miss', 0)} miss")


def _cache_lines(variants: Mapping[str, Any]) -> list[str]:
    """Below the table: the compile caches each compiling variant met (a warm compile hits both)."""
    lines = []
    for name, v in variants.items():
        compile_ = v["compile"] or {}
        if compile_.get("cold_caches") or any((compile_.get("caches") or {}).values()):
            lines.append(f"\n- `{name}` compile caches: cold process {_caches(compile_.get('cold_caches'))}; warm "
                         f"process {_caches(compile_.get('warm_caches'))}; this run {_caches(compile_.get('caches'))}")
    return lines


def bench_markdown(result: Mapping[str, Any]) -> str:
    """A :func:`mstudio.bench.run_bench` result as markdown: machine, command, workload, one row per variant."""
    w, p, peak = result["workload"], result["protocol"], result["matmul_peak"]
    lines = [
        f"# mstudio bench: VPT {w['config']} (hidsize {w['hidsize']}), B {w['batch']} x T {w['seq']}, "
        f"{w['image']}x{w['image']}, {w['device']}",
        "",
        *_machine_lines(result),
        f"- Workload: {w['parameters']:,} parameters; BC (weight {w['hyper']['bc_weight']}), AdamW (lr "
        f"{w['hyper']['lr']}, weight decay {w['hyper']['weight_decay']}, warm-up {w['hyper']['warmup_steps']}, clip "
        f"{w['hyper']['clip_norm']}); the loss read after every step",
        f"- Protocol: {p['warmup']} warm-up + {p['repeats']} timed rounds in one process, same weights and batches; "
        f"{p['order']}; medians of the timed rounds. Baseline: {p['baseline']}.",
        f"- FLOPs per step (forward + backward, FlopCounterMode): {result['flops_per_step'] / 1e9:.3f} GFLOP; "
        f"fp32 matmul peak ({peak['n']}x{peak['n']} torch.mm, timed in the same rounds): {peak['gflops']:.1f} "
        f"GFLOP/s",
        "- Compile: cold = first call in a fresh process with an empty TORCHINDUCTOR_CACHE_DIR, warm = the same in "
        "a second fresh process with that cache (both: compile + one step); first call = in this run (warm "
        "cache); graphs and recompiles counted over this run's rounds (torch._dynamo counters)",
        f"- Memory: {p['memory_measure'] if p['fresh_processes'] else 'not measured (no fresh processes)'}",
        "",
        "| " + " | ".join(_COLUMNS) + " |",
        "| --- |" + " ---: |" * (len(_COLUMNS) - 1),
    ]
    lines += [_variant_row(name, v) for name, v in result["variants"].items()]
    lines += _cache_lines(result["variants"])
    for name, v in result["variants"].items():
        lines.append(f"\n- `{name}`: {v['description']}")
    return "\n".join(lines) + "\n"


def sweep_markdown(result: Mapping[str, Any]) -> str:
    """A :func:`mstudio.bench.run_sweep` result as markdown: one row per point and variant."""
    b = result["base"]
    lines = [
        f"# mstudio bench --sweep: VPT {b['config']} around B {b['batch']} x T {b['seq']}, hidsize {b['hidsize']}",
        "",
        *_machine_lines(result),
        f"- Protocol: {result['protocol']['order']}; {result['protocol']['warmup']} warm-up + "
        f"{result['protocol']['repeats']} timed rounds, medians; fp32 matmul peak "
        f"({result['matmul_peak']['n']}x{result['matmul_peak']['n']} torch.mm, in the same rounds): "
        f"{result['matmul_peak']['gflops']:.1f} GFLOP/s",
        "",
        "| axis | B | T | hidsize | GFLOP/step | variant | ms/step (median) | min | frames/s | GFLOP/s "
        "| of matmul peak |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for point in result["points"]:
        w = point["workload"]
        for name, v in point["variants"].items():
            lines.append(f"| {point['axis']} | {w['batch']} | {w['seq']} | {w['hidsize']} | "
                         f"{point['flops_per_step'] / 1e9:.3f} | {name} | {v['median_ms']:.2f} | {v['min_ms']:.2f} | "
                         f"{v['frames_per_s']:.1f} | {v['achieved_gflops']:.1f} | "
                         f"{100 * v['fraction_of_matmul_peak']:.0f} % |")
    return "\n".join(lines) + "\n"


def plot_sweep(result: Mapping[str, Any], path: str | Path) -> Path:
    """Plot ms/step against each swept axis (log-log, one line per variant) to an image at ``path``.

    Needs matplotlib (``pip install 'mstudio[bench]'``); raises ``ImportError`` saying so.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as error:
        raise ImportError(f"plotting the sweep needs matplotlib: pip install 'mstudio[bench]' ({error})") from error
    axes_names = list(dict.fromkeys(point["axis"] for point in result["points"]))
    figure, axes = plt.subplots(1, len(axes_names), figsize=(4.5 * len(axes_names), 4), squeeze=False)
    for ax, axis in zip(axes[0], axes_names, strict=True):
        points = [point for point in result["points"] if point["axis"] == axis]
        for name in points[0]["variants"]:
            ax.plot([point["value"] for point in points], [point["variants"][name]["median_ms"] for point in points],
                    marker="o", label=name)
        values = [point["value"] for point in points]
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(values, labels=[str(v) for v in values])
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # 40, not 4 x 10^1
        ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set(xlabel=axis, ylabel="ms / step (median)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    b = result["base"]
    figure.suptitle(f"VPT {b['config']} around B {b['batch']} x T {b['seq']}, hidsize {b['hidsize']}: "
                    f"{result['machine']['cpu']}, {result['machine']['torch_threads']} threads")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
