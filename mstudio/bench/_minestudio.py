"""MineStudio 1.1.6's own ``VPTPolicy``, stepped in a long-lived process of another Python, as one bench timer.

mstudio never imports minestudio: a venv with ``minestudio==1.1.6`` (``shared/minestudio_reference.md``) runs
:mod:`mstudio.bench.minestudio_style` as a script, on the same weights and batches, and steps one batch per
request. Between requests it waits on its stdin, so it takes its turn in the rounds without competing with the
variants of this process for the CPU. Its times are measured inside it (no pipe latency).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mstudio.bench import minestudio_style
from mstudio.bench._measure import memory_mb, peak_memory_mb, reset_peak_memory
from mstudio.bench._variants import HYPER
from mstudio.models import VPTPolicy

__all__ = ["MineStudioProcess"]


class MineStudioProcess:
    """``with MineStudioProcess(python, policy, batches, warmup) as timer:`` ``timer(r)`` steps MineStudio's
    ``VPTPolicy`` on ``batches[r]`` ``lead`` times untimed, then once timed, and returns the seconds of the timed
    step (as :func:`mstudio.bench.timed` does in this process); ``timer.losses`` holds the losses read.

    The process's peak resident set is reset before round ``warmup`` and read by :meth:`memory` (CPU only:
    it runs on the CPU).
    """

    def __init__(self, python: str | Path, policy: VPTPolicy, batches: Sequence[dict], warmup: int, *,
                 lead: int = 1) -> None:
        self.python, self.policy, self.batches, self.warmup, self.lead = str(python), policy, batches, warmup, lead
        self.losses: list[float] = []
        self._process: subprocess.Popen | None = None
        self._built_mb: float | None = None

    def __enter__(self) -> MineStudioProcess:
        self._tmp = tempfile.TemporaryDirectory(prefix="mstudio-bench-")
        inputs = Path(self._tmp.name) / "inputs.pt"
        torch.save({"state_dict": {k: v.cpu() for k, v in self.policy.state_dict().items()},
                    "policy_kwargs": json.dumps(self.policy.config.to_policy_kwargs()),
                    "hyper": json.dumps(HYPER), "batches": [_cpu(b) for b in self.batches]}, inputs)
        command = [self.python, minestudio_style.__file__, str(inputs), str(torch.get_num_threads())]
        # stderr to a file: a pipe nobody reads would block the process once full of warnings
        self._stderr = open(Path(self._tmp.name) / "stderr.txt", "w+")
        try:
            self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=self._stderr, text=True, bufsize=1)
        except OSError as error:
            self._stderr.close()
            self._tmp.cleanup()
            raise ValueError(f"--minestudio-python {self.python}: cannot run it ({error})") from error
        try:
            self._reply()  # {"ready": true}: weights loaded
        except BaseException:
            self.__exit__()
            raise
        self._built_mb = memory_mb(pid=self._process.pid)
        return self

    def __call__(self, round_: int) -> float:
        if round_ == self.warmup:
            reset_peak_memory(pid=self._process.pid)
        self._process.stdin.write(f"{round_} {self.lead if round_ else 0}\n")  # as mstudio.bench.timed
        self._process.stdin.flush()
        reply = self._reply()
        self.losses.append(reply["loss"])
        return reply["seconds"]

    def memory(self) -> dict[str, Any]:
        """The process's resident set after loading, and its peak since round ``warmup``, in MiB."""
        return {"memory_built_mb": self._built_mb, "peak_memory_mb": peak_memory_mb(pid=self._process.pid)}

    def _reply(self) -> dict[str, Any]:
        for line in self._process.stdout:
            if line.startswith(minestudio_style.REPLY):
                return json.loads(line[len(minestudio_style.REPLY):])
        self._process.wait()
        self._stderr.seek(0)
        tail = "\n".join(self._stderr.read().strip().splitlines()[-20:])
        raise RuntimeError(f"the MineStudio process ({self.python} {minestudio_style.__file__}) ended with exit "
                           f"status {self._process.returncode}; is minestudio==1.1.6 installed there?\n{tail}")

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            with contextlib.suppress(BrokenPipeError):  # the process may have died: its error is raised already
                self._process.stdin.close()
            try:
                self._process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process.stdout.close()
        self._stderr.close()
        self._tmp.cleanup()


def _cpu(batch: Any) -> Any:
    """``batch`` with every tensor on the CPU (the MineStudio process runs there)."""
    if isinstance(batch, dict):
        return {k: _cpu(v) for k, v in batch.items()}
    return batch.cpu() if isinstance(batch, torch.Tensor) else batch
