"""A sweep of K variants in one call (``mstudio.research.SweepStep``) vs the same K runs stepped one after another.

Both train TinyPolicy with BC plus a KL-free entropy bonus weighted by a per-variant hyper-parameter, AdamW
with a per-variant learning rate, on the same batches. Per batch, the sweep makes one call; the sequential
variant makes K calls of ``make_train_step`` (one step function, so one compile, shared by the K states).
Rounds interleave the two; medians after warm-up.

    python benchmarks/bench_sweep.py                      # K = 4 and 8, eager and compiled, B=4, T=16, 32x32
    python benchmarks/bench_sweep.py --ks 4 --no-compile

Writes ``benchmarks/results/latest/sweep.json`` and ``.md`` (``--update-results``: ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import torch

import losses
import mstudio
from bench_step import add_results_argument, command_line, episode_batches, header, machine, run_interleaved, write_results
from mstudio.models import TinyPolicy
from mstudio.research import SweepStep

BASELINE = "sequential: the same K variants, one make_train_step call each per batch, timed in the same rounds"
OBJECTIVE = losses.combine(losses.behavior_clone, losses.weighted(losses.entropy_bonus, losses.Hyperparam("ent", 0.0)))


def variants(policy: torch.nn.Module, k: int, batch_size: int, compile: bool) -> dict:
    """``{"sweep": ..., "sequential": ...}``, each ``batch -> loss`` over ``k`` variants."""
    optimizer = mstudio.optim.adamw(1e-3, clip_norm=1.0)
    settings = [{"ent": 1e-3 * i, "learning_rate": 1e-3 * (1 + i % 3)} for i in range(k)]
    sweep = SweepStep(policy, OBJECTIVE, optimizer, compile=compile)
    stacked = {"states": sweep.init(batch_size, settings)}
    step = mstudio.make_train_step(policy, OBJECTIVE, optimizer, compile=compile)
    base = mstudio.init_state(policy, optimizer, batch_size, objective=OBJECTIVE)
    separate = [mstudio.set_hyperparams(base, **values) for values in settings]

    def swept(batch: Mapping[str, Any]) -> torch.Tensor:
        stacked["states"], metrics = sweep(stacked["states"], batch)
        return metrics["loss"].sum()

    def sequential(batch: Mapping[str, Any]) -> torch.Tensor:
        total = 0.0
        for i, state in enumerate(separate):
            separate[i], metrics = step(state, batch)
            total = total + metrics["loss"]
        return total

    return {"sweep": swept, "sequential": sequential}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    add_results_argument(parser)
    args = parser.parse_args()
    torch.manual_seed(0)
    policy = TinyPolicy(image_size=args.image)
    batches = episode_batches(args.batch, args.seq, args.image, args.warmup + args.repeats)
    rows, results = [], {}
    for compile in ([False] if args.no_compile else [False, True]):
        for k in args.ks:
            result = run_interleaved(variants(policy, k, args.batch, compile), batches, args.warmup)
            mode = "compiled" if compile else "eager"
            results[f"{mode}_k{k}"] = result
            speedup = result["sequential"]["median_ms"] / result["sweep"]["median_ms"]
            rows.append(f"| {mode} | {k} | {result['sweep']['median_ms']:.1f} | {result['sequential']['median_ms']:.1f} "
                        f"| {speedup:.2f}x | {result['sweep']['first_call_s']:.1f} |")
    info, command = machine(), command_line()
    report = {"machine": info, "command": command, "baseline": BASELINE, "args": vars(args), "results": results}
    lines = header("Sweep of K variants in one call vs K sequential steps (TinyPolicy)", info, command, BASELINE) + [
        f"B={args.batch}, T={args.seq}, {args.image}x{args.image}; BC + weighted entropy bonus, per-variant weight and "
        f"learning rate; medians of {args.repeats} interleaved batches after {args.warmup} warm-up.",
        "",
        "| mode | K | sweep ms/batch | sequential ms/batch | sweep speedup | sweep first call (s) |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
    ]
    write_results("sweep", report, lines, args.update_results)


if __name__ == "__main__":
    main()
