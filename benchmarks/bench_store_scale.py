"""ShardedStore at scale: bulk-append rate, open time, maps and open files for many tiny episodes, and read frames/s
with raw against H.264 frames.

Part 1 writes ``--episodes`` episodes of 2 frames of 8x8 into a ShardedStore with ``append_many`` (timed), then
times ``ShardedStore.open``, reads one random frame range of ``--reads`` random episodes, and reports the process's
memory maps (``/proc/self/maps`` lines) and open shard files before and after, and the time of ``verify()``. For
comparison it times ``--single`` one-by-one appends to a ShardedStore and to an EpisodeStore, interleaved in
``--rounds`` rounds (their ratio is the figure to read: each is per-append cost including fsync).

Part 2 writes ``--video-episodes`` episodes of ``--frames`` frames of ``bench_codec.blockworld`` at ``--image``
pixels square into a raw and an H.264 (``VideoCodec()`` defaults) ShardedStore, then reads random ``--window``-frame
ranges from each, interleaved per round, opened with ``checksums=False``: frames/s of ``store.read`` in one process.

    python benchmarks/bench_store_scale.py                    # writes benchmarks/results/latest/store_scale.{json,md}
    python benchmarks/bench_store_scale.py --update-results   # the committed benchmarks/results/store_scale.*
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_codec import blockworld
from bench_step import add_results_argument, command_line, header, machine, write_results
from mstudio.data import EpisodeStore, ShardedStore
from mstudio.data.video_codec import VideoCodec

BASELINE = "EpisodeStore.append for one-by-one appends; raw ShardedStore frames for reads (same rounds)"


def episode(n: int, size: int, frames: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """An episode of ``n`` frames (``frames`` if given, else zeros) with null actions."""
    return {"frames": np.zeros((n, size, size, 3), np.uint8) if frames is None else frames,
            "buttons": np.zeros(n, np.int16), "camera": np.full(n, 60, np.uint8),
            "env_buttons": np.zeros(n, np.uint32), "env_camera": np.zeros((n, 2), np.float32),
            "flags": np.ones(n, np.uint8)}


def maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def open_files(root: Path) -> int:
    prefix = str(root.resolve())
    return sum(os.path.realpath(f"/proc/self/fd/{fd}").startswith(prefix) for fd in os.listdir("/proc/self/fd"))


def scale(tmp: Path, args: argparse.Namespace) -> dict:
    """Part 1: many tiny episodes."""
    root = tmp / "many"
    store = ShardedStore.create(root, (8, 8), shard_bytes=args.shard_mib << 20)
    tiny = episode(2, 8)
    start = time.perf_counter()
    store.append_many((f"e{i}", tiny, {}) for i in range(args.episodes))
    bulk = args.episodes / (time.perf_counter() - start)
    maps_before, start = maps(), time.perf_counter()
    again = ShardedStore.open(root)
    open_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for i in rng.integers(0, args.episodes, args.reads):
        again.read(f"e{i}", 1, 2)
    reads = args.reads / (time.perf_counter() - start)
    result = {"episodes": args.episodes, "shards": len(list((root / "shards").iterdir())), "bulk_append_per_s": bulk,
              "open_s": open_s, "random_reads_per_s": reads, "maps_before_open": maps_before,
              "maps_after_reads": maps(), "open_shard_files": open_files(root / "shards")}
    start = time.perf_counter()
    result["verify_problems"] = len(again.verify())
    result["verify_s"] = time.perf_counter() - start
    single = {"sharded": [], "episode": []}
    stores = {"sharded": ShardedStore.create(tmp / "one-sharded", (8, 8)), "episode": EpisodeStore.create(tmp / "one-ep", (8, 8))}
    for r in range(args.rounds):
        for kind, target in stores.items():
            start = time.perf_counter()
            for i in range(args.single):
                target.append(f"r{r}-{i}", tiny)
            single[kind].append(args.single / (time.perf_counter() - start))
    result["single_append_per_s"] = {kind: statistics.median(v) for kind, v in single.items()}
    result["single_ratio_sharded_to_episode"] = statistics.median(
        a / b for a, b in zip(single["sharded"], single["episode"]))
    return result


def reads(tmp: Path, args: argparse.Namespace) -> dict:
    """Part 2: read frames/s, raw against H.264 frames."""
    base = blockworld(args.frames, args.image)
    stores = {}
    for kind, codec in (("raw", None), ("h264", VideoCodec())):
        store = ShardedStore.create(tmp / kind, (args.image, args.image), codec=codec)
        store.append_many((f"v{i}", episode(args.frames, args.image, np.roll(base, 7 * i, axis=0)), {})
                          for i in range(args.video_episodes))
        stores[kind] = ShardedStore.open(tmp / kind, checksums=False)
    rng = np.random.default_rng(1)
    rates = {kind: [] for kind in stores}
    for _ in range(args.rounds):
        picks = [(f"v{rng.integers(args.video_episodes)}", int(rng.integers(args.frames - args.window)))
                 for _ in range(args.windows)]
        for kind, store in stores.items():
            start = time.perf_counter()
            for episode_id, first in picks:
                store.read(episode_id, first, first + args.window)
            rates[kind].append(args.windows * args.window / (time.perf_counter() - start))
    size = {kind: sum(p.stat().st_size for p in (tmp / kind / "shards").iterdir()) / (args.video_episodes * args.frames)
            for kind in stores}
    return {"frames_per_s": {k: statistics.median(v) for k, v in rates.items()},
            "ratio_h264_to_raw": statistics.median(a / b for a, b in zip(rates["h264"], rates["raw"])),
            "shard_bytes_per_frame": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=100_000)
    parser.add_argument("--shard-mib", type=int, default=8)
    parser.add_argument("--reads", type=int, default=20_000)
    parser.add_argument("--single", type=int, default=300)
    parser.add_argument("--image", type=int, default=128)
    parser.add_argument("--frames", type=int, default=256)
    parser.add_argument("--video-episodes", type=int, default=8)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    add_results_argument(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        many = scale(Path(tmp), args)
        read = reads(Path(tmp), args)
    info, command = machine(), command_line()
    report = {"machine": info, "command": command, "baseline": BASELINE, "args": vars(args), "scale": many,
              "reads": read}
    lines = header("ShardedStore at scale", info, command, BASELINE) + [
        f"| {many['episodes']:,} episodes of 2 frames 8x8 in {many['shards']} shards | |", "| --- | ---: |",
        f"| bulk append (append_many) | {many['bulk_append_per_s']:,.0f} episodes/s |",
        f"| open | {many['open_s']:.2f} s |",
        f"| random reads | {many['random_reads_per_s']:,.0f} reads/s |",
        f"| memory maps before open / after reads | {many['maps_before_open']} / {many['maps_after_reads']} |",
        f"| open shard files after reads | {many['open_shard_files']} |",
        f"| verify | {many['verify_s']:.1f} s ({many['verify_problems']} problems) |",
        f"| one-by-one append, sharded / episode store | {many['single_append_per_s']['sharded']:,.0f} / "
        f"{many['single_append_per_s']['episode']:,.0f} episodes/s "
        f"({many['single_ratio_sharded_to_episode']:.2f}x) |",
        "", f"| frames ({args.image}x{args.image}, {args.window}-frame reads) | frames/s | shard bytes/frame |",
        "| --- | ---: | ---: |"]
    lines += [f"| {kind} | {read['frames_per_s'][kind]:,.0f} | {read['shard_bytes_per_frame'][kind]:,.0f} |"
              for kind in read["frames_per_s"]]
    lines += ["", f"H.264 reads run at {read['ratio_h264_to_raw']:.3f}x raw's frames/s (median of per-round ratios)."]
    write_results("store_scale", report, lines, args.update_results)


if __name__ == "__main__":
    main()
