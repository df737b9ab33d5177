"""The sharded-state step (:mod:`mstudio.train.sharded`) vs the replicated data-parallel step on 2 CPU ranks.

Two spawned processes (gloo, one thread each) build VPT tiny (the Trainer's default policy, same seed), then time
both eager steps taking turns step by step on the same rows (``--rows`` per rank, T=``--window``), so the machine's
load falls on both alike; the first ``--warmup`` steps of each are dropped. Prints each rank's median ms/step, and
the parameter count and bytes of train state each rank holds between steps (parameters + Adam moments).

    python benchmarks/bench_sharded_step.py --steps 10

Nothing is written: on a shared 2-core machine the numbers are noisy; quote them with the load average printed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import time


def _worker(rank: int, port: int, args: argparse.Namespace, results: "multiprocessing.Queue") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    import optree
    import torch
    from torch.distributed.tensor import DTensor

    import mstudio
    import mstudio.distributed as md
    from mstudio.data.synthetic import random_batch
    from mstudio.train.sharded import make_sharded_train_step, shard_state, state_mesh
    from mstudio.trainer import build
    from mstudio.trainer.config import OptimizerConfig, PolicyConfig

    torch.set_num_threads(1)
    md.init_distributed("cpu", timeout=600)
    try:
        policy = build.build_policy(PolicyConfig(), seed=0)
        optimizer = build.build_optimizer(OptimizerConfig())
        objective = build.build_objective({"behavior_clone": 1.0})
        image = policy.config.img_shape[:2]
        batches = [random_batch(args.rows, args.window, image, seed=2 * i + rank, start=args.window * i)
                   for i in range(args.steps)]
        state_r = mstudio.init_state(policy, optimizer, args.rows, objective=objective)
        state_s = shard_state(state_r, state_mesh())
        replicated = mstudio.make_train_step(policy, objective, optimizer, compile=False, data_parallel=True)
        sharded = make_sharded_train_step(policy, objective, optimizer)
        times: dict[str, list[float]] = {"replicated": [], "sharded": []}
        for batch in batches:
            start = time.perf_counter()
            state_r, _ = replicated(state_r, batch)
            middle = time.perf_counter()
            state_s, _ = sharded(state_s, batch)
            times["replicated"].append(middle - start)
            times["sharded"].append(time.perf_counter() - middle)

        def held(state) -> int:  # bytes of parameters and Adam moments this rank holds
            tensors = [*state.params.values(), *optree.tree_leaves(state.opt_state)]
            local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors if isinstance(t, torch.Tensor)]
            return sum(t.numel() * t.element_size() for t in local)

        results.put((rank, {k: 1000 * statistics.median(v[args.warmup:]) for k, v in times.items()},
                     sum(p.numel() for p in state_r.params.values()), held(state_r), held(state_s)))
    finally:
        md.shutdown_distributed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--window", type=int, default=16)
    args = parser.parse_args()
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup must be in [0, --steps), got {args.warmup} with --steps {args.steps}")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_worker, args=(rank, port, args, results)) for rank in range(2)]
    for process in processes:
        process.start()
    rows = sorted(results.get(timeout=1800) for _ in processes)
    for process in processes:
        process.join()
    print("| rank | replicated ms/step | sharded ms/step | params | state bytes replicated | state bytes sharded |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for rank, ms, count, full, shard in rows:
        print(f"| {rank} | {ms['replicated']:.0f} | {ms['sharded']:.0f} | {count} | {full} | {shard} |")
    print(f"\nload average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
