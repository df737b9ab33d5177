"""The ``mstudio`` command: one function per subcommand.

An error ends a command with one line on stderr (``mstudio <command>: error: ...``) and exit status 2;
``mstudio --debug <command> ...`` raises it instead, with its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from mstudio.trainer import Trainer

__all__ = ["bench", "eval_checkpoint", "import_minestudio", "import_vpt", "main", "store_info", "store_verify", "synth",
           "train"]

# `mstudio train` flags named as the `[run]` key each overrides (`--no-compile` is handled on its own).
_RUN_FLAGS = ("out", "max_steps", "ckpt_every", "seed", "name")


def synth(args: argparse.Namespace) -> int:
    """Write synthetic data: VPT contractor recordings (mp4 + jsonl + expected-action sidecars), or with
    --format minestudio a MineStudio LMDB dataset (video/ and action/ LMDB environments + expected.json)."""
    try:
        if args.format == "minestudio":
            from mstudio.data.minestudio_synth import synthesize_minestudio

            written = synthesize_minestudio(args.dest, episodes=args.episodes, frames=args.frames, seed=args.seed,
                                            tail=args.tail)
        else:
            from mstudio.data.contractor_synth import synthesize_contractor

            written = synthesize_contractor(args.dest, episodes=args.episodes, frames=args.frames, seed=args.seed)
    except (ValueError, OSError) as error:
        return _error("synth", error)
    print(f"wrote {written}")
    return 0


def _store_for_import(dest: Path, resolution: int, src: str, backend: str | None = None,
                      codec: str | None = None) -> Any:
    """The episode store at ``dest``, created at ``resolution`` when there is none (two imports may race here):
    of kind ``backend`` (``--backend``; default ``episodes``, or ``sharded`` with ``--codec h264``), frames stored
    ``codec`` (``--codec raw|h264``, sharded only). An existing store of another kind than asked is an error."""
    from mstudio.data import ShardedStore, create_store, open_store
    from mstudio.data.video_codec import VideoCodec

    if resolution < 1:
        raise ValueError(f"--resolution must be an integer >= 1, got {resolution}")
    if codec == "h264" and backend == "episodes":
        raise ValueError("--codec h264 needs --backend sharded (an 'episodes' store keeps raw .npy files)")
    backend = backend or ("sharded" if codec == "h264" else None)
    if not (dest / "manifest.json").exists():
        try:
            create_store(dest, (resolution, resolution), meta={"source": str(src)}, backend=backend or "episodes",
                         codec=VideoCodec() if codec == "h264" else None)
        except FileExistsError:
            if not (dest / "manifest.json").exists():  # not a store another import just made: say what is there
                raise
    store = open_store(dest)
    kind = "sharded" if isinstance(store, ShardedStore) else "episodes"
    frames = "h264" if getattr(store, "codec", None) is not None else "raw"
    if (backend or kind) != kind or (codec or frames) != frames:
        raise ValueError(f"{dest} is already a {kind!r} store with {frames} frames; --backend {backend} --codec "
                         f"{codec} asks for another kind (import into a new directory, or leave those flags out)")
    return store


def _import_status(command: str, summary: Any, src: str, inputs: str) -> int:
    """Print an import's summary; 0 when everything was imported, 3 when some ``inputs`` (what the importer
    skips: "files", "chunks") were skipped, 2 when all were."""
    print(f"imported {len(summary.imported)} episodes ({summary.frames} frames); "
          f"{len(summary.already_present)} already in the store; {len(summary.skipped)} {inputs} skipped")
    for where, reason in summary.skipped:
        print(f"  skipped {where}: {reason}")
    if summary.skipped and not summary.imported and not summary.already_present:
        return _error(command, f"none of the {len(summary.skipped)} {inputs} under {src} could be imported: each "
                               "was skipped, for the reason printed above")
    return 3 if summary.skipped else 0  # 3: finished, some inputs skipped (see the command's help)


def import_vpt(args: argparse.Namespace) -> int:
    """Import contractor recordings into an episode store (created if it does not exist)."""
    from mstudio.data.contractor_import import discover
    from mstudio.data.contractor_import import import_vpt as run_import

    try:
        discover(args.src)  # a missing or unreadable SRC fails here, before the store is created
        store = _store_for_import(Path(args.store), args.resolution, args.src, args.backend, args.codec)
        summary = run_import(args.src, store, resolution=args.resolution, camera=args.camera)
    except (ValueError, OSError) as error:
        return _error("import-vpt", error)
    return _import_status("import-vpt", summary, args.src, "segments")


def import_minestudio(args: argparse.Namespace) -> int:
    """Import a MineStudio LMDB dataset (video/ and action/ LMDB environments) into an episode store (created if it
    does not exist)."""
    from mstudio.data.minestudio_import import import_minestudio as run_import
    from mstudio.data.minestudio_import import list_environments

    try:
        list_environments(args.src)  # a missing or non-MineStudio SRC fails here, before the store is created
        store = _store_for_import(Path(args.store), args.resolution, args.src, args.backend, args.codec)
        summary = run_import(args.src, store, resolution=args.resolution)
    except (ValueError, OSError) as error:
        return _error("import-minestudio", error)
    return _import_status("import-minestudio", summary, args.src, "chunks or episodes")


class _Failed(Exception):
    """A subcommand's error (``args = (command, error)``): :func:`main` prints it as one line and exits 2."""


def _error(command: str, error: BaseException | str) -> NoReturn:
    """End ``command`` with ``error``: one line on stderr and exit status 2 (re-raised with ``--debug``)."""
    raise _Failed(command, error)


def _one_line(error: BaseException | str) -> str:
    """The error's message on one line; errors of unexpected types keep their type name."""
    text = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
    if isinstance(error, (ValueError, OSError)):  # ConfigError, FileNotFoundError, ...: the message says it all
        return text or type(error).__name__
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {text} (mstudio --debug shows the traceback)"
    return text


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (exit status 2), as every other error."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _train_table(args: argparse.Namespace) -> dict[str, Any]:
    """The config file's table (empty: the defaults) with the command-line flags written into ``[run]``."""
    from mstudio.trainer.config import read_config_table

    table = read_config_table(args.config) if args.config is not None else {}
    run = table.setdefault("run", {})
    if not isinstance(run, dict):
        return table  # not a table: config_from_dict says so
    run.update({key: getattr(args, key) for key in _RUN_FLAGS if getattr(args, key) is not None})
    if args.no_compile:
        run["compile"] = False
    return table


def _make_trainer(args: argparse.Namespace) -> Trainer:
    """The Trainer the flags describe: a new run, or ``--resume``'s run at its newest checkpoint."""
    from mstudio.trainer import ConfigError, Trainer, config_from_dict

    if args.resume is None:
        return Trainer(config_from_dict(_train_table(args)))
    clashing = [_flag(dest) for dest in ("config", *_RUN_FLAGS)
                if dest != "max_steps" and getattr(args, dest) is not None]
    clashing += ["--no-compile"] if args.no_compile else []
    if clashing:
        raise ConfigError(f"--resume continues a run with its own config.toml; only --max-steps may come with it, "
                          f"got {', '.join(clashing)}")
    trainer = Trainer.resume(args.resume, max_steps=args.max_steps)
    step = int(trainer.state.step)
    if trainer.config.run.max_steps < step:
        raise ConfigError(f"--max-steps: the run's newest checkpoint is at step {step}; resume to {step} or more, "
                          f"got {trainer.config.run.max_steps}")
    return trainer


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def train(args: argparse.Namespace) -> int:
    """Train a policy (defaults: VPT tiny, behaviour cloning, a built-in synthetic store under ./runs/); under
    torchrun --nproc_per_node=N, data-parallel on N processes (data.batch_size rows each; rank 0 writes)."""
    from mstudio.distributed import shutdown_distributed

    try:  # the Trainer joins torchrun's process group; leave it however the run ends
        trainer = _make_trainer(args)
        lead = trainer.world.rank == 0
        if lead:
            print(f"run directory: {trainer.run_dir}", flush=True)
        try:
            result = trainer.fit()
        except KeyboardInterrupt:
            return 130  # the Trainer said how to resume (and saved a checkpoint when alone)
    finally:
        shutdown_distributed()
    if not lead:
        return 0
    print(f"run directory: {result['run_dir']}")
    print(f"done: {result['steps']} steps in {result['seconds']:.1f} s; train loss {_fmt(result['first_loss'])} -> "
          f"{_fmt(result['last_loss'])}; val loss {_fmt(result['val'].get('loss'))}; "
          f"policy {Path(result['run_dir']) / 'policy.safetensors'}")
    return 0


def eval_checkpoint(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint (or a run's newest one) on an episode store; prints the mean metrics."""
    from mstudio.trainer.evaluate import evaluate_checkpoint, resolve_checkpoint

    checkpoint = resolve_checkpoint(args.checkpoint)
    metrics = evaluate_checkpoint(checkpoint, args.data, batches=args.batches)
    print(f"checkpoint {checkpoint} on {args.data}:")
    for key, value in metrics.items():
        print(f"{key} = {value!r}")
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _add_train(commands: Any) -> None:
    p = commands.add_parser("train", help=train.__doc__, description=train.__doc__)
    p.add_argument("--config", metavar="FILE", help="TOML run config (tables data, policy, objectives, optimizer, run)")
    p.add_argument("--out", metavar="DIR", help="where run directories go (run.out)")
    p.add_argument("--max-steps", type=int, metavar="N", help="updates to train for; with --resume, may extend the run")
    p.add_argument("--ckpt-every", type=int, metavar="N", help="checkpoint every N steps (run.ckpt_every)")
    p.add_argument("--seed", type=int, metavar="N", help="run.seed")
    p.add_argument("--no-compile", action="store_true", help="run the step eagerly (run.compile = false)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its newest checkpoint")
    p.add_argument("--name", metavar="NAME", help="run directory name (run.name; default: a time stamp)")
    p.set_defaults(run=train)


def _add_eval(commands: Any) -> None:
    p = commands.add_parser("eval", help=eval_checkpoint.__doc__, description=eval_checkpoint.__doc__)
    p.add_argument("checkpoint", metavar="CKPT", help="<run>/checkpoints/step_<N>, or a run directory")
    p.add_argument("--data", required=True, metavar="STORE", help="episode store directory")
    p.add_argument("--batches", type=_positive, metavar="N", help="batches to evaluate (default: one epoch)")
    p.set_defaults(run=eval_checkpoint)


def bench(args: argparse.Namespace) -> int:
    """Time the VPT train step: MineStudio's loop on the module vs mstudio's step eager and compiled, interleaved
    in one process, with FLOPs, matmul peak, compile times, recompiles and peak memory (--sweep: the cost over a
    grid of B, T and hidsize). Prints markdown; --json/--markdown/--plot write files."""
    import shlex

    from mstudio import bench as mb

    # the command as its flags say it (main may have been called with an argv other than sys.argv's): --config
    # and the flags that differ from their defaults
    defaults = vars(_parser().parse_args(["bench"]))
    flags = [[_flag(k)] if v is True else [_flag(k), *map(str, v if isinstance(v, list) else [v])]
             for k, v in vars(args).items() if k not in ("run", "debug", "command")
             and (k == "config" or v != defaults[k])]
    command = shlex.join(["mstudio", "bench", *(word for flag in flags for word in flag)])
    chosen = args.variants or (mb.SweepOptions.variants if args.sweep else tuple(mb.VARIANTS))
    variants = tuple(v for v in chosen if not (args.no_compile and v == "compiled"))
    workload = mb.Workload.preset(args.config, args.batch, args.seq, hidsize=args.hidsize, device=args.device)
    # unset --repeats/--warmup: the defaults of BenchOptions or SweepOptions
    rounds = {k: getattr(args, k) for k in ("repeats", "warmup") if getattr(args, k) is not None}
    if args.sweep:
        result = mb.run_sweep(mb.SweepOptions(workload, tuple(args.sweep_batch), tuple(args.sweep_seq),
                                              tuple(args.sweep_hidsize), variants, **rounds), command=command)
        text = mb.sweep_markdown(result)
        if args.plot:
            print(f"wrote {mb.plot_sweep(result, args.plot)}")
    else:
        if args.plot:
            return _error("bench", "--plot draws the sweep: add --sweep")
        result = mb.run_bench(mb.BenchOptions(workload, variants, **rounds, fresh_processes=not args.no_fresh_processes,
                                              minestudio_python=args.minestudio_python), command=command)
        text = mb.bench_markdown(result)
    print(text)
    if args.json:
        print(f"wrote {mb.write_json(result, args.json)}")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text)
        print(f"wrote {args.markdown}")
    return 0


def _add_bench(commands: Any) -> None:
    from mstudio.bench._presets import SHAPES, VARIANTS  # plain data: no torch import for the parser

    p = commands.add_parser("bench", help=bench.__doc__, description=bench.__doc__)
    p.add_argument("--config", default="tiny", metavar="PRESET",
                   help=f"VPT preset (default tiny); default B x T per preset: {SHAPES}")
    p.add_argument("--batch", type=_positive, metavar="B", help="rows per batch (default: the preset's)")
    p.add_argument("--seq", type=_positive, metavar="T", help="frames per row (default: the preset's)")
    p.add_argument("--hidsize", type=_positive, metavar="H", help="override the preset's latent width")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--repeats", type=_positive, metavar="N", help="timed rounds (default 20; --sweep: 5 per point)")
    p.add_argument("--warmup", type=int, metavar="N", help="untimed first rounds (default 3; --sweep: 2 per point)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                   help="variants to time (default: all; with --sweep: minestudio_style eager)")
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled variant")
    p.add_argument("--no-fresh-processes", action="store_true",
                   help="skip the fresh-process measurements (cold/warm compile, peak memory)")
    p.add_argument("--minestudio-python", metavar="PYTHON",
                   help="python of a venv with minestudio==1.1.6: also time MineStudio's own VPTPolicy in the rounds")
    p.add_argument("--json", metavar="PATH", help="write the result as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the markdown table")
    p.add_argument("--sweep", action="store_true", help="time a grid around the config's point, one axis at a time")
    p.add_argument("--sweep-batch", type=_positive, nargs="+", default=[1, 2, 4, 8], metavar="B")
    p.add_argument("--sweep-seq", type=_positive, nargs="+", default=[4, 8, 16, 32], metavar="T")
    p.add_argument("--sweep-hidsize", type=_positive, nargs="+", default=[64, 128, 256, 512], metavar="H")
    p.add_argument("--plot", metavar="PATH", help="with --sweep: plot ms/step per axis to this image (needs "
                   "matplotlib: pip install 'mstudio[bench]')")
    p.set_defaults(run=bench)



def store_verify(args: argparse.Namespace) -> int:
    """Check an episode store (either kind) against its index: files, checksums, and what a crash can leave;
    --repair fixes the leftovers (exit 1 if problems remain, 2 if the store cannot be opened)."""
    from mstudio.data import open_store

    try:
        store = open_store(args.store)
        problems = store.verify(repair=args.repair)
        remaining = store.verify() if args.repair else problems
    except (OSError, ValueError) as error:
        return _error("store verify", error)
    for problem in problems:
        print(problem)
    unchecked = store.episodes_without_checksums()
    if unchecked:  # a store written before checksums: not a problem, but say what could not be checked
        print(f"info: no checksum recorded for {len(unchecked)} of {len(store)} episodes (written before mstudio "
              f"recorded checksums; their files were checked for dtype and shape only): "
              f"{', '.join(map(repr, unchecked[:5]))}{', ...' if len(unchecked) > 5 else ''}")
    if not remaining:
        print("ok")
    return 1 if remaining else 0


def store_info(args: argparse.Namespace) -> int:
    """Print what an episode store (either kind) holds: episodes, frames, bytes on disk, backend, codec, shards."""
    from mstudio.data import open_store
    from mstudio.data.stores import describe_store

    try:
        facts = describe_store(open_store(args.store, checksums=False))
    except (OSError, ValueError) as error:
        return _error("store info", error)
    for key, value in facts.items():
        if key in ("bytes_on_disk", "shard_bytes"):
            value = f"{value} ({_binary_size(value)})"
        print(f"{key}: {value}")
    return 0


def _binary_size(size: int) -> str:
    """``size`` bytes in the largest binary unit that keeps it >= 1 (``"2.0 GiB"``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}" if unit != "B" else f"{size} B"
        size /= 1024
    return f"{size:.1f} TiB"


def _add_store(commands: Any) -> None:
    store = commands.add_parser("store", help="inspect or check an episode store (info, verify)",
                                description="Inspect or check an episode store of either kind (episodes or sharded).")
    actions = store.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    p = actions.add_parser("info", help=store_info.__doc__, description=store_info.__doc__)
    p.add_argument("store", metavar="STORE", help="episode store directory")
    p.set_defaults(run=store_info)
    p = actions.add_parser("verify", help=store_verify.__doc__, description=store_verify.__doc__)
    p.add_argument("store", metavar="STORE", help="episode store directory")
    p.add_argument("--repair", action="store_true", help="remove leftovers of interrupted writes (and, for an "
                   "episodes store, re-index complete episodes the index lost); never touches indexed data")
    p.set_defaults(run=store_verify)


def _add_store_kind(p: argparse.ArgumentParser) -> None:
    """``--backend`` and ``--codec``: the kind of store an import creates when STORE does not exist yet."""
    p.add_argument("--backend", choices=["episodes", "sharded"], default=None,
                   help="a new store's kind: episodes (a directory of .npy files per episode, for small data; the "
                        "default) or sharded (episodes packed into 2 GiB shard files, for corpus-sized data)")
    p.add_argument("--codec", choices=["raw", "h264"], default=None,
                   help="a new sharded store's frames: raw (the default) or H.264 chunks (implies --backend sharded)")


def _parser() -> argparse.ArgumentParser:
    """The ``mstudio`` command line: ``--debug``, then one subcommand and its arguments."""
    parser = _Parser(prog="mstudio", description="Functional offline training for Minecraft agents.")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, raise it with its traceback instead of printing one line")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = commands.add_parser("synth", help=synth.__doc__)
    p.add_argument("dest", help="output directory")
    p.add_argument("--format", choices=["contractor", "minestudio"], default="contractor",
                   help="contractor: VPT mp4 + jsonl segments; minestudio: a MineStudio LMDB dataset")
    p.add_argument("--episodes", type=int, default=2,
                   help="contractor: sessions of two segments (one more, gapped, is added); "
                        "minestudio: episodes (one more, shorter than a chunk, is added)")
    p.add_argument("--frames", type=int, default=200,
                   help="contractor: lines (frames) per segment; minestudio: frames of the first episode (+37 each)")
    p.add_argument("--tail", choices=["drop", "keep"], default="drop",
                   help="minestudio: drop the frames that do not fill a last chunk, as MineStudio's converter does, "
                        "or keep them in a shorter last chunk")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=synth)

    p = commands.add_parser("import-minestudio", help=import_minestudio.__doc__,
                            description=f"{import_minestudio.__doc__} Exit status as for import-vpt: 0 when every "
                            "episode was imported (or already present), 3 when some chunks were skipped, 2 on an "
                            "error.")
    p.add_argument("src", help="a MineStudio dataset directory: video/ and action/ folders of <modality>-<N> LMDB "
                               "environments")
    p.add_argument("store", help="episode store directory")
    p.add_argument("--resolution", type=int, default=128)
    _add_store_kind(p)
    p.set_defaults(run=import_minestudio)

    p = commands.add_parser("import-vpt", help=import_vpt.__doc__, description=f"{import_vpt.__doc__} Exit status: 0 "
                            "when every input was imported (or already present), 3 when the import finished but "
                            "skipped some inputs (each is listed with why), 2 on an error or when every input was "
                            "skipped.")
    p.add_argument("src", help="a directory of <version>/<stem>.{mp4,jsonl}, or a VPT index JSON")
    p.add_argument("store", help="episode store directory")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--camera", choices=["float", "vpt_int"], default="float")
    _add_store_kind(p)
    p.set_defaults(run=import_vpt)

    _add_train(commands)
    _add_eval(commands)
    _add_store(commands)
    _add_bench(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``mstudio`` command on ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    An error is printed as one line with exit status 2; with ``--debug`` it is raised, traceback and all.
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2), already printed
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return args.run(args)
    except _Failed as failure:  # a command's own error report (see _error)
        command, error = failure.args
        if isinstance(error, str):  # a message only: it gets the report's traceback, for --debug
            error = ValueError(error).with_traceback(failure.__traceback__)
    except Exception as caught:  # every other error a command meets ends it the same way
        command, error = args.command, caught
    if args.debug:
        raise error  # outside the except blocks: the traceback is the error's own, without _Failed around it
    print(f"mstudio {command}: error: {_one_line(error)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
