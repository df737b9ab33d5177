"""The compiled VPT step built three ways, timed against each other: the default, the optimizer tensor by tensor
(``pack_optimizer=False``) and the C++ wrapper (``compile_options={"cpp_wrapper": True}``).

Every variant is built in this process on the same VPT policy, batches and hyper-parameters as ``mstudio bench``,
each compiled cold in an empty inductor cache directory of its own; the first built also pays the process's
one-time compile costs (inductor's imports, the compile workers' start), so its cold compile is over-stated here
(``mstudio bench`` times cold compiles in fresh processes). Then they are timed in interleaved rounds (shuffled
order, one untimed lead step per turn, :func:`mstudio.bench.run_rounds`). See :mod:`mstudio.train.packing` and
``make_train_step(compile_options=...)``.

    python benchmarks/bench_compiled_variants.py                        # VPT tiny, every variant
    python benchmarks/bench_compiled_variants.py --size small --repeats 20 --update-results
    python benchmarks/bench_compiled_variants.py --variants default per_tensor
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

#: ``make_train_step`` arguments of each variant (the rest are its defaults).
VARIANTS = {
    "default": {},
    "per_tensor": {"pack_optimizer": False},
    "cpp_wrapper": {"compile_options": {"cpp_wrapper": True}},
}
BASELINE = "default: make_train_step with its default arguments, in the same rounds"


def build(arguments: dict, workload: Workload, batch: dict):
    """``(step, first_call_s)``: the compiled step (``batch -> loss``) of ``workload``'s policy built with
    ``arguments``, after its first call."""
    step = mstudio_step(workload.policy(), workload.batch, compile=True, **arguments)
    start = time.perf_counter()
    step(batch)
    return step, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="which variants to build (default first, if chosen, as the baseline)")
    parser.add_argument("--repeats", type=int, default=40, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds")
    add_results_argument(parser)
    args = parser.parse_args()

    workload = Workload.preset(args.size)
    batches = episode_batches(workload.batch, workload.seq, workload.image, args.warmup + args.repeats + 1)
    steps, compile_s = {}, {}
    for name in args.variants:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"bench-variants-{name}-")
        steps[name], compile_s[name] = build(VARIANTS[name], workload, batches[0])
    seconds = run_rounds({name: timed(step, batches[1:]) for name, step in steps.items()},
                         args.warmup + args.repeats, progress="rounds")
    results = {name: {**summarize(t, args.warmup), "cold_compile_s": compile_s[name]} for name, t in seconds.items()}

    baseline = "default" if "default" in results else args.variants[0]
    base = results[baseline]["median_ms"]
    report = {"command": command_line(), "args": vars(args), "machine": machine(), "hyper": HYPER,
              "variants": {name: VARIANTS[name] for name in args.variants}, "baseline": baseline,
              "results": results}
    lines = header(f"Compiled VPT {args.size} step, B={workload.batch} T={workload.seq} "
                   f"{workload.image}x{workload.image}: {len(args.variants)} ways of building it",
                   report["machine"], report["command"],
                   BASELINE if baseline == "default" else f"{baseline}, in the same rounds") + [
        f"| variant | make_train_step arguments | median ms/step (min-max) | speed vs {baseline} | "
        "cold compile + first step (s) |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | `{VARIANTS[name] or 'defaults'}` | {r['median_ms']:.2f} ({r['min_ms']:.2f}-"
                     f"{r['max_ms']:.2f}) | {base / r['median_ms']:.2f}x | {r['cold_compile_s']:.1f} |")
    lines += ["", f"- {args.variants[0]} is built first and also pays the process's one-time compile costs "
              "(imports, compile workers), so its cold compile is over-stated; mstudio bench times cold compiles "
              "in fresh processes"]
    write_results(f"compiled_variants_{args.size}", report, lines, args.update_results)


if __name__ == "__main__":
    main()
