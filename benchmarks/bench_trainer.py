"""The Trainer's own cost: ms/step of ``Trainer.train`` (loader, progress bar, logging every N steps) vs the
bare train step on the same batches, in one run, rounds interleaved.

Both variants call the same step function (one compile); the bare one iterates a list of batches read in
advance from a loader built exactly like the trainer's (same store, sampler and seed: the same batches in the
same order) and syncs once per round. Reports the median per-step time of each and the loop's overhead.

    python benchmarks/bench_trainer.py                       # VPT tiny, B=4, T=16, compiled
    python benchmarks/bench_trainer.py --no-compile --rounds 20

Writes ``benchmarks/results/latest/trainer_<compiled|eager>.json`` and ``.md`` (``--update-results``:
``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

from bench_step import add_results_argument, command_line, header, machine, write_results
from mstudio.trainer import Trainer, config_from_dict
from mstudio.trainer.build import build_loaders
from mstudio.trainer.tensorboard import MetricWriter

BASELINE = "bare: the same compiled step over the same batches read in advance, timed in the same rounds"


def _config(args: argparse.Namespace, out: str) -> dict:
    return {"data": {"batch_size": args.batch, "window": args.seq},
            "run": {"out": out, "name": "bench", "compile": not args.no_compile, "max_steps": 10**9,
                    "log_every": args.log_every, "val_every": 0, "ckpt_every": 0}}


def measure(args: argparse.Namespace, out: str) -> dict:
    """Median ms/step of the trainer loop and of the bare step, over ``args.rounds`` interleaved rounds."""
    trainer = Trainer(config_from_dict(_config(args, out)))
    writer = MetricWriter(Path(out) / "events")
    loader, _ = build_loaders(trainer.config.data, trainer.loader.dataset.store, trainer.config.run.seed)
    total = args.warmup + args.rounds * args.steps
    batches = list(itertools.islice(itertools.chain.from_iterable(iter(loader) for _ in itertools.count()), total))
    start = time.perf_counter()
    trainer.train(args.warmup, writer)  # compiles (once: the bare variant calls the same step)
    first_call_s = time.perf_counter() - start
    bare_state = trainer.state
    for batch in batches[: args.warmup]:
        bare_state, metrics = trainer.step(bare_state, batch)
    times: dict[str, list[float]] = {"trainer": [], "bare": []}
    for r in range(args.rounds):
        chunk = batches[args.warmup + r * args.steps: args.warmup + (r + 1) * args.steps]
        for name in (("trainer", "bare") if r % 2 == 0 else ("bare", "trainer")):
            start = time.perf_counter()
            if name == "trainer":
                trainer.train(args.steps, writer)
            else:
                for batch in chunk:
                    bare_state, metrics = trainer.step(bare_state, batch)
                metrics["loss"].item()
            times[name].append((time.perf_counter() - start) / args.steps)
    writer.close()
    medians = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    return {"first_call_s": first_call_s, "median_ms_per_step": medians,
            "overhead": medians["trainer"] / medians["bare"] - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="steps per round and variant")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (compile happens here)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true")
    add_results_argument(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        result = measure(args, out)
    info, command = machine(), command_line()
    report = {"machine": info, "command": command, "baseline": BASELINE, "args": vars(args), **result}
    ms = result["median_ms_per_step"]
    lines = header("Trainer loop vs bare step (VPT tiny)", info, command, BASELINE) + [
        f"B={args.batch}, T={args.seq}, {'compiled' if not args.no_compile else 'eager'}, log every "
        f"{args.log_every} steps; medians of {args.rounds} rounds of {args.steps} steps per variant.",
        "",
        "| variant | ms/step |",
        "| --- | --- |",
        f"| bare step | {ms['bare']:.2f} |",
        f"| Trainer.train | {ms['trainer']:.2f} |",
        "",
        f"Loop overhead: {100 * result['overhead']:+.1f} %. First call (compile): {result['first_call_s']:.1f} s.",
    ]
    write_results(f"trainer_{'eager' if args.no_compile else 'compiled'}", report, lines, args.update_results)


if __name__ == "__main__":
    main()
