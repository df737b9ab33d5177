"""Importer throughput: contractor frames/s from 640x360 H.264 + jsonl into an EpisodeStore.

Synthesizes contractor data (``--episodes`` sessions of two ``--frames``-line segments plus one gapped
segment), then times ``import_vpt`` at 128x128, ``--repeats`` times into fresh stores; reports the median.

    python benchmarks/bench_import.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from mstudio.data import EpisodeStore, import_vpt, synthesize_contractor

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        index = synthesize_contractor(Path(tmp) / "raw", episodes=args.episodes, frames=args.frames)
        rates = []
        for r in range(args.repeats):
            store = EpisodeStore.create(Path(tmp) / f"store{r}", image_size=(128, 128))
            start = time.perf_counter()
            summary = import_vpt(index, store, progress=False)
            rates.append(summary.frames / (time.perf_counter() - start))
    report = {"frames": summary.frames, "frames_per_s": statistics.median(rates), "all": rates}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "import.json").write_text(json.dumps(report, indent=2) + "\n")
    table = ("# Contractor import (640x360 H.264 -> 128x128 store)\n\n| frames | median frames/s |\n| ---: | ---: |\n"
             f"| {summary.frames} | {report['frames_per_s']:,.0f} |\n")
    (RESULTS / "import.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
