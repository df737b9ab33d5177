"""Data-parallel step cost: 2 processes (gloo, B/2 rows each) vs 1 process (B rows), and what the all-reduce costs.

Two worker processes are spawned once and hold every variant (each compiled once), so the variants take turns
round by round in the same processes:

- ``1proc``: rank 0 alone trains on all B rows (``data_parallel=False``) with all the machine's threads, while
  rank 1 waits at a barrier (it sleeps there: no CPU): the single-process baseline. ``1proc_1thread``: the same
  with one thread (on a loaded machine, spinning OpenMP threads make the 2-thread run erratic).
- ``2proc_dp``: both ranks, B/2 rows each, one thread each, ``make_train_step(..., data_parallel=True)``.
- ``2proc_local``: the same without the all-reduce (``data_parallel=False``: the replicas drift apart, which
  does not matter for timing): ``2proc_dp - 2proc_local`` is what the all-reduce costs inside the step.
- ``allreduce``: :func:`mstudio.distributed.mean_across_ranks` alone (eager) on a tree shaped like the step's
  gradients plus its loss: the collective's own latency.

Reports the median ms/step of rank 0 over ``--rounds`` rounds of ``--steps`` steps (after ``--warmup`` steps per
variant, compilation included) and, as a correctness check, the relative error of the 2-process updates against
1 process (same batches, same initial weights).

    python benchmarks/bench_distributed.py                  # TinyPolicy, B=8, T=16, 64x64, eager and compiled
    python benchmarks/bench_distributed.py --no-compile --rounds 10

Writes ``benchmarks/results/latest/distributed_tiny.json`` and ``.md`` (``--update-results``: ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import losses
import mstudio
import mstudio.distributed as md
from bench_step import HYPER, add_results_argument, command_line, episode_batches, header, machine, write_results
from mstudio.models import TinyPolicy

BASELINE = ("1proc: one process training on all B rows with the machine's threads, in the same worker processes, "
            "taking turns with the 2-process variants round by round")
WORLD = 2


def _variants(args: argparse.Namespace, threads: int) -> dict:
    """name -> (processes, rows per process, data_parallel, compile, threads per process)."""
    modes = [False] if args.no_compile else [False, True]
    out = {}
    for compiled in modes:
        tag = "compiled" if compiled else "eager"
        out[f"1proc_{tag}"] = (1, args.batch, False, compiled, threads)
        out[f"1proc_1thread_{tag}"] = (1, args.batch, False, compiled, 1)
        out[f"2proc_dp_{tag}"] = (WORLD, args.batch // WORLD, True, compiled, max(1, threads // WORLD))
        out[f"2proc_local_{tag}"] = (WORLD, args.batch // WORLD, False, compiled, max(1, threads // WORLD))
    return out


def _trainer(policy: torch.nn.Module, rows: int, data_parallel: bool, compile: bool):
    optimizer = mstudio.optim.adamw(HYPER["lr"], weight_decay=HYPER["weight_decay"],
                                    warmup_steps=HYPER["warmup_steps"], clip_norm=HYPER["clip_norm"])
    objective = losses.weighted(losses.behavior_clone, HYPER["bc_weight"])
    step = mstudio.make_train_step(policy, objective, optimizer, compile=compile, data_parallel=data_parallel)
    return {"step": step, "state": mstudio.init_state(policy, optimizer, rows)}


def _worker(rank: int, args: argparse.Namespace, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    md.init_distributed("cpu", timeout=900)
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    policy = TinyPolicy(image_size=args.image)
    count = args.warmup + args.rounds * args.steps
    full = episode_batches(args.batch, args.seq, args.image, count)
    variants = _variants(args, threads)
    runs, times, first = {}, {name: [] for name in variants}, {}
    for name, (procs, rows, data_parallel, compiled, _) in variants.items():
        if procs == WORLD or rank == 0:
            runs[name] = _trainer(policy, rows, data_parallel, compiled)
    initial = {k: v.clone() for k, v in next(iter(runs.values()))["state"].params.items()}
    grads_like = {k: torch.randn_like(v) for k, v in initial.items() if not k.startswith("value.")}
    mean = md.mean_across_ranks()
    allreduce_times: list[float] = []
    cursor = {name: 0 for name in variants}

    def run(name: str, steps: int, timed: bool) -> None:
        procs, rows, _, _, n_threads = variants[name]
        holder = runs.get(name)
        torch.set_num_threads(n_threads)
        dist.barrier()
        if holder is not None:
            for _ in range(steps):
                batch = full[cursor[name]]
                if procs == WORLD:  # this rank's rows
                    own = slice(rank * rows, (rank + 1) * rows)
                    batch = {k: ({kk: vv[own] for kk, vv in v.items()} if isinstance(v, dict) else v[own])
                             for k, v in batch.items()}
                start = time.perf_counter()
                holder["state"], metrics = holder["step"](holder["state"], batch)
                metrics["loss"].item()  # wait for the step (a no-op sync on CPU)
                elapsed = time.perf_counter() - start
                cursor[name] += 1
                (times[name] if timed else first.setdefault(name, [])).append(elapsed)
        dist.barrier()

    for name in variants:
        run(name, args.warmup, timed=False)
    torch.set_num_threads(max(1, threads // WORLD))
    for _ in range(args.rounds):
        for name in variants:
            run(name, args.steps, timed=True)
        dist.barrier()
        for _ in range(args.steps):
            start = time.perf_counter()
            reduced = mean((grads_like, torch.ones(())))
            reduced[1].item()
            allreduce_times.append(time.perf_counter() - start)
    md.shutdown_distributed()
    if rank != 0:
        return
    results = {name: {"median_ms": 1e3 * statistics.median(t), "first_call_s": first[name][0],
                      "rows_per_process": variants[name][1], "processes": variants[name][0],
                      "threads_per_process": variants[name][4]}
               for name, t in times.items()}
    results["allreduce_eager"] = {"median_ms": 1e3 * statistics.median(allreduce_times), "first_call_s": None,
                                  "rows_per_process": None, "processes": WORLD,
                                  "threads_per_process": max(1, threads // WORLD)}
    for tag in ("eager", "compiled"):
        one, dp = runs.get(f"1proc_{tag}"), runs.get(f"2proc_dp_{tag}")
        if one is None:
            continue
        num = sum(((dp["state"].params[k] - one["state"].params[k]) ** 2).sum() for k in initial)
        den = sum(((one["state"].params[k] - initial[k]) ** 2).sum() for k in initial)
        results[f"2proc_dp_{tag}"]["relative_update_error_vs_1proc"] = float((num / den).sqrt())
    grad_numel = sum(v.numel() for v in grads_like.values())
    Path(out).write_text(json.dumps({"results": results, "threads": threads, "gradient_numel": grad_numel}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="rows per step in total (B); each of 2 ranks takes B/2")
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--image", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8, help="rounds of interleaved variants")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (compile happens here)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variants")
    add_results_argument(parser)
    args = parser.parse_args()
    if args.batch % WORLD:
        raise SystemExit(f"--batch must be divisible by {WORLD}, got {args.batch}")


    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rank0.json")
        torch.multiprocessing.spawn(_worker, args=(args, port, out), nprocs=WORLD, join=True)
        measured = json.loads(Path(out).read_text())
    results = measured["results"]

    report = {"command": command_line(), "args": vars(args), "machine": machine(), "hyper": HYPER,
              "baseline": BASELINE, "gradient_numel": measured["gradient_numel"], "results": results}
    title = (f"Data-parallel step, tiny policy, B={args.batch} in total (2 processes: B/2 each), T={args.seq}, "
             f"{args.image}x{args.image}")
    lines = header(title, report["machine"], report["command"], BASELINE) + [
        f"Gradients all-reduced per step: {measured['gradient_numel']} float32 values "
        f"({measured['gradient_numel'] * 4 / 2**20:.2f} MiB) plus the loss and metrics. Load average at the end: "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} (other jobs share the cores).",
        "",
        "| variant | processes x rows (threads each) | median ms/step | vs 1proc | vs 1proc_1thread | first call (s) "
        "| rel. update error vs 1proc |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        tag = "compiled" if name.endswith("compiled") else "eager"
        ratios = []
        for base_name in (f"1proc_{tag}", f"1proc_1thread_{tag}"):
            base = results.get(base_name, {}).get("median_ms")
            ratios.append(f"{r['median_ms'] / base:.2f}x" if base and name != "allreduce_eager" else "")
        rows = r["rows_per_process"] if r["rows_per_process"] else "-"
        first = f"{r['first_call_s']:.2f}" if r["first_call_s"] is not None else ""
        error = r.get("relative_update_error_vs_1proc")
        lines.append(f"| {name} | {r['processes']} x {rows} ({r['threads_per_process']}) | {r['median_ms']:.2f} | "
                     f"{' | '.join(ratios)} | {first} | {'' if error is None else f'{error:.2e}'} |")
    for tag in ("eager", "compiled"):
        if f"2proc_dp_{tag}" in results:
            cost = results[f"2proc_dp_{tag}"]["median_ms"] - results[f"2proc_local_{tag}"]["median_ms"]
            lines.append(f"\nAll-reduce inside the {tag} step (2proc_dp - 2proc_local): {cost:.2f} ms/step.")
    write_results("distributed_tiny", report, lines, args.update_results)


if __name__ == "__main__":
    main()
