"""Train-step speed: mstudio compiled vs mstudio eager vs a MineStudio-style eager step, in one run.

All three train the same policy (same initial weights) on the same synthetic batches with behaviour cloning
(weight 0.01), AdamW (lr 1e-3, weight decay 0.1, warmup 10, clipping at 1.0). The MineStudio-style step is
what ``MineLightning`` does per batch: module forward, ``loss.backward()``, ``clip_grad_norm_``,
``torch.optim.AdamW`` + ``LambdaLR``, ``zero_grad``. Reports the median ms/step over ``--repeats`` timed
steps (after warm-up; the variants take turns, batch by batch), the compile time, the ratios, and the loss
after the run (the three must agree).

    python benchmarks/bench_step.py                      # TinyPolicy, B=8, T=16, 64x64
    python benchmarks/bench_step.py --batch 4 --seq 32 --repeats 50

Writes ``benchmarks/results/step_<policy>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import losses
import mstudio
from mstudio.data.synthetic import random_batch
from mstudio.models import TinyPolicy

RESULTS = Path(__file__).parent / "results"
HYPER = dict(lr=1e-3, weight_decay=0.1, warmup_steps=10, clip_norm=1.0, bc_weight=0.01)


def make_policy(name: str) -> torch.nn.Module:
    if name == "tiny":
        return TinyPolicy()
    raise SystemExit(f"unknown policy {name!r}")


def episode_batches(batch_size: int, seq_len: int, image_size: int, count: int) -> list[dict]:
    """``count`` consecutive windows per row (timestamps continue), so the memory is carried."""
    return [
        random_batch(batch_size, seq_len, image_size, seed=i, start=i * seq_len) for i in range(count)
    ]


def minestudio_style(policy: torch.nn.Module, batches: list[dict]):
    """A step as MineStudio's ``MineLightning.training_step`` + Lightning's optimizer loop runs it."""
    policy = copy.deepcopy(policy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=HYPER["lr"], weight_decay=HYPER["weight_decay"])
    warmup = HYPER["warmup_steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min((k + 1) / warmup, 1))
    memory = {"state": policy.initial_state(batches[0]["timestamp"].shape[0])}

    def step(batch):
        latents, state_out = policy(batch, memory["state"])
        out = losses.behavior_clone(batch, latents, {}, weight=HYPER["bc_weight"])
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.grad is not None], HYPER["clip_norm"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        memory["state"] = tuple(s.detach() for s in state_out)
        return out["loss"].detach()

    return step


def mstudio_step(policy: torch.nn.Module, batch_size: int, compile: bool):
    optimizer = mstudio.optim.adamw(
        HYPER["lr"], weight_decay=HYPER["weight_decay"], warmup_steps=HYPER["warmup_steps"], clip_norm=HYPER["clip_norm"]
    )
    objective = losses.weighted(losses.behavior_clone, HYPER["bc_weight"])
    train_step = mstudio.make_train_step(policy, objective, optimizer, compile=compile)
    holder = {"state": mstudio.init_state(policy, optimizer, batch_size)}

    def step(batch):
        holder["state"], metrics = train_step(holder["state"], batch)
        return metrics["loss"]

    return step


def run_interleaved(variants: dict, batches: list[dict], warmup: int) -> dict:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--image", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (compile happens here)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variant")
    args = parser.parse_args()

    torch.manual_seed(0)
    policy = make_policy(args.policy)
    batches = episode_batches(args.batch, args.seq, args.image, args.warmup + args.repeats)
    variants = {
        "minestudio_eager": minestudio_style(policy, batches),
        "mstudio_eager": mstudio_step(policy, args.batch, compile=False),
    }
    if not args.no_compile:
        variants["mstudio_compiled"] = mstudio_step(policy, args.batch, compile=True)
    results = run_interleaved(variants, batches, args.warmup)

    base = results["minestudio_eager"]["median_ms"]
    report = {
        "policy": args.policy,
        "batch": args.batch,
        "seq": args.seq,
        "image": args.image,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''} threads={torch.get_num_threads()}".strip(),
        "hyper": HYPER,
        "results": results,
        "speedup_vs_minestudio": {name: base / r["median_ms"] for name, r in results.items()},
    }
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"step_{args.policy}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Train step, {args.policy} policy, B={args.batch} T={args.seq} {args.image}x{args.image}, torch {torch.__version__}",
        "",
        "| variant | median ms/step | speed vs MineStudio-style | first call (s) | final loss |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['median_ms']:.2f} | {base / r['median_ms']:.2f}x | {r['first_call_s']:.2f} | {r['final_loss']:.6f} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
