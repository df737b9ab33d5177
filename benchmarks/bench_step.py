"""Train-step speed on TinyPolicy, and the helpers the other ``benchmarks/`` scripts share.

The VPT benchmark is ``mstudio bench`` (:mod:`mstudio.bench`): this script runs its variants (a MineStudio-style
eager loop, mstudio's step eager and compiled) on the test policy, ``TinyPolicy``, in its interleaved rounds.

    python benchmarks/bench_step.py                      # TinyPolicy, B=8, T=16, 64x64
    python benchmarks/bench_step.py --batch 4 --seq 32 --repeats 50
    python benchmarks/bench_step.py --repeats 50 --update-results   # refresh the committed results

Writes ``benchmarks/results/latest/step_<policy>.json`` and ``.md`` (git-ignored), or with ``--update-results``
the committed ``benchmarks/results/step_<policy>.*``. Each states the machine, the command and the baseline.
The reporting helpers here (:func:`header`, :func:`write_results`, ...) serve the sibling scripts.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from mstudio.bench import HYPER, VARIANTS, episode_batches, machine, make_step, run_rounds, summarize, timed
from mstudio.models import TinyPolicy

__all__ = ["HYPER", "add_results_argument", "command_line", "episode_batches", "header", "machine",
           "run_interleaved", "write_results"]

RESULTS = Path(__file__).parent / "results"
BASELINE = ("minestudio_style: mstudio.bench.minestudio_style (MineLightning's per-batch work) on the same module, "
            "measured in this run, in rounds with the other variants (order shuffled each round)")


def run_interleaved(variants: Mapping[str, Callable[[Any], Any]], batches: list[dict], warmup: int) -> dict:
    """Time ``variants`` (``batch -> scalar loss``) in rounds, one batch per round, each variant once per round
    in shuffled order (:func:`mstudio.bench.run_rounds`); the first ``warmup`` rounds are left out of the median.

    Returns:
        ``name -> {"first_call_s", "median_ms", "min_ms", "max_ms", "timed_steps", "final_loss"}``.
    """
    last = {}

    def recording(name: str, step: Callable[[Any], Any]) -> Callable[[Any], None]:
        return lambda batch: last.__setitem__(name, step(batch))

    timers = {name: timed(recording(name, step), batches) for name, step in variants.items()}
    seconds = run_rounds(timers, len(batches), progress="rounds")
    return {name: {**summarize(t, warmup), "final_loss": float(last[name])} for name, t in seconds.items()}


def command_line() -> str:
    """The command that ran this benchmark, as typed (relative to the directory it ran in)."""
    return shlex.join(["python", *sys.argv])


def add_results_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--update-results", action="store_true",
                        help="write to the committed benchmarks/results/ instead of the git-ignored "
                        "benchmarks/results/latest/")


def header(title: str, info: Mapping[str, Any], command: str, baseline: str) -> list[str]:
    """The first lines of a results ``.md``: title, machine (:func:`mstudio.bench.machine`), command, baseline."""
    return [
        f"# {title}",
        "",
        f"- Machine: {info['cpu']}, {info['cpus_available']} of {info['cpus_total']} CPUs available, torch "
        f"{info['torch']} ({info['torch_threads']} threads), Python {info['python']}, {info['platform']}; mstudio "
        f"commit {(info.get('git_commit') or 'unknown')[:12]}, load average {info.get('load_average')}",
        f"- Command: `{command}`",
        f"- Baseline: {baseline}",
        "",
    ]


def write_results(stem: str, report: Mapping[str, Any], lines: list[str], update: bool) -> None:
    """Write ``<stem>.json`` and ``<stem>.md`` to ``results/latest/`` (or ``results/`` if ``update``); print them."""
    directory = RESULTS if update else RESULTS / "latest"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (directory / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {directory / stem}.json and .md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--image", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds (compile happens here)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variant")
    add_results_argument(parser)
    args = parser.parse_args()

    torch.manual_seed(0)
    policy = TinyPolicy(image_size=args.image)
    batches = episode_batches(args.batch, args.seq, args.image, args.warmup + args.repeats)
    variants = {name: make_step(name, policy, args.batch) for name in VARIANTS
                if not (args.no_compile and name == "compiled")}
    results = run_interleaved(variants, batches, args.warmup)

    base = results["minestudio_style"]["median_ms"]
    report = {"command": command_line(), "args": vars(args), "machine": machine(), "hyper": HYPER,
              "baseline": BASELINE, "results": results,
              "speedup_vs_minestudio": {name: base / r["median_ms"] for name, r in results.items()}}
    title = f"Train step, TinyPolicy, B={args.batch} T={args.seq} {args.image}x{args.image}"
    lines = header(title, report["machine"], report["command"], BASELINE) + [
        "| variant | median ms/step | speed vs MineStudio-style | first call (s) | final loss |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['median_ms']:.2f} | {base / r['median_ms']:.2f}x | {r['first_call_s']:.2f} | "
                     f"{r['final_loss']:.6f} |")
    write_results("step_tiny", report, lines, args.update_results)


if __name__ == "__main__":
    main()
