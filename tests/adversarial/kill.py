"""Kill a writer at its N-th file-system operation: the kill harness of the adversarial suite.

:func:`run_killed` runs a Python snippet in a child process whose file-system calls that change what is
on disk (open for writing, ``np.save``, ``mkdir``, rename/replace, unlink, ``rmtree``, fsync) are counted;
at operation ``kill_at`` the child sends itself ``SIGKILL`` *before* doing it, so the disk holds exactly
what a crash at that point leaves. With ``kill_at=None`` it runs to the end and reports how many
operations it did, from which :func:`kill_points` picks where to kill.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]

# Runs in the child before the snippet: wraps every counted operation with a check of the counter.
_PRELUDE = r'''
import builtins, io, os, shutil, signal, atexit
import numpy as _np

_kill_at = int(os.environ["MSTUDIO_KILL_AT"]) if os.environ.get("MSTUDIO_KILL_AT") else None
_count = 0

def _point(name):
    global _count
    _count += 1
    if _count == _kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

def _report():
    with builtins.open(os.environ["MSTUDIO_KILL_COUNT"], "w") as f:
        f.write(str(_count))

atexit.register(_report)

def _counted(module, name, when=lambda *a, **k: True):
    original = getattr(module, name)
    def wrapper(*args, **kwargs):
        if when(*args, **kwargs):
            _point(name)
        return original(*args, **kwargs)
    setattr(module, name, wrapper)

def _writes(file=None, mode="r", *args, **kwargs):
    return any(c in mode for c in "wax+")

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

for _name in ("replace", "rename", "fsync", "mkdir", "makedirs", "unlink", "remove", "rmdir", "truncate"):
    _counted(os, _name)
_counted(os, "open", lambda path, flags, *a, **k: bool(flags & _WRITE_FLAGS))
_counted(builtins, "open", _writes)
_counted(io, "open", _writes)
_counted(shutil, "rmtree")
_counted(_np, "save")
'''


@dataclass(frozen=True)
class Run:
    """A finished child: its exit status (``-9`` when killed), output, and the operations it counted."""

    returncode: int
    stdout: str
    stderr: str
    operations: int | None

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL


def run_killed(snippet: str, tmp: Path, kill_at: int | None = None, timeout: float = 300) -> Run:
    """Run ``snippet`` (Python source) in a child in ``tmp``; SIGKILL it before its ``kill_at``-th operation.

    The child's cwd is ``tmp`` and the repository root is on its ``sys.path``; ``operations`` is the count of
    operations done, known only when the child was not killed.
    """
    count_file = tmp / f".kill-count-{os.getpid()}-{kill_at}"
    count_file.unlink(missing_ok=True)
    env = {**os.environ, "MSTUDIO_KILL_COUNT": str(count_file), "MSTUDIO_KILL_AT": "" if kill_at is None else str(kill_at),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")]))}
    source = _PRELUDE + "\n" + textwrap.dedent(snippet)
    done = subprocess.run([sys.executable, "-c", source], cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=timeout)
    operations = int(count_file.read_text()) if count_file.exists() else None
    count_file.unlink(missing_ok=True)
    return Run(done.returncode, done.stdout, done.stderr, operations)


def kill_points(operations: int, limit: int) -> list[int]:
    """At most ``limit`` operation numbers in ``1..operations``, spread evenly and always the first and last."""
    if operations <= limit:
        return list(range(1, operations + 1))
    return sorted({1 + round(i * (operations - 1) / (limit - 1)) for i in range(limit)})
