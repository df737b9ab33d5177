"""Where benchmark numbers come from: the machine, the software and the load, recorded in every result."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from mstudio.host_memory import keeps_freed_memory
from mstudio.kernel_builds import batching_applies

__all__ = ["command_line", "git_commit", "load_average", "machine"]


def _cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or "unknown CPU"


def git_commit(start: Path | None = None) -> str | None:
    """The commit checked out in the git work tree holding ``start`` (default: this package), read from ``.git``
    without running git; ``None`` outside a work tree (an installed wheel). A dirty tree is not detected."""
    here = (start or Path(__file__)).resolve()
    for directory in (here, *here.parents):
        git = directory / ".git"
        if git.is_file():  # a worktree or submodule: "gitdir: <path>"
            git = (directory / git.read_text().split(":", 1)[1].strip()).resolve()
        if not git.is_dir():
            continue
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head  # detached HEAD
        ref = head[5:]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        packed = git / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0]
        return None  # a branch with no commit yet
    return None


def command_line() -> str:
    """This process's command line, as typed (the program's base name, then its arguments)."""
    return shlex.join([os.path.basename(sys.argv[0]), *sys.argv[1:]])


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (``os.getloadavg``), ``None`` where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine() -> dict[str, Any]:
    """CPU model, CPUs available to this process and in total, torch version and intra-op threads, CUDA device
    (if any), Python, platform, the git commit of mstudio, the load average now, whether malloc keeps freed
    blocks (:mod:`mstudio.host_memory`) and whether compiled steps build their CPU kernels in batches
    (:mod:`mstudio.kernel_builds`)."""
    return {
        "cpu": _cpu_model(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpus_total": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "load_average": load_average(),
        "malloc_keeps_freed_memory": keeps_freed_memory(),
        "cpu_kernels_batched": batching_applies(),
    }
