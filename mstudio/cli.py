"""The ``mstudio`` command: one function per subcommand."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def synth(args: argparse.Namespace) -> int:
    """Write synthetic VPT contractor data (mp4 + jsonl + expected-action sidecars)."""
    from mstudio.data.contractor_synth import synthesize_contractor

    index = synthesize_contractor(args.dest, episodes=args.episodes, frames=args.frames, seed=args.seed)
    print(f"wrote {index}")
    return 0


def import_vpt(args: argparse.Namespace) -> int:
    """Import contractor recordings into an episode store (created if it does not exist)."""
    from mstudio.data import EpisodeStore
    from mstudio.data.contractor_import import import_vpt as run_import

    dest = Path(args.store)
    store = (EpisodeStore.open(dest) if (dest / "manifest.json").exists()
             else EpisodeStore.create(dest, (args.resolution, args.resolution), meta={"source": str(args.src)}))
    summary = run_import(args.src, store, resolution=args.resolution, camera=args.camera)
    print(f"imported {len(summary.imported)} episodes ({summary.frames} frames); "
          f"{len(summary.already_present)} already in the store; {len(summary.skipped)} files skipped")
    for path, reason in summary.skipped:
        print(f"  skipped {path}: {reason}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mstudio", description="Functional offline training for Minecraft agents.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("synth", help=synth.__doc__)
    p.add_argument("dest", help="output directory")
    p.add_argument("--episodes", type=int, default=2, help="sessions of two segments (one more, gapped, is added)")
    p.add_argument("--frames", type=int, default=200, help="lines (frames) per segment")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=synth)

    p = commands.add_parser("import-vpt", help=import_vpt.__doc__)
    p.add_argument("src", help="a directory of <version>/<stem>.{mp4,jsonl}, or a VPT index JSON")
    p.add_argument("store", help="episode store directory")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--camera", choices=["float", "vpt_int"], default="float")
    p.set_defaults(run=import_vpt)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
