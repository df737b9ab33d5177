"""MineStudio LMDB importer throughput: frames/s from 224x224 H.264 chunks + action pickles into an EpisodeStore.

Synthesizes a MineStudio-format dataset (``--episodes`` episodes from ``--frames`` frames, 32-frame chunks), then
times ``import_minestudio`` at ``--resolution`` (default 128), ``--repeats`` times into fresh stores; reports the
median wall-clock rate and the process CPU time per frame (decode threads included), which says more than the
wall clock on a shared machine.

    python benchmarks/bench_import_minestudio.py                   # benchmarks/results/latest/import_minestudio.*
    python benchmarks/bench_import_minestudio.py --update-results  # the committed benchmarks/results/...
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench_step import add_results_argument, command_line, header, machine, write_results
from mstudio.data import EpisodeStore
from mstudio.data.minestudio_import import import_minestudio
from mstudio.data.minestudio_synth import synthesize_minestudio

BASELINE = "none: an absolute rate (MineStudio itself decodes at load time and has no importer)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    add_results_argument(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raw = synthesize_minestudio(Path(tmp) / "raw", episodes=args.episodes, frames=args.frames)
        rates, cpu = [], []
        for r in range(args.repeats):
            store = EpisodeStore.create(Path(tmp) / f"store{r}", image_size=(args.resolution,) * 2)
            start, start_cpu = time.perf_counter(), time.process_time()
            summary = import_minestudio(raw, store, resolution=args.resolution, progress=False)
            rates.append(summary.frames / (time.perf_counter() - start))
            cpu.append((time.process_time() - start_cpu) / summary.frames * 1e3)
    info, command = machine(), command_line()
    report = {"machine": info, "command": command, "baseline": BASELINE, "args": vars(args), "frames": summary.frames,
              "frames_per_s": statistics.median(rates), "cpu_ms_per_frame": statistics.median(cpu),
              "all": rates, "all_cpu_ms_per_frame": cpu}
    title = f"MineStudio LMDB import (224x224 H.264 chunks -> {args.resolution}x{args.resolution} store)"
    lines = header(title, info, command, BASELINE) + [
        "| frames | median frames/s | median CPU ms/frame |", "| ---: | ---: | ---: |",
        f"| {summary.frames} | {report['frames_per_s']:,.0f} | {report['cpu_ms_per_frame']:.2f} |"]
    write_results("import_minestudio", report, lines, args.update_results)


if __name__ == "__main__":
    main()
