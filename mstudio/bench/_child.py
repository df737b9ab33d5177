"""One variant measured in a fresh process: its compile time (cold or warm inductor cache) and its memory.

A fresh process is the only honest way to get both: a compile in a process that compiled before reuses
in-memory caches, and on CPU a process's peak resident set mixes every variant it ran. The parent calls
:func:`measure_in_child`, which runs this module as ``python -m mstudio.bench._child SPEC`` (``SPEC``: JSON) with
``TORCHINDUCTOR_CACHE_DIR`` set when asked; the child prints one JSON line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import mstudio
from mstudio.bench._measure import CompileStats, memory_mb, peak_memory_mb, reset_peak_memory
from mstudio.bench._variants import Workload, episode_batches, make_step

__all__ = ["measure_in_child"]

_REPLY = "@mstudio-bench-child "


def measure_in_child(workload: Workload, variant: str, *, steps: int = 2,
                     cache_dir: Path | str | None = None) -> dict[str, Any]:
    """Build ``variant`` on ``workload`` in a new Python process, call it once, then ``steps`` more times.

    Args:
        workload: the benchmark point (same weights and batches as the parent's).
        variant: a :data:`mstudio.bench.VARIANTS` name.
        steps: calls after the first; the peak memory is taken over these (>= 1).
        cache_dir: ``TORCHINDUCTOR_CACHE_DIR`` of the child (an empty directory: a cold compile; one a previous
            child filled: a warm one); ``None`` leaves the environment as it is.

    Returns:
        ``{"first_call_s"`` (build of the step excluded; compile and one step included), ``"graphs"``,
        ``"recompiles"``, ``"caches"`` (over all calls, :class:`CompileStats`), ``"memory_built_mb"`` (after
        building the policy, its state and the batches), ``"peak_memory_mb"`` (peak over the ``steps`` later
        calls)``}``; memory as :func:`mstudio.bench._measure.peak_memory_mb` measures it.

    Raises:
        RuntimeError: the child failed; with the end of its stderr.
    """
    if steps < 1:
        raise ValueError(f"measure_in_child: steps must be >= 1, got {steps}")
    spec = {"workload": dataclasses.asdict(workload), "variant": variant, "steps": steps,
            "threads": torch.get_num_threads()}
    env = dict(os.environ)
    # the child imports the mstudio this process runs, installed or not (a checkout on sys.path)
    root = str(Path(mstudio.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    if cache_dir is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    command = [sys.executable, "-m", "mstudio.bench._child", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    replies = [line[len(_REPLY):] for line in done.stdout.splitlines() if line.startswith(_REPLY)]
    if done.returncode or not replies:
        tail = "\n".join(done.stderr.strip().splitlines()[-40:])
        raise RuntimeError(f"the bench child measuring {variant!r} on {workload} failed (exit {done.returncode}):\n"
                           f"{tail}")
    return json.loads(replies[-1])


def _main(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(spec["threads"])
    workload = Workload(**spec["workload"])
    policy = workload.policy()
    batches = episode_batches(workload.batch, workload.seq, workload.image, 1 + spec["steps"], workload.device)
    step = make_step(spec["variant"], policy, workload.batch)
    built = memory_mb(workload.device)
    with CompileStats() as stats:
        start = time.perf_counter()
        step(batches[0])
        first = time.perf_counter() - start
        reset_peak_memory(workload.device)
        for batch in batches[1:]:
            step(batch)
    return {"first_call_s": first, **stats.as_dict(), "caches": stats.caches, "memory_built_mb": built,
            "peak_memory_mb": peak_memory_mb(workload.device)}


if __name__ == "__main__":
    print(_REPLY + json.dumps(_main(json.loads(sys.argv[1]))), flush=True)
