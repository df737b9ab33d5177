"""A train step whose state is sharded across ranks: parameters, EMA and Adam moments as ``Shard(0)`` DTensors.

What it is: ZeRO-3 memory *at rest*. Between steps each of ``N`` ranks holds ``1 / N`` of every parameter, of the
EMA and of Adam's two moments (DTensor shards on a 1-D device mesh), and the step returns the gradients as shards
too. Inside the step the *whole* model is gathered at once (every shard all-gathered, then the plain, unsharded
module is called statelessly, :func:`mstudio.functionalize`): it is not FSDP2's per-unit gather, which keeps only one
unit in full at a time. (FSDP2's ``fully_shard`` itself does not compose with ``functional_call``: its hooks
substitute the module's own parameters for the ones passed in; see ``tests/distributed``.)

Memory per rank, float32, ``P`` parameters, ``N`` ranks (not counting activations, nor the new state a pure step
allocates beside the old one, as the replicated step does):

- between steps: ``12 P / N`` bytes (parameters 4, Adam's two moments 8), ``+ 4 P / N`` with an EMA;
- during the step, on top: the sharded gradients, ``4 P / N``; the gathered parameters, ``4 P``; the full
  gradients before they are reduce-scattered, at most ``4 P`` (each is scattered once its backward completes).

So the peak is ``16 P / N + 8 P`` against ``16 P`` replicated: smaller from ``N = 2`` on, and what persists between
steps (and what the optimizer touches) shrinks ``N``-fold. VPT 3x (532.5 M parameters) on 8 GPUs: 0.74 GiB between
steps, 4.96 GiB at the peak, against 7.93 GiB replicated; FSDP2's per-unit gather would replace the ``8 P`` by
twice its largest unit (0.85 GiB for 3x).

How the gradients come out sharded and averaged: each shard is gathered by
``shard.redistribute(placements=[Replicate()]).to_local(grad_placements=[Partial("avg")])``, so the backward of
that gather reduce-scatters this rank's full gradient into the mean over ranks, as a ``Shard(0)`` DTensor. The
optimizer (:mod:`mstudio.optim`: ``torch._foreach_*`` ops, which DTensor runs shard by shard), clipping (the
global norm over DTensor shards is the norm of the whole gradient) and the EMA then run on shards. The loss and
the objective's float metrics are averaged over ranks as in the data-parallel step. The memory carry stays a
plain tensor holding this rank's own rows.

Use (the Trainer: ``[distributed] shard = true``)::

    from mstudio.train.sharded import make_sharded_train_step, shard_state, state_mesh, unshard_state

    world = mstudio.distributed.init_distributed()
    step = make_sharded_train_step(policy, objective, optimizer)
    state = shard_state(mstudio.init_state(policy, optimizer, batch_size=rows_per_rank), state_mesh())
    state, metrics = step(state, batch)
    full = unshard_state(state)          # full tensors on every rank: checkpoints, export

Eager only: the gather's backward is DTensor's ``Redistribute`` autograd.Function, which has no ``setup_context``
and so cannot run under ``torch.func.grad_and_value``, the transform the compiled step traces (torch 2.13:
"In order to use an autograd.Function with functorch transforms ... it must override the setup_context
staticmethod"). Each parameter is gathered and its gradient reduce-scattered by a collective of its own (no
bucketing): on 2 loaded CPU ranks VPT tiny's step takes about 1.6x the replicated step's time
(``benchmarks/bench_sharded_step.py``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import optree
import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.experimental import implicit_replication

from losses.api import Objective
from mstudio.distributed import (
    check_replicas,
    check_same_across_ranks,
    collective_failures,
    is_distributed,
    world_size,
)
from mstudio.optim import GradientTransformation
from mstudio.train.checks import check_finite_state, check_is_state, check_opt_state
from mstudio.train.state import TrainState
from mstudio.train.step import (
    GradientReduce,
    TrainStep,
    average_across_ranks,
    reached_parameters,
    train_step_parts,
    value_and_grad_autograd,
)

__all__ = ["ShardedTrainStep", "make_sharded_train_step", "shard_state", "state_mesh", "unshard_state"]


def state_mesh(device: torch.device | str = "cpu") -> DeviceMesh:
    """A 1-D device mesh over every rank of the initialised process group (``"cpu"``: gloo, ``"cuda"``: nccl).

    Raises:
        RuntimeError: no process group is initialised.
    """
    if not is_distributed():
        raise RuntimeError("state_mesh needs an initialised process group: launch with torchrun and call "
                           "mstudio.distributed.init_distributed() first")
    return init_device_mesh(torch.device(device).type, (world_size(),))


def _shard(tensor: Tensor, mesh: DeviceMesh) -> DTensor:
    """``tensor`` (the same on every rank) as a DTensor: ``Shard(0)``, or ``Replicate()`` when 0-d. Each rank
    takes its own rows locally (``src_data_rank=None``: no communication)."""
    placement = Shard(0) if tensor.dim() > 0 else Replicate()
    return distribute_tensor(tensor.detach(), mesh, [placement], src_data_rank=None)


def _is_per_parameter(names: frozenset[str]) -> Callable[[Any], bool]:
    """Whether a node of a state's tree is a dict holding one tensor per parameter (params, EMA, Adam moments)."""
    return lambda node: isinstance(node, dict) and len(node) > 0 and frozenset(node) == names


def shard_state(state: TrainState, mesh: DeviceMesh) -> TrainState:
    """``state`` with its parameters, EMA and every per-parameter optimizer tensor (Adam's moments) as
    ``Shard(0)`` DTensors on ``mesh`` (0-d parameters: ``Replicate()``); buffers, counters, hyper-parameters,
    learning-rate state and memory stay plain tensors. Every rank must pass the same replicated part (the same
    seed or checkpoint); shapes as before (a DTensor reports the full shape), no data is sent.

    Raises:
        TypeError: ``state`` is not a :class:`TrainState`, or its parameters are already DTensors.
    """
    if not isinstance(state, TrainState):
        raise TypeError(f"shard_state needs a TrainState (from mstudio.init_state), got {type(state).__name__}")
    if any(isinstance(p, DTensor) for p in state.params.values()):
        raise TypeError("shard_state: state.params are already DTensors (the state is sharded)")
    per_parameter = _is_per_parameter(frozenset(state.params))

    def shard_dict(node: Any) -> Any:
        if per_parameter(node):
            return {name: _shard(t, mesh) for name, t in node.items()}
        return node

    opt_state = optree.tree_map(shard_dict, state.opt_state, is_leaf=per_parameter, none_is_leaf=True)
    return state._replace(params=shard_dict(state.params), opt_state=opt_state,
                          ema=None if state.ema is None else shard_dict(state.ema))


def unshard_state(state: TrainState) -> TrainState:
    """``state`` with every DTensor replaced by its full tensor (all-gathered: the same on every rank), e.g. to save
    a checkpoint in the usual layout or load the weights into a module; bit-exact inverse of :func:`shard_state`.
    Every rank must call it."""
    return optree.tree_map(lambda t: t.full_tensor() if isinstance(t, DTensor) else t, state, none_is_leaf=False)


def _gather(shard: Tensor) -> Tensor:
    """A DTensor shard's full value as a plain tensor whose gradient flows back as the rank-mean of the ranks'
    gradients, sharded like ``shard`` (plain tensors pass through)."""
    if not isinstance(shard, DTensor):
        return shard
    return shard.redistribute(placements=[Replicate()]).to_local(grad_placements=[Partial("avg")])


class _Gathered(Mapping):
    """Read-only ``name -> full tensor`` over sharded parameters, gathering a parameter only when it is read (what
    an objective that reads some parameters, such as ``losses.l2_init``, sees)."""

    def __init__(self, shards: Mapping[str, Tensor]):
        self._shards = shards

    def __getitem__(self, name: str) -> Tensor:
        return _gather(self._shards[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._shards)

    def __len__(self) -> int:
        return len(self._shards)


def _gathering(apply_fn: Callable, objective: Objective) -> tuple[Callable, Objective]:
    """``apply_fn`` and ``objective`` that take sharded parameters and see full ones."""

    def apply_gathered(params, buffers, batch, memory):
        return apply_fn({name: _gather(p) for name, p in params.items()}, buffers, batch, memory)

    def objective_gathered(batch, latents, params):
        return objective(batch, latents, _Gathered(params))

    objective_gathered.__name__ = getattr(objective, "__name__", type(objective).__name__)
    return apply_gathered, objective_gathered


def _average_loss_and_metrics(group: torch.distributed.ProcessGroup | None = None) -> GradientReduce:
    """The loss and float metrics averaged over ranks (:func:`average_across_ranks`); the gradients, already
    averaged by the gather's backward, pass through."""
    average = average_across_ranks(group)
    return lambda computed: average(computed._replace(grads={}))._replace(grads=computed.grads)


def _plain(value: Any) -> Any:
    """A DTensor's full value as a plain tensor (a replicated one's own copy: no communication); others as they are."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def _plain_outside_shards(state: TrainState) -> TrainState:
    """``state`` with the scalars that computing on shards made replicated DTensors (``skipped_updates`` counts
    from the global gradient norm) plain again: only per-parameter tensors stay sharded."""
    per_parameter = _is_per_parameter(frozenset(state.params))
    return optree.tree_map(lambda node: node if per_parameter(node) else _plain(node), state,
                           is_leaf=per_parameter, none_is_leaf=False)


class ShardedTrainStep(TrainStep):
    """:class:`~mstudio.train.step.TrainStep` for a state made by :func:`shard_state` (see the module docstring);
    built by :func:`make_sharded_train_step`. The first call gathers the whole state once for its checks (the
    parameters the objective reaches, a finite state, the same replicated part on every rank). ``donate`` is
    accepted and has no effect: there is no in-place path for DTensors, so ``state`` stays usable."""

    def __call__(self, state: TrainState, batch: Mapping[str, Any], *,
                 donate: bool = False) -> tuple[TrainState, dict[str, Tensor]]:
        check_is_state(state)
        if not all(isinstance(p, DTensor) for p in state.params.values()):
            raise TypeError("a sharded train step takes a sharded state: shard_state(init_state(...), state_mesh())")
        new_state, metrics = super().__call__(state, batch, donate=False)
        return _plain_outside_shards(new_state), {key: _plain(value) for key, value in metrics.items()}

    def _build(self, state: TrainState, batch: Mapping[str, Any]) -> None:
        if (state.ema is None) != (self._options["ema_decay"] is None):
            raise ValueError("make_sharded_train_step(ema_decay=...) and init_state(..., ema=True) go together")
        with collective_failures("the sharded step's first-call checks"):
            full = unshard_state(state)
            check_opt_state(full, self.optimizer)
            check_finite_state(full)
            self.reached = reached_parameters(self.policy, self.objective, full, batch)
            check_same_across_ranks(",".join(sorted(self.reached)), "the parameters the objective reaches")
            check_replicas(full)
        del full
        self._batch_keys = frozenset(batch)
        apply_fn, objective = _gathering(self.apply_fn, self.objective)
        gradients, update = train_step_parts(apply_fn, objective, self.optimizer, self.reached,
                                             value_and_grad_autograd, **self._options,
                                             grad_reduce=_average_loss_and_metrics())

        def step(state: TrainState, batch: Mapping[str, Any]) -> tuple[TrainState, dict[str, Tensor]]:
            computed = gradients(state, batch)
            # The global gradient norm, and so the non-finite guard's verdict, comes out of the shards as a
            # replicated 0-d DTensor, which the guard's torch.where meets with the plain per-rank memory: let
            # DTensor treat plain tensors as replicated there (elementwise, so each rank keeps its own rows;
            # __call__ makes them plain again). Not in the forward/backward, where a mix would be a bug.
            with implicit_replication():
                return update(state, batch, computed)

        self._step_fn = step


def make_sharded_train_step(policy: nn.Module, objective: Objective, optimizer: GradientTransformation, *,
                            validate: bool = True, autocast_dtype: torch.dtype | None = None,
                            ema_decay: float | None = None, skip_nonfinite: bool = True) -> ShardedTrainStep:
    """:func:`mstudio.make_train_step` (same arguments and metrics, eager, always data-parallel) for a state
    sharded by :func:`shard_state`: ``step(sharded_state, batch) -> (sharded_state, metrics)``, metrics plain
    tensors, the same on every rank. Needs an initialised process group.

    Raises:
        RuntimeError: on the first call, without a process group; :class:`mstudio.distributed.CollectiveFailure`
            when another rank died or timed out.
    """
    from mstudio.train.step import make_train_step

    make_train_step(policy, objective, optimizer, compile=False, validate=validate, autocast_dtype=autocast_dtype,
                    ema_decay=ema_decay, skip_nonfinite=skip_nonfinite)  # the argument checks, nothing built
    return ShardedTrainStep(policy, objective, optimizer, compile=False, validate=validate,
                            autocast_dtype=autocast_dtype, ema_decay=ema_decay, skip_nonfinite=skip_nonfinite,
                            data_parallel=True)
