"""AdamW alone, four ways, over a VPT preset's parameters: what the optimizer costs in each train step.

Every variant clips the same gradients to global norm 1.0 and applies AdamW (lr 1e-3, weight decay 0.1) to
parameters laid out as the compiled step packs them (:mod:`mstudio.train.packing`: the small tensors in one flat
buffer, the large ones as they are):

- ``mstudio_compiled``: ``mstudio.optim.adamw``'s pure update under ``torch.compile`` (inductor's kernels: the
  compiled step's optimizer, without its non-finite guard);
- ``mstudio_donated``: the same update inside ``mstudio.optim.donated()`` (the eager step as the Trainer runs it:
  torch's fused AdamW kernel, in place);
- ``torch_foreach`` and ``torch_single``: ``clip_grad_norm_`` + ``torch.optim.AdamW`` with ``foreach=True`` /
  ``False`` (MineStudio's optimizer on CPU is the single-tensor one).

Timed in interleaved rounds (shuffled order, one untimed call per turn, :func:`mstudio.bench.run_rounds`).

    python benchmarks/bench_optimizer.py                       # VPT tiny
    python benchmarks/bench_optimizer.py --size small --update-results
"""

from __future__ import annotations

import argparse

import torch

from bench_step import add_results_argument, command_line, header, write_results
from mstudio.bench import machine, run_rounds, summarize, timed
from mstudio.bench._presets import SHAPES
from mstudio.bench._variants import Workload
from mstudio.optim import adamw, apply_updates, donated
from mstudio.train.packing import ALONE_FROM

LR, WEIGHT_DECAY, CLIP = 1e-3, 0.1, 1.0
BASELINE = "torch_single: clip_grad_norm_ + torch.optim.AdamW(foreach=False), MineStudio's optimizer on CPU"


def packed_layout(policy: torch.nn.Module) -> list[int]:
    """Element counts of the tensors the compiled step's optimizer sees: one buffer of every parameter under
    ``ALONE_FROM`` elements, then each larger one."""
    sizes = [p.numel() for p in policy.parameters()]
    return [sum(n for n in sizes if n < ALONE_FROM), *(n for n in sizes if n >= ALONE_FROM)]


def variants(sizes: list[int]) -> dict:
    """name -> a callable running one optimizer step (each on its own copy of the parameters and moments)."""
    generator = torch.Generator().manual_seed(0)
    start = {f"t{i}": torch.randn(n, generator=generator) for i, n in enumerate(sizes)}
    grads = {name: torch.randn(p.shape, generator=generator) for name, p in start.items()}
    optimizer = adamw(LR, weight_decay=WEIGHT_DECAY, clip_norm=CLIP)

    def pure_update(params, state):
        updates, state = optimizer.update(grads, state, params)
        return apply_updates(params, updates), state

    compiled = torch.compile(pure_update, fullgraph=True)
    held = {name: {"params": {k: v.clone() for k, v in start.items()}} for name in ("compiled", "donated")}
    for slot in held.values():
        slot["state"] = optimizer.init(slot["params"])

    def mstudio_compiled():
        slot = held["compiled"]
        slot["params"], slot["state"] = compiled(slot["params"], slot["state"])

    def mstudio_donated():
        slot = held["donated"]
        with donated():
            updates, slot["state"] = optimizer.update({k: g.clone() for k, g in grads.items()}, slot["state"],
                                                      slot["params"])
            slot["params"] = apply_updates(slot["params"], updates)

    def torch_step(foreach: bool):
        params = [torch.nn.Parameter(p.clone()) for p in start.values()]
        torch_optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, foreach=foreach)

        def step():
            for p, g in zip(params, grads.values()):
                p.grad = g.clone()
            torch.nn.utils.clip_grad_norm_(params, CLIP, foreach=foreach)
            torch_optimizer.step()

        return step

    # The gradient copies are part of every variant but the compiled one, which takes the gradients as they are;
    # they are timed (as a step hands each optimizer fresh gradients): ~1.0 ms for small's 4.6 M elements here.
    return {"mstudio_compiled": mstudio_compiled, "mstudio_donated": mstudio_donated,
            "torch_foreach": torch_step(True), "torch_single": torch_step(False)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--repeats", type=int, default=40, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds")
    add_results_argument(parser)
    args = parser.parse_args()

    sizes = packed_layout(Workload.preset(args.size).policy())
    steps = variants(sizes)
    rounds = args.warmup + args.repeats
    seconds = run_rounds({name: timed(lambda _, step=step: step(), [None] * rounds) for name, step in steps.items()},
                         rounds, progress="rounds")
    results = {name: summarize(t, args.warmup) for name, t in seconds.items()}
    base = results["torch_single"]["median_ms"]
    report = {"command": command_line(), "args": vars(args), "machine": machine(), "tensors": sizes,
              "parameters": sum(sizes), "baseline": "torch_single", "results": results}
    lines = header(f"AdamW over VPT {args.size}'s {sum(sizes):,} parameters as the compiled step packs them "
                   f"({len(sizes)} tensors), four ways", report["machine"], report["command"], BASELINE) + [
        "| variant | median ms (min-max) | speed vs torch_single |",
        "| --- | ---: | ---: |",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['median_ms']:.2f} ({r['min_ms']:.2f}-{r['max_ms']:.2f}) | "
                     f"{base / r['median_ms']:.2f}x |")
    write_results(f"optimizer_{args.size}", report, lines, args.update_results)


if __name__ == "__main__":
    main()
