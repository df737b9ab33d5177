"""The compiled VPT step with its optimizer packed into flat buffers (the default) against tensor by tensor.

Both steps (``make_train_step(pack_optimizer=True / False)``) are built in this process on the same VPT policy,
batches and hyper-parameters as ``mstudio bench``, each compiled cold in an empty inductor cache directory of its
own (so each pays the one-time precompilation of inductor's C++ headers); the first built, ``packed``, also
pays the process's one-time compile costs (inductor's imports, the compile workers' start), so its cold compile
is over-stated here (``mstudio bench`` times cold compiles in fresh processes); then they are timed in interleaved rounds (shuffled order, one untimed lead step per turn,
:func:`mstudio.bench.run_rounds`). See :mod:`mstudio.train.packing`.

    python benchmarks/bench_packing.py                        # VPT tiny
    python benchmarks/bench_packing.py --size small --repeats 20 --update-results
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from bench_step import add_results_argument, command_line, header, write_results
from mstudio.bench import HYPER, episode_batches, machine, run_rounds, summarize, timed
from mstudio.bench._presets import SHAPES
from mstudio.bench._variants import Workload, mstudio_step

VARIANTS = {"packed": True, "per_tensor": False}
FIRST_BUILT = ("packed is built first and also pays the process's one-time compile costs (imports, compile "
               "workers), so its cold compile is over-stated; mstudio bench times cold compiles in fresh processes")
BASELINE = "per_tensor: the same compiled step with make_train_step(pack_optimizer=False), in the same rounds"


def build(pack: bool, workload: Workload, batch: dict):
    """``(step, first_call_s)``: the compiled step (``batch -> loss``) of ``workload``'s policy, after its first
    call."""
    step = mstudio_step(workload.policy(), workload.batch, compile=True, pack_optimizer=pack)
    start = time.perf_counter()
    step(batch)
    return step, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--repeats", type=int, default=40, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds")
    add_results_argument(parser)
    args = parser.parse_args()

    workload = Workload.preset(args.size)
    batch_size, seq_len = workload.batch, workload.seq
    batches = episode_batches(batch_size, seq_len, workload.image, args.warmup + args.repeats + 1)
    steps, compile_s = {}, {}
    for name, pack in VARIANTS.items():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"bench-packing-{name}-")
        steps[name], compile_s[name] = build(pack, workload, batches[0])
    seconds = run_rounds({name: timed(step, batches[1:]) for name, step in steps.items()},
                         args.warmup + args.repeats, progress="rounds")
    results = {name: {**summarize(t, args.warmup), "cold_compile_s": compile_s[name]} for name, t in seconds.items()}

    base = results["per_tensor"]["median_ms"]
    report = {"command": command_line(), "args": vars(args), "machine": machine(), "hyper": HYPER,
              "baseline": BASELINE, "results": results}
    lines = header(f"Compiled VPT {args.size} step, B={batch_size} T={seq_len} {workload.image}x{workload.image}: "
                   "packed optimizer vs per tensor",
                   report["machine"], report["command"], BASELINE) + [
        "| variant | median ms/step (min-max) | speed vs per_tensor | cold compile + first step (s) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['median_ms']:.2f} ({r['min_ms']:.2f}-{r['max_ms']:.2f}) | "
                     f"{base / r['median_ms']:.2f}x | {r['cold_compile_s']:.1f} |")
    lines += ["", f"- {FIRST_BUILT}"]
    write_results(f"packing_{args.size}", report, lines, args.update_results)


if __name__ == "__main__":
    main()
