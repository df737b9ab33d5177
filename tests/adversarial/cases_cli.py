"""Adversarial cases: the ``mstudio`` command (``mstudio.cli.main``), every subcommand.

A refused command must exit 2 with exactly one line on stderr and no traceback: :func:`cli` turns that into a
:class:`CommandFailed` carrying the line, so ``Refused(CommandFailed, ...)`` checks what the line names. Any
other exit status, a multi-line stderr or an escaping exception is an unclear outcome. ``mstudio --debug``
must let the exception (and its traceback) through instead.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

from mstudio.cli import main
from mstudio.trainer import ConfigError
from tests.adversarial.cases_checkpoint import copy_run, edit_config, edit_newest_meta, finished_run, in_newest
from tests.adversarial.cases_config import store
from tests.adversarial.cases_weights import truncate, zero_bytes
from tests.adversarial.harness import Case, Handled, Refused

_ROOT = Path(__file__).resolve().parents[2]


class CommandFailed(Exception):
    """The command exited 2 with one line on stderr (the exception's message) and no traceback."""


def run_main(*argv: object) -> tuple[int, str, str]:
    """``main(argv)`` with stdout and stderr captured: ``(exit status, stdout, stderr)``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(arg) for arg in argv])
        except SystemExit as exit_:  # main must return its status, not exit the caller's process
            raise AssertionError(f"main raised SystemExit({exit_.code}); stderr: {err.getvalue()!r}") from None
    return code, out.getvalue(), err.getvalue()


def cli(*argv: object) -> str:
    """Run the command: its stdout when it succeeds, :class:`CommandFailed` when it is refused as it must be."""
    code, out, err = run_main(*argv)
    if code == 0:
        return out
    lines = err.splitlines()
    if code == 2 and len(lines) == 1 and "Traceback" not in err:
        raise CommandFailed(lines[0])
    raise AssertionError(f"exit status {code} with stderr {err!r}; a refused command exits 2 with one line")


def _files(**texts: str) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        for name, text in texts.items():
            (tmp / name).write_text(text)
    return write


def _command(*argv: str, setup: Callable[[Path], None] = lambda tmp: None) -> Callable[[Path], str]:
    """A case running ``mstudio <argv>``; ``{tmp}`` in an argument is the case's directory."""
    def run(tmp: Path) -> str:
        setup(tmp)
        return cli(*(arg.format(tmp=tmp) for arg in argv))
    return run


def _refused(*fragments: str) -> Refused:
    return Refused(CommandFailed, *fragments)


def _train(*argv: str, setup: Callable[[Path], None] = lambda tmp: None) -> Callable[[Path], str]:
    # --max-steps 1 first (a later one wins): a command that is wrongly accepted then ends quickly.
    return _command("train", "--out", "{tmp}/runs", "--no-compile", "--max-steps", "1", *argv, setup=setup)


def _tiny_config(tmp: Path, **entries: str) -> None:
    """``tmp/run.toml``: a tiny eager run on a fresh small store; ``entries`` are ``"key = value"`` TOML lines per
    section that replace or add to the defaults."""
    sections = {"data": {"store": f'"{store(tmp)}"', "batch_size": "1", "window": "2", "val_episodes": "0"},
                "run": {"max_steps": "1"}}
    for section, line in entries.items():
        key, value = (part.strip() for part in line.split("=", 1))
        sections.setdefault(section, {})[key] = value
    tables = [f"[{name}]\n" + "".join(f"{key} = {value}\n" for key, value in body.items())
              for name, body in sections.items()]
    (tmp / "run.toml").write_text("".join(tables))


def _with_config(**entries: str) -> Callable[[Path], None]:
    return lambda tmp: _tiny_config(tmp, **entries)


def _corrupt_export(tmp: Path) -> None:
    (tmp / "policy.safetensors").write_bytes(os.urandom(2048))
    _tiny_config(tmp, policy=f'weights = "{tmp / "policy.safetensors"}"')


def _resume(damage: Callable[[Path], None], *flags: str) -> Callable[[Path], str]:
    def run(tmp: Path) -> str:
        run_dir = copy_run(tmp)
        damage(run_dir)
        return cli("train", "--resume", run_dir, *flags)
    return run


def _resumed_to(step: int) -> Callable[[str, Path], None]:
    def check(stdout: str, tmp: Path) -> None:
        assert f"done: {step} steps" in stdout, f"the resumed run did not finish at step {step}: {stdout!r}"
        assert (tmp / "runs" / "run" / "checkpoints" / f"step_{step}").is_dir(), f"no step_{step} checkpoint"
    return check


def _eval(*argv: str, damage: Callable[[Path], None] = lambda run_dir: None) -> Callable[[Path], str]:
    """``mstudio eval`` on a copy of the finished run (``{run}``) and the run's store (``{store}``)."""
    def run(tmp: Path) -> str:
        run_dir = copy_run(tmp)
        damage(run_dir)
        shared = finished_run().parents[1] / "store"
        return cli("eval", *(arg.format(run=run_dir, store=shared, tmp=tmp) for arg in argv))
    return run


def _printed_metrics(stdout: str, tmp: Path) -> None:
    assert "loss = " in stdout, f"eval printed no loss: {stdout!r}"


def _debug(tmp: Path) -> str:
    return cli("--debug", "train", "--config", tmp / "missing.toml")


def _debug_process(tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(_ROOT)}
    return subprocess.run([sys.executable, "-m", "mstudio", "--debug", "train", "--config", str(tmp / "missing.toml")],
                          capture_output=True, text=True, env=env, timeout=120)


def _shows_traceback(done: subprocess.CompletedProcess, tmp: Path) -> None:
    assert done.returncode != 0 and "Traceback (most recent call last)" in done.stderr, (
        f"--debug should print the traceback; exit {done.returncode}, stderr {done.stderr!r}")
    assert "missing.toml" in done.stderr


def _help(stdout: str, tmp: Path) -> None:
    assert "usage: mstudio" in stdout and "--debug" in stdout, f"help output: {stdout!r}"


def _import_status(extra: bool) -> Callable[[Path], tuple[int, str, str]]:
    """``mstudio import-vpt`` of a small synthesized recording, with an unreadable ``.mp4`` added if ``extra``."""
    def run(tmp: Path) -> tuple[int, str, str]:
        assert cli("synth", tmp / "raw", "--episodes", "1", "--frames", "8")
        if extra:
            version = next(path for path in (tmp / "raw").iterdir() if path.is_dir())
            (version / "broken.mp4").write_bytes(b"not a video")
            (version / "broken.jsonl").write_text("{}\n")
        return run_main("import-vpt", tmp / "raw", tmp / "store", "--resolution", "16")
    return run


def _exit_status(expected: int) -> Callable[[tuple[int, str, str], Path], None]:
    def check(result: tuple[int, str, str], tmp: Path) -> None:
        code, out, err = result
        assert code == expected, f"import-vpt exited {code}, expected {expected}; stdout {out!r} stderr {err!r}"
    return check


PARSER = [
    Case("cli", "main/no-command", _command(), _refused("required", "command")),
    Case("cli", "main/unknown-command", _command("frobnicate"), _refused("frobnicate", "train", "eval")),
    Case("cli", "main/help", _command("--help"), Handled(_help)),
    Case("cli", "main/debug-reraises", _debug, Refused(ConfigError, "missing.toml", "does not exist")),
    Case("cli", "main/debug-prints-traceback", _debug_process, Handled(_shows_traceback)),
    Case("cli", "main/debug-after-the-command", _command("train", "--debug"), _refused("--debug", "unrecognized")),
    Case("cli", "train/unknown-flag", _train("--lr", "1"), _refused("unrecognized", "--lr")),
    Case("cli", "train/max-steps-not-int", _train("--max-steps", "abc"), _refused("--max-steps", "int", "'abc'")),
    Case("cli", "train/max-steps-missing-value", _train("--max-steps"),
         _refused("--max-steps", "expected one argument")),
    Case("cli", "eval/batches-not-int", _command("eval", "x", "--data", "y", "--batches", "x"),
         _refused("--batches", "integer >= 1", "'x'")),
    Case("cli", "eval/batches-0", _command("eval", "x", "--data", "y", "--batches", "0"),
         _refused("--batches", ">= 1", "0")),
    Case("cli", "eval/no-data-flag", _command("eval", "x"), _refused("--data", "required")),
    Case("cli", "synth/no-dest", _command("synth"), _refused("dest", "required")),
    Case("cli", "synth/frames-not-int", _command("synth", "{tmp}/raw", "--frames", "x"), _refused("--frames", "'x'")),
    Case("cli", "import-vpt/resolution-not-int", _command("import-vpt", "a", "b", "--resolution", "x"),
         _refused("--resolution", "'x'")),
    Case("cli", "import-vpt/bad-camera", _command("import-vpt", "a", "b", "--camera", "degrees"),
         _refused("--camera", "'degrees'", "float", "vpt_int")),
    Case("cli", "store-verify/no-store", _command("store", "verify"), _refused("store", "required")),
    Case("cli", "store-info/no-store", _command("store", "info"), _refused("store", "required")),
    Case("cli", "store/no-action", _command("store"), _refused("action", "required")),
]

TRAIN = [
    Case("cli", "train/max-steps-0", _train("--max-steps", "0"), _refused("run.max_steps", ">= 1", "0")),
    Case("cli", "train/seed-negative", _train("--seed", "-1"), _refused("run.seed", ">= 0", "-1")),
    Case("cli", "train/name-with-slash", _train("--config", "{tmp}/run.toml", "--name", "a/b", setup=_with_config()),
         _refused("run.name", "a/b")),
    Case("cli", "train/config-missing", _train("--config", "{tmp}/missing.toml"),
         _refused("missing.toml", "does not exist")),
    Case("cli", "train/config-a-directory", _train("--config", "{tmp}"),
         _refused("cannot read config file", "directory")),
    Case("cli", "train/config-malformed", _train("--config", "{tmp}/bad.toml", setup=_files(**{"bad.toml": "[run\n"})),
         _refused("bad.toml", "not valid TOML", "line 1")),
    Case("cli", "train/config-misspelt-key",
         _train("--config", "{tmp}/k.toml", setup=_files(**{"k.toml": "[run]\nmax_step = 3\n"})),
         _refused("max_step", "did you mean 'max_steps'")),
    Case("cli", "train/config-wrong-type",
         _train("--config", "{tmp}/t.toml", setup=_files(**{"t.toml": "[data]\nbatch_size = \"4\"\n"})),
         _refused("data.batch_size", "expected int", "'4'")),
    Case("cli", "train/out-is-a-file", _train("--config", "{tmp}/run.toml", setup=lambda tmp: (
        _tiny_config(tmp), (tmp / "runs").write_text("a file"))), _refused("run.out", "not a directory")),
    Case("cli", "train/store-missing", _train("--config", "{tmp}/run.toml", setup=lambda tmp: (
        tmp.joinpath("run.toml").write_text(f'[data]\nstore = "{tmp / "nowhere"}"\n'))),
         _refused("data.store", "nowhere")),
    Case("cli", "train/weights-missing",
         _train("--config", "{tmp}/run.toml", setup=_with_config(policy='weights = "/no/such/dir"')),
         _refused("policy.weights", "/no/such/dir", "does not exist")),
    Case("cli", "train/weights-corrupt", _train("--config", "{tmp}/run.toml", setup=_corrupt_export),
         _refused("policy.safetensors", "not a valid safetensors")),
    Case("cli", "train/batch-larger-than-data",
         _train("--config", "{tmp}/run.toml", setup=_with_config(data="batch_size = 8")),
         _refused("batch_size", "8")),
    Case("cli", "train/resume-nonexistent", _command("train", "--resume", "{tmp}/nowhere"),
         _refused("nowhere", "config.toml")),
    Case("cli", "train/resume-with-other-flags", _command("train", "--resume", "{tmp}/x", "--seed", "1"),
         _refused("--resume", "--seed")),
    Case("cli", "train/resume-no-checkpoint", _resume(lambda run_dir: shutil.rmtree(run_dir / "checkpoints")),
         _refused("no checkpoint", "without --resume")),
    Case("cli", "train/resume-corrupt-state",
         _resume(in_newest("state.safetensors", functools.partial(zero_bytes, fraction=0.3))),
         _refused("step_3", "state.safetensors", "sha256", "expected")),
    Case("cli", "train/resume-truncated-state", _resume(in_newest("state.safetensors", lambda p: truncate(p, 0.4))),
         _refused("state.safetensors", "corrupt")),
    Case("cli", "train/resume-corrupt-meta", _resume(in_newest("meta.json", lambda p: p.write_bytes(b"\x00" * 40))),
         _refused("meta.json", "not valid JSON")),
    Case("cli", "train/resume-meta-without-loader", _resume(edit_newest_meta(lambda m: m.pop("loader"))),
         _refused("meta.json", "loader")),
    Case("cli", "train/resume-corrupt-config", _resume(lambda run_dir: (run_dir / "config.toml").write_text("[run")),
         _refused("config.toml", "not valid TOML")),
    Case("cli", "train/resume-edited-config", _resume(edit_config('"weight_decay" = 0.01', '"weight_decay" = 0.5')),
         _refused("optimizer.weight_decay", "0.01", "0.5")),
    Case("cli", "train/resume-backwards", _resume(lambda run_dir: None, "--max-steps", "2"),
         _refused("--max-steps", "step 3", "2")),
    Case("cli", "train/resume-one-more-step", _resume(lambda run_dir: None, "--max-steps", "4"),
         Handled(_resumed_to(4), job=True)),
]

EVAL = [
    Case("cli", "eval/missing-checkpoint", _command("eval", "{tmp}/nowhere", "--data", "{tmp}"),
         _refused("nowhere", "neither a checkpoint")),
    Case("cli", "eval/missing-store", _eval("{run}", "--data", "{tmp}/nowhere"), _refused("nowhere", "manifest.json")),
    Case("cli", "eval/corrupt-state",
         _eval("{run}", "--data", "{store}", "--batches", "1",
               damage=in_newest("state.safetensors", functools.partial(zero_bytes, fraction=0.9))),
         _refused("state.safetensors", "sha256")),
    Case("cli", "eval/meta-without-config",
         _eval("{run}", "--data", "{store}", "--batches", "1", damage=edit_newest_meta(lambda m: m.pop("config"))),
         _refused("meta.json", "config")),
    Case("cli", "eval/store-of-another-resolution",
         lambda tmp: _eval("{run}", "--data", str(store(tmp, size=(32, 32))), "--batches", "1")(tmp),
         _refused("(32, 32)", "(64, 64)")),
    Case("cli", "eval/a-step-directory", _eval("{run}/checkpoints/step_2", "--data", "{store}", "--batches", "1"),
         Handled(_printed_metrics)),
]

IMPORT = [
    Case("cli", "import-vpt/missing-source", _command("import-vpt", "{tmp}/does/not/exist/index.json", "{tmp}/store"),
         _refused("does/not/exist")),
    Case("cli", "import-vpt/all-imported-exits-0", _import_status(extra=False), Handled(_exit_status(0), job=True)),
    Case("cli", "import-vpt/some-skipped-exits-3", _import_status(extra=True), Handled(_exit_status(3), job=True)),
    Case("cli", "store-verify/missing-store", _command("store", "verify", "{tmp}/nowhere"), _refused("nowhere")),
    Case("cli", "store-info/missing-store", _command("store", "info", "{tmp}/nowhere"), _refused("nowhere")),
]

CASES = PARSER + TRAIN + EVAL + IMPORT
