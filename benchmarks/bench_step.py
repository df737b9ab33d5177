"""Train-step speed: mstudio compiled vs mstudio eager vs a MineStudio-style eager step, in one run.

All three train the same policy (same initial weights) on the same synthetic episode-continuous batches with
behaviour cloning (weight 0.01), AdamW (lr 1e-3, weight decay 0.1, warmup 10, clipping at 1.0). The
MineStudio-style step (the baseline) is ``benchmarks/minestudio_style.py``: what ``MineLightning`` does per
batch (memory reset rule, module forward, ``loss.backward()``, ``clip_grad_norm_``, ``torch.optim.AdamW`` +
``LambdaLR``, ``zero_grad``). Reports the median ms/step over ``--repeats`` timed steps (after warm-up; the
variants take turns, batch by batch), the compile time, the ratios, and the loss after the run (the three must
agree).

    python benchmarks/bench_step.py                      # TinyPolicy, B=8, T=16, 64x64
    python benchmarks/bench_step.py --batch 4 --seq 32 --repeats 50
    python benchmarks/bench_step.py --repeats 50 --update-results   # refresh the committed results

Writes ``benchmarks/results/latest/step_<policy>.json`` and ``.md`` (git-ignored), or with ``--update-results``
the committed ``benchmarks/results/step_<policy>.*``. Each states the machine, the command and the baseline.
The reporting helpers here (:func:`machine`, :func:`write_results`, ...) serve ``bench_vpt.py`` too.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import losses
import mstudio
from minestudio_style import make_minestudio_step  # sibling module: the one MineStudio-style reference step
from mstudio.data.synthetic import random_batch
from mstudio.models import TinyPolicy

RESULTS = Path(__file__).parent / "results"
HYPER = dict(lr=1e-3, weight_decay=0.1, warmup_steps=10, clip_norm=1.0, bc_weight=0.01)
BASELINE = ("minestudio_eager: benchmarks/minestudio_style.py (MineLightning's per-batch work) on the same module, "
            "measured in this run, taking turns with the other variants batch by batch")

#: A timed variant: one training step on a batch, returning the loss.
Step = Callable[[Mapping[str, Any]], Tensor]


def make_policy(name: str, image_size: int) -> torch.nn.Module:
    """The policy to train, by ``--policy`` name, for ``image_size`` square frames."""
    if name == "tiny":
        return TinyPolicy(image_size=image_size)
    raise SystemExit(f"unknown policy {name!r}; known: ['tiny']")


def episode_batches(batch_size: int, seq_len: int, image_size: int, count: int) -> list[dict]:
    """``count`` consecutive windows per row (timestamps continue), so the memory is carried."""
    return [
        random_batch(batch_size, seq_len, image_size, seed=i, start=i * seq_len) for i in range(count)
    ]


def minestudio_step(policy: torch.nn.Module) -> Step:
    """The baseline: MineStudio's step (``minestudio_style.py``) on a copy of ``policy``, BC as the objective."""

    objective = losses.weighted(losses.behavior_clone, HYPER["bc_weight"])
    hyper = {k: HYPER[k] for k in ("lr", "weight_decay", "warmup_steps", "clip_norm")}
    step = make_minestudio_step(copy.deepcopy(policy), lambda batch, latents: objective(batch, latents, {}), **hyper)
    return lambda batch: step(batch)[0]["loss"]


def mstudio_step(policy: torch.nn.Module, batch_size: int, compile: bool) -> Step:
    """mstudio's ``make_train_step`` (eager or compiled) with the same hyper-parameters, its state held here."""
    optimizer = mstudio.optim.adamw(
        HYPER["lr"], weight_decay=HYPER["weight_decay"], warmup_steps=HYPER["warmup_steps"], clip_norm=HYPER["clip_norm"]
    )
    objective = losses.weighted(losses.behavior_clone, HYPER["bc_weight"])
    train_step = mstudio.make_train_step(policy, objective, optimizer, compile=compile)
    holder = {"state": mstudio.init_state(policy, optimizer, batch_size)}

    def step(batch: Mapping[str, Any]) -> Tensor:
        holder["state"], metrics = train_step(holder["state"], batch)
        return metrics["loss"]

    return step


def run_interleaved(variants: dict[str, Step], batches: list[dict], warmup: int) -> dict:
    """Time each variant on each batch in turn (round-robin), so drifts in machine load hit all alike.

    The first ``warmup`` calls (compilation included) are not in the median; the first call is reported.
    """
    times = {name: [] for name in variants}
    losses_ = {}
    for batch in batches:
        for name, step in variants.items():
            start = time.perf_counter()
            losses_[name] = step(batch)
            times[name].append(time.perf_counter() - start)
    return {
        name: {
            "first_call_s": t[0],
            "median_ms": 1e3 * statistics.median(t[warmup:]),
            "final_loss": float(losses_[name]),
        }
        for name, t in times.items()
    }


def machine() -> dict[str, Any]:
    """Where the numbers come from: CPU model (``/proc/cpuinfo``), CPUs, torch version and threads, Python."""
    try:
        models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")]
    except OSError:  # not Linux
        models = []
    return {
        "cpu": models[0] if models else platform.processor() or "unknown CPU",
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpus_total": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def command_line() -> str:
    """The command that ran this benchmark, as typed (relative to the directory it ran in)."""
    return shlex.join(["python", *sys.argv])


def add_results_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--update-results", action="store_true",
                        help="write to the committed benchmarks/results/ instead of the git-ignored "
                        "benchmarks/results/latest/")


def header(title: str, info: Mapping[str, Any], command: str, baseline: str) -> list[str]:
    """The first lines of a results ``.md``: title, machine, command and baseline."""
    return [
        f"# {title}",
        "",
        f"- Machine: {info['cpu']}, {info['cpus_available']} of {info['cpus_total']} CPUs available, torch "
        f"{info['torch']} ({info['torch_threads']} threads), Python {info['python']}, {info['platform']}",
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
    parser.add_argument("--policy", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--image", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (compile happens here)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variant")
    add_results_argument(parser)
    args = parser.parse_args()

    torch.manual_seed(0)
    policy = make_policy(args.policy, args.image)
    batches = episode_batches(args.batch, args.seq, args.image, args.warmup + args.repeats)
    variants = {
        "minestudio_eager": minestudio_step(policy),
        "mstudio_eager": mstudio_step(policy, args.batch, compile=False),
    }
    if not args.no_compile:
        variants["mstudio_compiled"] = mstudio_step(policy, args.batch, compile=True)
    results = run_interleaved(variants, batches, args.warmup)

    base = results["minestudio_eager"]["median_ms"]
    report = {"command": command_line(), "args": vars(args), "machine": machine(), "hyper": HYPER,
              "baseline": BASELINE, "results": results,
              "speedup_vs_minestudio": {name: base / r["median_ms"] for name, r in results.items()}}
    title = f"Train step, {args.policy} policy, B={args.batch} T={args.seq} {args.image}x{args.image}"
    lines = header(title, report["machine"], report["command"], BASELINE) + [
        "| variant | median ms/step | speed vs MineStudio-style | first call (s) | final loss |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['median_ms']:.2f} | {base / r['median_ms']:.2f}x | {r['first_call_s']:.2f} | {r['final_loss']:.6f} |"
        )
    write_results(f"step_{args.policy}", report, lines, args.update_results)


if __name__ == "__main__":
    main()
