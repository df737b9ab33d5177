"""Importer throughput: contractor frames/s from 640x360 H.264 + jsonl into an EpisodeStore.

Synthesizes contractor data (``--episodes`` sessions of two ``--frames``-line segments plus one gapped
segment), then times ``import_vpt`` at 128x128, ``--repeats`` times into fresh stores; reports the median.

    python benchmarks/bench_import.py                    # writes benchmarks/results/latest/import.{json,md}
    python benchmarks/bench_import.py --update-results   # the committed benchmarks/results/import.*
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench_step import add_results_argument, command_line, header, machine, write_results
from mstudio.data import EpisodeStore, import_vpt, synthesize_contractor

BASELINE = "none: an absolute rate (the importer has no MineStudio counterpart on this data)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    add_results_argument(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        index = synthesize_contractor(Path(tmp) / "raw", episodes=args.episodes, frames=args.frames)
        rates = []
        for r in range(args.repeats):
            store = EpisodeStore.create(Path(tmp) / f"store{r}", image_size=(128, 128))
            start = time.perf_counter()
            summary = import_vpt(index, store, progress=False)
            rates.append(summary.frames / (time.perf_counter() - start))
    info, command = machine(), command_line()
    report = {"machine": info, "command": command, "baseline": BASELINE, "args": vars(args),
              "frames": summary.frames, "frames_per_s": statistics.median(rates), "all": rates}
    lines = header("Contractor import (640x360 H.264 -> 128x128 store)", info, command, BASELINE) + [
        "| frames | median frames/s |", "| ---: | ---: |", f"| {summary.frames} | {report['frames_per_s']:,.0f} |"]
    write_results("import", report, lines, args.update_results)


if __name__ == "__main__":
    main()
