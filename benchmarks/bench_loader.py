"""Loader throughput: frames/s of mstudio's DataLoader over an EpisodeStore, by image size and workers.

Fills a temporary store with synthetic episodes (64 episodes x 512 frames), then iterates random-window and
episode-continuous loaders (B=8, T=32) for ``--batches`` batches each, ``--repeats`` times, and reports the
median frames/s. The page cache is warm (the store was just written), as it is during training.

    python benchmarks/bench_loader.py                    # writes benchmarks/results/latest/loader.{json,md}
    python benchmarks/bench_loader.py --update-results   # the committed benchmarks/results/loader.*
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench_step import add_results_argument, command_line, header, machine, write_results
from mstudio.data import EpisodeContinuous, EpisodeStore, RandomWindows, fill_store, make_loader

BASELINE = "none: absolute rates, to compare with a train step's frames/s (benchmarks/results/step_*.md)"


def frames_per_second(loader, batches: int) -> float:
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    start, frames = time.perf_counter(), 0
    for _, batch in zip(range(batches), it):
        frames += batch["image"].shape[0] * batch["image"].shape[1]
    return frames / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    add_results_argument(parser)
    args = parser.parse_args()
    rows = []
    for size in (64, 128):
        with tempfile.TemporaryDirectory() as tmp:
            store = EpisodeStore.create(Path(tmp) / "store", image_size=(size, size))
            fill_store(store, episodes=64, frames=512, seed=0)
            for continuous in (False, True):
                for workers in (0, 2):
                    sampler = EpisodeContinuous(8) if continuous else RandomWindows(8)
                    loader = make_loader(store, 32, sampler, num_workers=workers)
                    fps = statistics.median(frames_per_second(loader, args.batches) for _ in range(args.repeats))
                    rows.append({"image": size, "continuous": continuous, "workers": workers, "frames_per_s": fps})
                    print(rows[-1])
    info, command = machine(), command_line()
    report = {"machine": info, "command": command, "baseline": BASELINE, "args": vars(args), "rows": rows}
    lines = header("Loader frames/s (B=8, T=32, warm page cache)", info, command, BASELINE) + [
        "| image | sampler | workers | frames/s |", "| ---: | --- | ---: | ---: |"]
    lines += [f"| {r['image']} | {'continuous' if r['continuous'] else 'random'} | {r['workers']} | {r['frames_per_s']:,.0f} |"
              for r in rows]
    write_results("loader", report, lines, args.update_results)


if __name__ == "__main__":
    main()
