"""Run a function on several ranks, each a fresh process in a gloo process group, from a test.

``run_ranks(target, world_size, *args)`` starts ``world_size`` processes (``spawn``: nothing inherited from the
test process), sets torchrun's environment variables in each, joins the group with
:func:`mstudio.distributed.init_distributed` (gloo, a short collective timeout), calls
``target(rank, world_size, *args)`` and brings back what it returned (``torch.save``), or its traceback. A run
that outlives ``timeout`` is killed and fails the test, so a hang never stalls the suite. ``target`` must be a
module-level function of an importable module (``tests.distributed.workers``).
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

__all__ = ["RankResult", "check_ok", "free_port", "run_ranks"]


class RankResult(NamedTuple):
    """How one rank ended: its ``exitcode`` (``None``: killed at the timeout), what ``target`` returned, the
    traceback of what it raised (``""`` if nothing), and its wall time in seconds."""

    exitcode: int | None
    value: Any
    error: str
    seconds: float


def free_port() -> int:
    """A TCP port free on localhost right now (for ``MASTER_PORT``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(target: Callable, rank: int, world_size: int, port: int, collective_timeout: float, out: str,
           args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # ranks share the machine's cores
    start = time.perf_counter()
    import mstudio.distributed as md

    try:
        md.init_distributed("cpu", timeout=collective_timeout)
        value = target(rank, world_size, *args)
        torch.save(value, Path(out) / f"rank{rank}.pt")
    except BaseException:  # noqa: BLE001 - reported to the test, which fails with it
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        (Path(out) / f"rank{rank}.time").write_text(str(time.perf_counter() - start))
        os._exit(1)  # no atexit handlers: a dead peer must not make the exit hang
    (Path(out) / f"rank{rank}.time").write_text(str(time.perf_counter() - start))
    md.shutdown_distributed()
    # Skip the interpreter's teardown: gloo threads still alive then abort the process now and again (SIGABRT
    # after the rank returned its value and left the group; 1 run in ~10 of the suite). What a rank did is in
    # its files; an abort inside shutdown_distributed itself still fails the test.
    os._exit(0)


def run_ranks(target: Callable, world_size: int, *args: Any, timeout: float = 120.0,
              collective_timeout: float = 30.0) -> list[RankResult]:
    """``target(rank, world_size, *args)`` on ``world_size`` processes; one :class:`RankResult` per rank.

    Args:
        timeout: seconds for the whole run; processes still alive then are killed (``exitcode`` ``None``).
        collective_timeout: the process group's timeout, seconds (how long a collective waits for a peer).
    """
    context = multiprocessing.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="mstudio-ranks-") as out:
        processes = [context.Process(target=_entry, args=(target, rank, world_size, port, collective_timeout, out,
                                                          args), daemon=True) for rank in range(world_size)]
        for process in processes:
            process.start()
        deadline = time.monotonic() + timeout
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
        results = []
        for rank, process in enumerate(processes):
            files = {kind: Path(out) / f"rank{rank}.{kind}" for kind in ("pt", "err", "time")}
            killed = process.exitcode is not None and process.exitcode < 0 and not files["time"].exists()
            results.append(RankResult(
                exitcode=None if killed or process.exitcode is None else process.exitcode,
                value=torch.load(files["pt"], weights_only=False) if files["pt"].exists() else None,
                error=files["err"].read_text() if files["err"].exists() else "",
                seconds=float(files["time"].read_text()) if files["time"].exists() else float("nan"),
            ))
    return results


def check_ok(results: list[RankResult]) -> list[Any]:
    """The ranks' values, or an ``AssertionError`` with every failing rank's traceback (a rank killed at the
    timeout usually waited on one that failed first)."""
    failed = [f"rank {rank} ended with exit code {result.exitcode} "
              f"({'killed at the timeout' if result.exitcode is None else 'failed'}):\n{result.error}"
              for rank, result in enumerate(results) if result.exitcode != 0]
    assert not failed, "\n".join(failed)
    return [result.value for result in results]
