"""Cost of one gradient-diagnostics pass relative to one training step, in one run, rounds interleaved.

The pass is :func:`mstudio.research.diagnose` over BC and its camera and button terms (three gradients from one
forward, their norms and cosines): what ``[research]`` in a Trainer config runs every N steps. The step is
``make_train_step`` with BC and AdamW on the same policy and batches. Both run eager and compiled; each
variant takes its turn on every batch, and the medians after warm-up are compared.

    python benchmarks/bench_research.py                      # TinyPolicy, B=8, T=16, 64x64
    python benchmarks/bench_research.py --batch 4 --seq 32

Writes ``benchmarks/results/latest/research.json`` and ``.md`` (``--update-results``: ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import torch

import losses
import mstudio
from bench_step import (
    add_results_argument,
    command_line,
    episode_batches,
    header,
    machine,
    run_interleaved,
    write_results,
)
from mstudio.models import TinyPolicy
from mstudio.research import diagnose, term

BASELINE = "train_step: make_train_step (BC, AdamW) on the same policy and batches, timed in the same rounds"


def variants(policy: torch.nn.Module, batch_size: int) -> dict:
    """``name -> (batch -> a tensor)``: the train step and the diagnostics pass, eager and compiled."""
    optimizer = mstudio.optim.adamw(1e-3, clip_norm=1.0)
    objectives = {"bc": losses.behavior_clone, "camera": term(losses.behavior_clone, "camera_loss"),
                  "buttons": term(losses.behavior_clone, "button_loss")}
    out = {}
    for compiled in (False, True):
        suffix = "compiled" if compiled else "eager"
        step = mstudio.make_train_step(policy, losses.behavior_clone, optimizer, compile=compiled)
        holder = {"state": mstudio.init_state(policy, optimizer, batch_size)}

        def train(batch: Mapping[str, Any], step=step, holder=holder) -> torch.Tensor:
            holder["state"], metrics = step(holder["state"], batch)
            return metrics["loss"]

        def run_diagnose(state, batch):
            return diagnose(policy, objectives, state, batch)

        pass_fn = torch.compile(run_diagnose, fullgraph=True) if compiled else run_diagnose

        def diagnostics(batch: Mapping[str, Any], holder=holder, pass_fn=pass_fn) -> torch.Tensor:
            # the state the step is at: the pass reads it and changes nothing
            return pass_fn(holder["state"], batch)["grad_cosine/camera__buttons"]

        out[f"train_step_{suffix}"], out[f"diagnose_{suffix}"] = train, diagnostics
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--image", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30, help="timed batches per variant")
    parser.add_argument("--warmup", type=int, default=3)
    add_results_argument(parser)
    args = parser.parse_args()
    torch.manual_seed(0)
    policy = TinyPolicy(image_size=args.image)
    batches = episode_batches(args.batch, args.seq, args.image, args.warmup + args.repeats)
    result = run_interleaved(variants(policy, args.batch), batches, args.warmup)
    ms = {name: r["median_ms"] for name, r in result.items()}
    ratios = {mode: ms[f"diagnose_{mode}"] / ms[f"train_step_{mode}"] for mode in ("eager", "compiled")}
    info, command = machine(), command_line()
    report = {"machine": info, "command": command, "baseline": BASELINE, "args": vars(args), "variants": result,
              "diagnose_over_step": ratios}
    lines = header("Gradient diagnostics pass vs train step (TinyPolicy)", info, command, BASELINE) + [
        f"B={args.batch}, T={args.seq}, {args.image}x{args.image}; three objectives (BC, its camera term, its button "
        f"term); medians of {args.repeats} interleaved batches after {args.warmup} warm-up.",
        "",
        "| variant | ms | first call (s) |",
        "| --- | --- | --- |",
        *[f"| {name} | {r['median_ms']:.2f} | {r['first_call_s']:.1f} |" for name, r in result.items()],
        "",
        f"Diagnostics pass / train step: eager {ratios['eager']:.2f}x, compiled {ratios['compiled']:.2f}x.",
    ]
    write_results("research", report, lines, args.update_results)


if __name__ == "__main__":
    main()
