"""Loader throughput by store backend: frames/s of mstudio's loader over each kind of store, by worker count.

Writes one store of each kind in ``--stores`` holding the same episodes: ``episode`` (EpisodeStore, raw
memmaps), ``sharded`` (ShardedStore, raw frames) and ``sharded-video`` (ShardedStore, H.264 chunks at
``VideoCodec``'s defaults). The episodes are ``--episodes`` x ``--frames`` frames of ``bench_codec.blockworld``
(a rendered first-person walk: ``--render`` frames, rendered once, tiled at a different offset per episode)
at ``--image`` pixels square, with random actions.

Then, for ``--rounds`` rounds, every (store, workers) setting is measured once per round, in turn: interleaved,
so a change of load on a shared machine hits every setting alike. A measurement makes a fresh
``make_loader(store, T, RandomWindows(B))``, discards the first ``2 * workers + 1`` batches (worker start-up and
what the workers prefetched meanwhile) and times the next ``--batches`` batches; frames/s counts every step of
every window (``B * T`` per batch). The page cache is warm (the stores were just written), as during training,
and the stores are opened with ``checksums=False`` (the CRC check costs only a process's first read of a file).
The report gives each setting's median frames/s over the rounds, its range, and its ratio to the raw
EpisodeStore with the same workers in the same round (median over rounds), plus each store's bytes per frame on
disk and what MineStudio's documented corpus (160,495,936 frames) would take in it.

    python benchmarks/bench_loader.py                     # writes benchmarks/results/latest/loader.{json,md}
    python benchmarks/bench_loader.py --update-results    # the committed benchmarks/results/loader.*
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from bench_codec import blockworld
from bench_step import add_results_argument, command_line, header, machine, write_results
from mstudio.actions import N_BUTTONS, N_CAMERA
from mstudio.data import EpisodeStore, RandomWindows, make_loader
from mstudio.data.sharded import ShardedStore
from mstudio.data.video_codec import VideoCodec

BASELINE = "the raw EpisodeStore with the same number of workers, measured in the same round"
STORES = ("episode", "sharded", "sharded-video")
CORPUS_FRAMES = 160_495_936  # MineStudio's documented VPT corpus (vpt_data_spec.md 5.1)


def make_store(kind: str, root: Path, size: int):
    """An empty store of ``kind`` (one of :data:`STORES`) at ``root``."""
    if kind == "episode":
        return EpisodeStore.create(root, image_size=(size, size))
    return ShardedStore.create(root, image_size=(size, size), codec=VideoCodec() if kind == "sharded-video" else None)


def fill(store, base: np.ndarray, episodes: int, frames: int) -> None:
    """Append ``episodes`` episodes of ``frames`` frames tiled from ``base``, each from another offset."""
    rng = np.random.default_rng(0)
    for i in tqdm(range(episodes), desc=f"writing {type(store).__name__}", unit="episode", leave=False):
        store.append(f"walk-{i:04d}", {
            "frames": base[(np.arange(frames) + 37 * i) % len(base)],
            "buttons": rng.integers(0, N_BUTTONS, frames).astype(np.int16),
            "camera": rng.integers(0, N_CAMERA, frames).astype(np.uint8),
            "env_buttons": np.zeros(frames, np.uint32),
            "env_camera": np.zeros((frames, 2), np.float32),
            "flags": np.zeros(frames, np.uint8),
        })


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def frames_per_second(store, window: int, batch_size: int, workers: int, batches: int) -> float:
    """Steady-state frames/s of a fresh loader (see the module docstring)."""
    loader = make_loader(store, window, RandomWindows(batch_size, seed=0), num_workers=workers)
    stream = iter(loader)
    for _ in range(2 * workers + 1):
        next(stream)
    start, frames = time.perf_counter(), 0
    for _ in range(batches):
        image = next(stream)["image"]
        frames += image.shape[0] * image.shape[1]
    elapsed = time.perf_counter() - start
    stream.close()  # ends the DataLoader iteration; its workers go with the loader
    return frames / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stores", nargs="+", choices=STORES, default=list(STORES))
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--image", type=int, default=128)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--frames", type=int, default=1024)
    parser.add_argument("--render", type=int, default=128)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    add_results_argument(parser)
    args = parser.parse_args()
    per_epoch = args.episodes * -(-args.frames // args.window) // args.batch_size
    if per_epoch < 2 * max(args.workers) + 1 + args.batches:
        needed = 2 * max(args.workers) + 1 + args.batches
        parser.error(f"an epoch has {per_epoch} batches; a measurement needs {needed} (more --episodes or --frames, "
                     f"or fewer --batches)")
    base = blockworld(args.render, args.image)
    samples: dict[tuple[str, int], list[float]] = {(kind, w): [] for kind in args.stores for w in args.workers}
    ratios: dict[tuple[str, int], list[float]] = {key: [] for key in samples}
    with tempfile.TemporaryDirectory() as tmp:
        stores, sizes = {}, {}
        for kind in args.stores:
            stores[kind] = make_store(kind, Path(tmp) / kind, args.image)
            fill(stores[kind], base, args.episodes, args.frames)
            sizes[kind] = disk_bytes(Path(tmp) / kind) / (args.episodes * args.frames)
            # reopened without the CRC check, which a process pays only on its first read of each file (each
            # fresh loader's workers would pay it again here, while training pays it once per run)
            stores[kind] = type(stores[kind]).open(Path(tmp) / kind, checksums=False)
        for _ in tqdm(range(args.rounds), desc="rounds", unit="round"):
            for workers in args.workers:
                measured = {kind: frames_per_second(stores[kind], args.window, args.batch_size, workers, args.batches)
                            for kind in args.stores}
                for kind, fps in measured.items():
                    samples[kind, workers].append(fps)
                    if "episode" in measured:
                        ratios[kind, workers].append(fps / measured["episode"])
    rows = [{"store": kind, "workers": w, "frames_per_s": statistics.median(samples[kind, w]),
             "min": min(samples[kind, w]), "max": max(samples[kind, w]), "samples": samples[kind, w],
             "ratio_to_episode_store": statistics.median(ratios[kind, w]) if ratios[kind, w] else None}
            for kind in args.stores for w in args.workers]
    storage = [{"store": kind, "bytes_per_frame": sizes[kind], "corpus_tb": sizes[kind] * CORPUS_FRAMES / 1e12}
               for kind in args.stores]
    info, command = machine(), command_line()
    report = {"machine": info, "command": command, "baseline": BASELINE, "args": vars(args), "rows": rows,
              "storage": storage}
    title = (f"Loader frames/s by store ({args.image}x{args.image}, B={args.batch_size}, T={args.window}, "
             f"warm page cache, median of {args.rounds} interleaved rounds)")
    lines = header(title, info, command, BASELINE) + [
        "| store | workers | frames/s | range | vs EpisodeStore |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['store']} | {r['workers']} | {r['frames_per_s']:,.0f} | {r['min']:,.0f}-{r['max']:,.0f} | "
              + (f"{r['ratio_to_episode_store']:.2f}x |" if r["ratio_to_episode_store"] is not None else "- |")
              for r in rows]
    lines += ["", f"| store | bytes/frame on disk | corpus ({CORPUS_FRAMES:,} frames) |", "| --- | ---: | ---: |"]
    lines += [f"| {s['store']} | {s['bytes_per_frame']:,.0f} | {s['corpus_tb']:.2f} TB |" for s in storage]
    write_results("loader", report, lines, args.update_results)


if __name__ == "__main__":
    main()
