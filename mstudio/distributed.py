"""Data-parallel training on ``torch.distributed``: the process group, per-rank seeds, replica checks, reductions.

Launch with ``torchrun --standalone --nproc_per_node=N ...``; every rank runs the same compiled step on its own
rows, and the step averages gradients across ranks (``make_train_step(..., data_parallel=True)``, which uses
:func:`mean_across_ranks`)::

    world = mstudio.distributed.init_distributed()          # reads torchrun's env; gloo on CPU, nccl on CUDA
    try:
        step = mstudio.make_train_step(policy, objective, optimizer, data_parallel=world.size > 1)
        state = mstudio.init_state(policy, optimizer, batch_size=rows_per_rank)
        ...                                                   # the step checks the replicas on its first call
    finally:
        mstudio.distributed.shutdown_distributed()

Nothing here is needed in a single process: without an initialised process group, :func:`rank` is 0,
:func:`world_size` is 1, :func:`reduce_metrics` returns its input and the checks pass; only what builds a
data-parallel step (:func:`mean_across_ranks`) or shards a policy (:func:`shard_policy`) refuses to run.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import zlib
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import numpy as np
import optree
import torch
import torch.distributed as dist
from torch import Tensor, nn

from mstudio import trees

__all__ = [
    "CollectiveFailure",
    "PER_RANK_FIELDS",
    "REPLICATED_FIELDS",
    "VPT_SHARD_UNITS",
    "World",
    "broadcast_from_rank_zero",
    "check_replicas",
    "check_same_across_ranks",
    "collective_failures",
    "default_backend",
    "gather_per_rank",
    "init_distributed",
    "is_distributed",
    "mean_across_ranks",
    "rank",
    "rank_seed",
    "rank_zero_first",
    "reduce_metrics",
    "shard_policy",
    "shutdown_distributed",
    "take_own_rank",
    "world_size",
]

#: The fields of a :class:`~mstudio.train.TrainState` that must be equal on every rank (the others, ``memory``,
#: ``init_memory`` and ``last_timestamp``, hold each rank's own rows).
REPLICATED_FIELDS = ("params", "buffers", "opt_state", "ema", "step", "hyperparams", "skipped_updates")
#: The fields that hold each rank's own rows: a checkpoint keeps every rank's (:func:`gather_per_rank`).
PER_RANK_FIELDS = ("memory", "init_memory", "last_timestamp")
#: The submodules :func:`shard_policy` makes FSDP units of by default: VPT's image encoder and transformer blocks.
VPT_SHARD_UNITS = ("ImgObsProcess", "ResidualRecurrentBlock")
#: What torchrun sets for every worker.
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_CHUNK = 1 << 24  # bytes fingerprinted at a time (a 128 MB int64 temporary)


class World(NamedTuple):
    """Where this process stands: ``rank`` of ``size`` processes, ``local_rank`` on its machine, and the
    ``device`` it trains on (``cuda:<local_rank>`` with nccl, else ``cpu``)."""

    rank: int
    size: int
    local_rank: int
    device: torch.device


class CollectiveFailure(RuntimeError):
    """A collective failed: another rank died, or did not arrive within the process group's timeout."""


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised in this process."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default process group, or 0 without one."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes in the default process group, or 1 without one."""
    return dist.get_world_size() if is_distributed() else 1


def default_backend(device: torch.device | str) -> str:
    """``"nccl"`` for a CUDA ``device`` (when torch has NCCL), else ``"gloo"``."""
    device = torch.device(device)
    if device.type == "cuda" and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def init_distributed(device: torch.device | str = "cpu", *, timeout: float = 600.0,
                     backend: str | None = None) -> World:
    """Join the process group torchrun describes in the environment, once; without torchrun, a world of one.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. On CUDA each rank takes
    the GPU ``cuda:<LOCAL_RANK>``. Calling it again (or after another ``init_process_group``) returns the
    world as it stands.

    Args:
        device: ``"cpu"`` or ``"cuda"`` (the index comes from ``LOCAL_RANK``).
        timeout: seconds a collective may wait for the other ranks before it fails (then a rank that died or
            hangs stops the others with an error instead of a hang). It must exceed the time ranks can drift
            apart: the first step's compilation, a checkpoint written by rank 0 alone.
        backend: the ``torch.distributed`` backend; default :func:`default_backend` of ``device``.

    Raises:
        ValueError: ``WORLD_SIZE`` is set but another torchrun variable is missing or not an integer, or
            ``timeout`` is not positive.
    """
    device = torch.device(device)
    if not timeout > 0:
        raise ValueError(f"init_distributed: timeout must be > 0 seconds, got {timeout!r}")
    if is_distributed():
        return _world(device)
    if "WORLD_SIZE" not in os.environ:  # not launched by torchrun: train alone
        return World(0, 1, 0, device)
    missing = [name for name in _TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise ValueError(f"init_distributed: WORLD_SIZE is set but {missing} are not; launch with torchrun "
                         "(torchrun --standalone --nproc_per_node=N -m mstudio train ...), which sets them all")
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        try:
            values[name] = int(os.environ[name])
        except ValueError:
            raise ValueError(f"init_distributed: environment variable {name} must be an integer, got "
                             f"{os.environ[name]!r}") from None
    if device.type == "cuda":
        device = torch.device("cuda", values["LOCAL_RANK"])
        torch.cuda.set_device(device)
    dist.init_process_group(backend or default_backend(device), rank=values["RANK"],
                            world_size=values["WORLD_SIZE"], timeout=datetime.timedelta(seconds=timeout),
                            device_id=device if device.type == "cuda" else None)
    return _world(device)


def shutdown_distributed() -> None:
    """Leave the process group, if one is initialised, and free it: call it before the process exits, also
    after a failure (it returns at once then).

    ``destroy_process_group`` alone is not enough: objects in reference cycles (frames, closures) can keep the
    gloo process group alive until the interpreter shuts down, when its worker threads, releasing tensors, try
    to take the GIL and are killed: "terminate called without an active exception", SIGABRT, which torchrun
    reports as the rank's failure (half the runs of a 2-rank script here). Collecting garbage around the
    destroy frees the group while the interpreter still runs.
    """
    if is_distributed():
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def _world(device: torch.device) -> World:
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local)
    return World(dist.get_rank(), dist.get_world_size(), local, device)


def rank_seed(seed: int, rank: int, epoch: int) -> int:
    """A seed for ``(seed, rank, epoch)``: distinct and statistically independent across ranks and epochs
    (``numpy.random.SeedSequence``), deterministic, and in ``[0, 2**63)`` (what ``torch.manual_seed`` takes).

    Use it for per-rank randomness (augmentation, dropout, a rank's own shuffle). Orders that every rank must
    agree on (the episode order a sampler deals to ranks) use ``seed + epoch``, the same on every rank.

    Raises:
        ValueError: a negative or non-integer argument.
    """
    for name, value in (("seed", seed), ("rank", rank), ("epoch", epoch)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"rank_seed: {name} must be an int >= 0, got {value!r}")
    low, high = np.random.SeedSequence([int(seed), int(rank), int(epoch)]).generate_state(2, np.uint32)
    return (int(high) << 32 | int(low)) & (2**63 - 1)


def _group_name(group: dist.ProcessGroup | None) -> tuple[str, int]:
    if not is_distributed():
        raise RuntimeError("no torch.distributed process group is initialised: launch with torchrun and call "
                           "mstudio.distributed.init_distributed() before building a data-parallel step")
    group = group if group is not None else dist.group.WORLD
    return group.group_name, dist.get_world_size(group)


def mean_across_ranks(group: dist.ProcessGroup | None = None) -> Callable[[Any], Any]:
    """``mean(tree) -> tree``: every tensor leaf of ``tree`` averaged over the ranks of ``group``.

    Traceable: it uses ``torch.distributed``'s functional collectives (``all_reduce_coalesced`` then
    ``wait_tensor``), which ``torch.compile(fullgraph=True)`` puts into the graph with no break, and returns
    new tensors (the input is not modified). Leaves are all-reduced in one coalesced collective per
    (dtype, device) (gloo refuses mixed dtypes in one), summed and divided by the world size (older gloo builds
    have no ``AVG``; one recipe for every backend). Every rank must call it with the same structure, shapes and dtypes.

    Args:
        group: the process group; default the world. Resolved now, so the returned function holds only a group
            name and a size (constants of a compiled graph).

    Raises:
        RuntimeError: no process group is initialised.
        TypeError (from ``mean``): a leaf that is not a floating-point tensor.
    """
    from torch.distributed import _functional_collectives as funcol

    name, size = _group_name(group)

    def mean(tree: Any) -> Any:
        leaves, treedef = trees.tree_flatten(tree)  # traced cheaply inside a compiled step (mstudio.trees)
        buckets: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for i, leaf in enumerate(leaves):
            if not isinstance(leaf, Tensor) or not leaf.is_floating_point():
                what = f"{leaf.dtype} tensor" if isinstance(leaf, Tensor) else type(leaf).__name__
                raise TypeError(f"mean_across_ranks averages floating-point tensors, got a {what} at leaf {i}")
            buckets.setdefault((leaf.dtype, leaf.device), []).append(i)
        out = list(leaves)
        for positions in buckets.values():
            summed = funcol.all_reduce_coalesced([leaves[i] for i in positions], "sum", name)
            summed = [funcol.wait_tensor(t) for t in summed]
            for i, value in zip(positions, torch._foreach_div(summed, float(size))):
                out[i] = value
        return trees.tree_unflatten(treedef, out)

    return mean


def _collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where a collective's tensors must live for ``group``'s backend (nccl: the current GPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_same_across_ranks(value: str, what: str, *, group: dist.ProcessGroup | None = None) -> None:
    """Raise ``ValueError`` on every rank unless ``value`` (a text) is the same on every rank of ``group``.

    A no-op without a process group. One small all-gather (two on a mismatch, to name the values).
    """
    if not is_distributed():
        return
    device = _collective_device(group)
    digest = torch.tensor([len(value), zlib.crc32(value.encode())], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(digest) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, digest, group=group)
    if all(torch.equal(g, gathered[0]) for g in gathered):
        return
    values: list[Any] = [None] * len(gathered)
    dist.all_gather_object(values, value, group=group)
    differ = [r for r, v in enumerate(values) if v != values[0]]
    raise ValueError(f"{what} differs across ranks: rank 0 has {values[0]!r:.300}, rank {differ[0]} has "
                     f"{values[differ[0]]!r:.300} (ranks {differ} differ from rank 0); every rank must build the "
                     "same step from the same config")


def _fingerprint(tensor: Tensor) -> Tensor:
    """Three int64 numbers, two of which change when any bit of ``tensor`` changes: the sum of its bytes, the sum
    of its bytes weighted by position (``1 + i mod 65521``), and the byte count. Exact integer arithmetic, so independent of the
    order of summation (thread counts may differ across ranks); computed in chunks to bound memory."""
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    plain = torch.zeros((), dtype=torch.int64, device=data.device)
    weighted = torch.zeros((), dtype=torch.int64, device=data.device)
    for start in range(0, data.numel(), _CHUNK):
        chunk = data[start:start + _CHUNK].to(torch.int64)
        weights = torch.arange(start, start + chunk.numel(), dtype=torch.int64, device=data.device) % 65521 + 1
        plain = plain + chunk.sum()
        weighted = weighted + (chunk * weights).sum()  # < 2**24 * 255 * 65521 < 2**63 per chunk
    return torch.stack([plain, weighted, torch.tensor(data.numel(), device=data.device)])


def _replicated_part(state: Any) -> Any:
    from mstudio.train.state import TrainState  # here: mstudio.train imports this module

    if isinstance(state, TrainState):
        return {name: getattr(state, name) for name in REPLICATED_FIELDS}
    return state


def check_replicas(state: Any, *, group: dist.ProcessGroup | None = None) -> None:
    """Raise ``ValueError`` on every rank unless the replicated part of ``state`` is bit-identical on every rank.

    For a :class:`~mstudio.train.TrainState`, the :data:`REPLICATED_FIELDS` (parameters, buffers, optimizer
    state, EMA, counters, hyper-parameters; not the memory, which holds each rank's own rows); any other
    pytree is compared whole. Each rank all-gathers a bitwise fingerprint per tensor (no tensor is sent), so
    the error names the first tensor that differs and the ranks that differ from rank 0. A no-op without a
    process group; one host sync and two collectives otherwise (run it at the start, and every N steps to debug).
    """
    if not is_distributed():
        return
    paths, leaves, _ = optree.tree_flatten_with_path(_replicated_part(state))
    tensors = [(".".join(map(str, path)), leaf) for path, leaf in zip(paths, leaves) if isinstance(leaf, Tensor)]
    spec = "; ".join(f"{name} {tuple(t.shape)} {t.dtype}" for name, t in tensors)
    check_same_across_ranks(spec, "the structure of the train state (names, shapes, dtypes)", group=group)
    device = _collective_device(group)
    if not tensors:
        return
    local = torch.stack([_fingerprint(t).to(device) for _, t in tensors])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    differs = torch.stack([(g != gathered[0]).any(dim=1) for g in gathered])  # [ranks, tensors]
    if not differs.any():
        return
    first = int(differs.any(dim=0).nonzero()[0])
    ranks = differs[:, first].nonzero().flatten().tolist()
    count = int(differs.any(dim=0).sum())
    raise ValueError(f"the train state differs across ranks: {tensors[first][0]} on rank(s) {ranks} differs from "
                     f"rank 0 ({count} of {len(tensors)} tensors differ); data-parallel replicas must start from "
                     "the same weights (the same seed or checkpoint on every rank) and stay equal (every rank must "
                     "run the same data-parallel step)")


def gather_per_rank(tree: Any, *, group: dist.ProcessGroup | None = None) -> Any:
    """Every tensor leaf of ``tree`` stacked over the ranks, ``[world_size, *shape]``, on every rank (all-gather).

    For what a checkpoint written by rank 0 must hold for every rank: the memory carry and last timestamps
    (``{f: getattr(state, f) for f in PER_RANK_FIELDS}``) and the RNG state (``torch.get_rng_state()``).
    :func:`take_own_rank` undoes it on resume. Every rank must pass the same structure and shapes. Without a
    process group, each leaf gets a leading dimension of 1.
    """
    if not is_distributed():
        return optree.tree_map(lambda t: t.unsqueeze(0).clone(), tree)
    device = _collective_device(group)

    def gather(leaf: Tensor) -> Tensor:
        sent = leaf.detach().to(device, torch.uint8 if leaf.dtype == torch.bool else leaf.dtype).contiguous()
        out = [torch.empty_like(sent) for _ in range(dist.get_world_size(group))]  # gloo has no bool all-gather
        dist.all_gather(out, sent, group=group)
        return torch.stack(out).to(leaf.device, leaf.dtype)

    return optree.tree_map(gather, tree)


def take_own_rank(tree: Any, *, group: dist.ProcessGroup | None = None) -> Any:
    """``leaf[rank]`` for every tensor leaf of a tree :func:`gather_per_rank` made (a copy).

    Raises:
        ValueError: the leaves were gathered over another number of ranks (resuming with another world size).
    """
    index, size = (dist.get_rank(group), dist.get_world_size(group)) if is_distributed() else (0, 1)
    leaves = optree.tree_leaves(tree)
    if any(leaf.dim() == 0 or leaf.shape[0] != size for leaf in leaves):
        found = sorted({leaf.shape[0] if leaf.dim() else 0 for leaf in leaves})
        raise ValueError(f"take_own_rank: the tree holds {found} rank(s) but the world has {size}; per-rank state "
                         "(memory, RNG) resumes only with the world size it was saved with")
    return optree.tree_map(lambda leaf: leaf[index].clone(), tree)


def reduce_metrics(metrics: Mapping[str, float | Tensor], *,
                   group: dist.ProcessGroup | None = None) -> dict[str, float]:
    """The mean over ranks of each scalar in ``metrics`` (numbers or 0-d tensors), as Python floats.

    For what the Trainer logs (validation metrics, throughput): call it on every rank with the same names,
    every time the Trainer logs. A data-parallel step's own metrics are already means over ranks. Without a
    process group, ``metrics`` as floats.

    Raises:
        ValueError: the ranks passed different names.
    """
    names = sorted(metrics)
    values = [float(metrics[n]) for n in names]  # one sync per tensor: call every N steps, not every step
    if not is_distributed():
        return dict(zip(names, values))
    check_same_across_ranks(",".join(names), "the names of the metrics to reduce", group=group)
    total = torch.tensor(values, dtype=torch.float64, device=_collective_device(group))
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return dict(zip(names, (total / dist.get_world_size(group)).tolist()))


@contextlib.contextmanager
def rank_zero_first(*, group: dist.ProcessGroup | None = None) -> Iterator[None]:
    """Run the block on rank 0 first, then on the other ranks together: for work that makes something on a shared
    disk the others then read, such as the built-in synthetic store. A plain block without a process group.

    Rank 0 tells the others how its block ended (one small broadcast): when it raised, the other ranks raise a
    ``RuntimeError`` quoting its error at once, instead of waiting for the process group's timeout and running
    the block on what rank 0 left half made.
    """
    if not is_distributed():
        yield
        return
    if dist.get_rank(group) != 0:
        failure = _broadcast_from_rank_zero(None, group)
        if failure is not None:
            raise RuntimeError(f"rank {dist.get_rank(group)}: rank 0 failed in the work it does first, so this rank "
                               f"stops too: {failure}")
        yield
        return
    try:
        yield
    except BaseException as error:
        _broadcast_from_rank_zero(f"{type(error).__name__}: {error}", group)
        raise
    _broadcast_from_rank_zero(None, group)


def _broadcast_from_rank_zero(value: Any, group: dist.ProcessGroup | None) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank of ``group``."""
    box = [value]
    dist.broadcast_object_list(box, group_src=0, group=group)
    return box[0]


def broadcast_from_rank_zero(value: Any, *, group: dist.ProcessGroup | None = None) -> Any:
    """Rank 0's ``value`` (a picklable object, such as a run name rank 0 chose) on every rank; ``value`` itself
    without a process group. Every rank must call it (the others' ``value`` is ignored)."""
    return _broadcast_from_rank_zero(value, group) if is_distributed() else value


_FAILURE_SIGNS = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout", "broken pipe")


@contextlib.contextmanager
def collective_failures(what: str) -> Iterator[None]:
    """Re-raise the failure of a collective inside the block as :class:`CollectiveFailure` naming this rank.

    A rank whose peer died sees gloo's ``Connection closed by peer``, one whose peer hangs sees a timeout after
    the process group's ``timeout``; both are ``RuntimeError`` s without a rank. Other errors pass unchanged.
    """
    try:
        yield
    except CollectiveFailure:
        raise  # already says which rank and what (a nested block)
    except RuntimeError as error:
        text = str(error).lower()
        if not is_distributed() or not (isinstance(error, dist.DistError) or any(s in text for s in _FAILURE_SIGNS)):
            raise
        raise CollectiveFailure(
            f"rank {rank()} of {world_size()}: a collective in {what} failed: another rank died or did not arrive "
            f"within the process group's timeout; see the other ranks' logs. ({error})"
        ) from error


def shard_policy(policy: nn.Module, *, units: tuple[str, ...] = VPT_SHARD_UNITS, param_dtype: torch.dtype | None = None,
                 reduce_dtype: torch.dtype | None = torch.float32, reshard_after_forward: bool = True,
                 mesh: Any = None) -> nn.Module:
    """FSDP2 for large policies (VPT 2x/3x on GPUs): ``fully_shard`` every submodule whose class is named in
    ``units`` (VPT: the image encoder and each transformer block), then the policy itself, in place.

    Each rank then holds ``1 / world_size`` of every parameter (a ``DTensor`` shard), and so of its gradient and
    of its Adam moments; a unit's full parameters exist only while it runs (all-gathered before its forward and
    backward, freed after when ``reshard_after_forward``), and gradients are reduce-scattered (averaged) in
    ``backward``: per rank, parameters, gradients and moments take ``16 / world_size`` bytes per parameter in
    float32 (VPT 3x, 532 M parameters: 7.9 GiB replicated, 1.0 GiB on each of 8 GPUs), plus one unit in full
    while it runs.

    This is the module side only. The train step must then call the policy *module* (FSDP's all-gathers run in
    its forward hooks, which ``torch.func.functional_call`` bypasses) and take the gradients FSDP leaves in
    ``p.grad`` (already averaged: no :func:`mean_across_ranks`); the optimizer is elementwise and runs unchanged on
    the local shards, except that the clipping norm must be summed over ranks.

    Args:
        policy: the policy, on its device (``init_distributed("cuda")`` sets each rank's GPU; gloo on CPU works
            too, for tests).
        units: class names of the submodules that become FSDP units.
        param_dtype: dtype the all-gathered parameters compute in (``torch.bfloat16`` for mixed precision);
            ``None``: the parameters' own. The sharded parameters (what the optimizer updates) keep theirs.
        reduce_dtype: dtype of the gradient reduce-scatter (float32: averaging in bf16 loses bits).
        reshard_after_forward: free each unit's full parameters after its forward (all-gather again in backward).
        mesh: a 1-D ``DeviceMesh``; default the world.

    Raises:
        RuntimeError: no process group is initialised.
        ValueError: no submodule's class is named in ``units`` (the message lists the classes the policy has).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    chosen = [module for module in policy.modules() if type(module).__name__ in units and module is not policy]
    if not chosen:
        classes = sorted({type(module).__name__ for module in policy.modules()})
        raise ValueError(f"shard_policy: no submodule of {type(policy).__name__} is one of units={units}; "
                         f"its classes are {classes}")
    if not is_distributed():
        raise RuntimeError("shard_policy needs an initialised process group: call init_distributed('cuda') first")
    options = dict(mesh=mesh, reshard_after_forward=reshard_after_forward,
                   mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype))
    for module in reversed(chosen):  # inner units before the units that contain them
        fully_shard(module, **options)
    fully_shard(policy, **options)
    return policy
