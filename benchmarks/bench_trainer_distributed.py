"""The Trainer data-parallel: ``torchrun --nproc_per_node=2 -m mstudio train`` vs one process, on the default config.

Runs ``mstudio train`` (VPT tiny, built-in synthetic store, T=16, eager) as whole processes, taking turns round by
round so that the machine's load falls on every variant alike:

- ``1proc``: one process, ``B = 2 * rows`` rows per step, the machine's threads (torch's default).
- ``1proc_1thread``: the same on one thread (``OMP_NUM_THREADS=1``).
- ``2proc``: ``torchrun --standalone --nproc_per_node=2``, ``rows`` rows per rank, one thread each (torchrun's
  default): the same rows per step in total.

Each run logs ``train/steps_per_s`` every ``--log-every`` steps; the first window (start-up, first-call checks) is
dropped and the median of the others is the run's ms/step. Then 2 spawned processes time
:func:`mstudio.distributed.mean_across_ranks` alone (gloo) on a tree shaped like VPT tiny's parameters: the
collective the data-parallel step adds.

    python benchmarks/bench_trainer_distributed.py                 # 3 rounds of 25 steps
    python benchmarks/bench_trainer_distributed.py --rounds 1 --steps 15

Prints a Markdown table (nothing is written: the numbers on a shared 2-core machine are noisy; quote them with the
load average printed under the table).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(variant: str, out: Path, name: str, rows: int, steps: int, log_every: int) -> float:
    """One ``mstudio train`` run of ``variant``; its median ms/step after the first logged window."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    total = rows * 2 if variant.startswith("1proc") else rows
    config = out / f"{name}.toml"
    config.write_text(f"[data]\nbatch_size = {total}\n[run]\nlog_every = {log_every}\nval_every = 0\n"
                      f"ckpt_every = 0\ncompile = false\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("OMP_NUM_THREADS", None)
    launcher = [sys.executable, "-m", "mstudio"]
    if variant == "2proc":
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mstudio"]
    if variant == "1proc_1thread":
        env["OMP_NUM_THREADS"] = "1"
    subprocess.run([*launcher, "train", "--config", str(config), "--out", str(out), "--name", name,
                    "--max-steps", str(steps)], env=env, check=True, capture_output=True)
    events = EventAccumulator(str(out / name))
    events.Reload()
    rates = [event.value for event in events.Scalars("train/steps_per_s")][1:]
    return 1000 * statistics.median(1 / rate for rate in rates)


def _allreduce_worker(rank: int, port: int, repeats: int, result: "multiprocessing.Queue") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    sys.path.insert(0, str(REPO))  # as PYTHONPATH for the runs: the checkout, whatever is installed
    import torch

    import mstudio.distributed as md
    from mstudio.models import VPTPolicy

    torch.set_num_threads(1)
    md.init_distributed("cpu", timeout=300)
    grads = {name: torch.randn_like(p) for name, p in VPTPolicy.from_preset("tiny").named_parameters()}
    mean = md.mean_across_ranks()
    times = []
    for _ in range(repeats + 3):
        torch.distributed.barrier()
        start = time.perf_counter()
        mean(grads)
        times.append(time.perf_counter() - start)
    if rank == 0:
        result.put((1000 * statistics.median(times[3:]), sum(g.numel() for g in grads.values())))
    md.shutdown_distributed()


def _allreduce_ms(repeats: int) -> tuple[float, int]:
    """Median ms of one ``mean_across_ranks`` over VPT tiny's gradients on 2 ranks, and the number of values."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    result = context.Queue()
    workers = [context.Process(target=_allreduce_worker, args=(rank, port, repeats, result)) for rank in range(2)]
    for worker in workers:
        worker.start()
    value = result.get(timeout=600)
    for worker in workers:
        worker.join()
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=4, help="rows per rank (1 process takes 2x)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30, help="timed all-reduces")
    args = parser.parse_args()
    variants = ("1proc", "1proc_1thread", "2proc")
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    with tempfile.TemporaryDirectory(prefix="bench-trainer-dp-") as out:
        for round_ in range(args.rounds):
            for variant in variants:
                times[variant].append(_run(variant, Path(out), f"{variant}-{round_}", args.rows, args.steps,
                                           args.log_every))
                print(f"round {round_} {variant}: {times[variant][-1]:.0f} ms/step", file=sys.stderr)
    allreduce, values = _allreduce_ms(args.repeats)
    base = statistics.median(times["1proc"])
    print(f"# Trainer, VPT tiny, {2 * args.rows} rows per step in total, T=16, eager\n")
    print(f"Command: `python benchmarks/bench_trainer_distributed.py --rows {args.rows} --steps {args.steps} "
          f"--rounds {args.rounds}`\n")
    print("| variant | processes x rows (threads each) | median ms/step | vs 1proc |\n| --- | --- | ---: | ---: |")
    layout = {"1proc": f"1 x {2 * args.rows} (default)", "1proc_1thread": f"1 x {2 * args.rows} (1)",
              "2proc": f"2 x {args.rows} (1)"}
    for variant in variants:
        median = statistics.median(times[variant])
        print(f"| {variant} | {layout[variant]} | {median:.0f} | {median / base:.2f}x |")
    print(f"\nmean_across_ranks on VPT tiny's gradients ({values} float32, {values * 4 / 2**20:.2f} MiB), 2 ranks, "
          f"gloo: {allreduce:.1f} ms median. Load average: {', '.join(f'{x:.2f}' for x in os.getloadavg())}.")


if __name__ == "__main__":
    main()
