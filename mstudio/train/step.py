"""The train step: forward, objective, gradients, optimizer update and memory carry as one pure function.

``make_train_step(policy, objective, optimizer)`` returns ``step(state, batch) -> (state, metrics)``. The
function it runs is pure (it returns a new :class:`TrainState` and never writes to ``state``, ``batch`` or
the policy), branch-free on tensor values, and free of host syncs, so ``torch.compile(fullgraph=True)``
turns it into one graph that stays compiled across episode resets, the warmup, hyper-parameter changes and
the whole run. A caller that never reuses the old state may donate it (``step(state, batch, donate=True)``):
the eager step then updates it in place, with the same numbers.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Mapping, NamedTuple

import optree
import torch
from torch import Tensor, nn

from losses.api import HYPERPARAMS_KEY, STEP_KEY, Objective, check_output, objective_name
from mstudio import trees
from mstudio.batch import check_batch, normalize_batch
from mstudio.compile import (check_compile_options, compiled_call, configure_compile_cache, inductor_options,
                             probe_cpu_compiler_in_background)
from mstudio.bridge import check_stateless_forward, detach_tree, functionalize
from mstudio.distributed import check_replicas, check_same_across_ranks, collective_failures, mean_across_ranks
from mstudio.host_memory import reuse_freed_memory
from mstudio.models.vpt.max_pool import with_aten_max_pool
from mstudio.optim import GradientTransformation, apply_updates, donated, global_norm, known_global_norm
from mstudio.policy import check_policy
from mstudio.train.checks import (
    check_finite_state,
    check_is_state,
    check_not_donated,
    check_opt_state,
    check_state,
    check_unwritten,
    mark_donated,
    tensor_spec,
    tensor_versions,
)
from mstudio.train.memory import carry_memory, episode_starts
from mstudio.train.packing import Packing, packing_for
from mstudio.train.skip import keep_if
from mstudio.train.state import TrainState, objective_batch

__all__ = [
    "Gradients",
    "GradientReduce",
    "TrainStep",
    "average_across_ranks",
    "make_train_step",
    "reached_parameters",
    "train_step_function",
    "train_step_parts",
    "value_and_grad_autograd",
    "value_and_grad_func",
]

LossFn = Callable[[dict[str, Tensor]], tuple[Tensor, Any]]
#: Metrics the step adds itself; an objective's metric of one of these names would be overwritten.
STEP_METRICS = frozenset({"grad_norm", "lr", "nonfinite", "skipped_updates"})
StepFn = Callable[[TrainState, Mapping[str, Any]], tuple[TrainState, dict[str, Tensor]]]


def _standard_strides(tensor: Tensor) -> Tensor:
    """``tensor`` if its strides are those of a new contiguous tensor of its shape, else such a copy.

    ``.contiguous()`` is not enough: it returns a tensor whose only odd strides are on size-1 dimensions as it is,
    such as ``timestamp[:, -1]`` of a one-row ``(1, T)`` batch (stride ``T``, a view of the batch). A compiled
    step guards on its inputs' exact strides, so such a tensor in the new state recompiled the step on its next
    call (VPT ``1x`` at B1 x T16), and the state kept a view of the caller's batch.
    """
    standard, size_after = [], 1
    for size in reversed(tensor.shape):
        standard.append(size_after)
        size_after *= max(size, 1)
    if tensor.stride() == tuple(reversed(standard)):
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def value_and_grad_func(loss_fn: LossFn, params: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor, Any]:
    """``(grads, loss, aux)`` of ``loss_fn(params) -> (loss, aux)`` by ``torch.func.grad_and_value``.

    The transform dynamo traces into the compiled step's single graph. ``aux`` comes back untracked.
    """
    grads, (loss, aux) = torch.func.grad_and_value(loss_fn, has_aux=True)(params)
    return grads, loss, aux


def value_and_grad_autograd(loss_fn: LossFn, params: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor, Any]:
    """``(grads, loss, aux)`` as :func:`value_and_grad_func` computes them, by ``torch.autograd.grad``.

    Used by the eager step: torch.func's per-op wrapping costs 12-60 % more per step on VPT than autograd's
    own backward, which is what MineStudio's ``loss.backward()`` runs. (Dynamo cannot trace
    ``torch.autograd.grad`` into a graph, hence two implementations of one function.)
    """
    leaves = {name: p.detach().requires_grad_() for name, p in params.items()}
    with torch.enable_grad():
        loss, aux = loss_fn(leaves)
        grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, grads)), loss.detach(), detach_tree(aux)


def _ema(ema: dict[str, Tensor] | None, params: dict[str, Tensor], decay: float | None) -> dict[str, Tensor] | None:
    """``ema + (1 - decay) * (params - ema)`` per parameter (``torch.lerp``), or ``ema`` when not kept."""
    if ema is None or decay is None:
        return ema
    names = list(ema)
    return dict(zip(names, torch._foreach_lerp([ema[n] for n in names], [params[n] for n in names], 1 - decay)))


def _update_donated(optimizer: GradientTransformation, grads: dict[str, Tensor | None], state: TrainState,
                    current: dict[str, Tensor], loss: Tensor, grad_norm: Tensor, lr: Tensor | None,
                    ema_decay: float | None, skip_nonfinite: bool) -> tuple[dict[str, Tensor], Any, Any, Tensor]:
    """The optimizer update written into ``state``'s own tensors (:func:`mstudio.optim.donated`), eager only.

    In place there is no old value to fall back on, so the non-finite guard decides *before* anything is
    written, from the loss, the gradient norm and the learning rate (one host sync, which the eager path may
    afford). The pure guard also tests the update's norm; from a finite state (checked on the first call, and
    kept finite by the guard) with those three finite, AdamW's update is finite (it divides by
    ``sqrt(v) + eps >= eps``), so the verdict is the same without that extra pass over the parameters.

    Returns:
        ``(params, opt_state, ema, finite)``: the state's own tensors, now holding the new values (the old ones
        when the update was skipped), and the verdict (bool 0-d).
    """
    finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
    if lr is not None:
        finite = finite & torch.isfinite(lr)
    if skip_nonfinite and not bool(finite):
        return current, state.opt_state, state.ema, finite
    with donated(), known_global_norm(grads, grad_norm):
        updates, opt_state = optimizer.update(grads, state.opt_state, current)
        params = apply_updates(current, updates)
    ema = state.ema
    if ema is not None and ema_decay is not None:
        names = list(ema)
        torch._foreach_lerp_([ema[n] for n in names], [params[n] for n in names], 1 - ema_decay)
    return params, opt_state, ema, finite


def _update_pure(optimizer: GradientTransformation, grads: dict[str, Tensor | None], opt_state: Any,
                 current: dict[str, Tensor], loss: Tensor, grad_norm: Tensor, packing: Packing | None,
                 skip_nonfinite: bool) -> tuple[dict[str, Tensor], Any, Tensor]:
    """The optimizer update as new tensors, with the non-finite guard: ``(params, opt_state, finite)``.

    With ``packing`` (traced, an elementwise optimizer), ``grads`` come packed and the parameters and the
    parameter-shaped parts of ``opt_state`` are packed here, updated as flat buffers and copied back out.
    """
    old_params, old_opt_state = current, opt_state
    if packing is not None:
        old_params, old_opt_state = packing.pack(current), packing.pack_state(opt_state)
    with known_global_norm(grads, grad_norm):  # clipping reuses the step's norm
        updates, new_opt_state = optimizer.update(grads, old_opt_state, old_params)
    params = apply_updates(old_params, updates)
    # A NaN or inf on its way to the parameters shows in one of these: the loss, the gradients, or the update
    # itself (a NaN learning rate from a schedule, an inf in the optimizer state).
    finite = torch.isfinite(loss) & torch.isfinite(grad_norm) & torch.isfinite(global_norm(updates))
    if packing is None:
        if skip_nonfinite:
            params, new_opt_state = keep_if(finite, params, current), keep_if(finite, new_opt_state, opt_state)
        return params, new_opt_state, finite
    if skip_nonfinite:  # the packed buffers are this step's own: the guard may write into them
        params = keep_if(finite, params, old_params, writable=True)
        new_opt_state = packing.keep_state_if(finite, new_opt_state, old_opt_state, opt_state)
    return packing.unpack(params, current), packing.unpack_state(new_opt_state, opt_state), finite


def train_step_function(
    apply_fn: Callable,
    objective: Objective,
    optimizer: GradientTransformation,
    reached: frozenset[str],
    value_and_grad: Callable = value_and_grad_func,
    *,
    autocast_dtype: torch.dtype | None = None,
    ema_decay: float | None = None,
    skip_nonfinite: bool = True,
    grad_reduce: GradientReduce | None = None,
    donate: bool = False,
    pack: bool = True,
) -> StepFn:
    """The pure step function for parameters ``reached`` by the objective (the others get no update).

    Args:
        apply_fn: from :func:`mstudio.functionalize`.
        objective: ``(batch, latents, params) -> {"loss", **metrics}``; it sees the batch plus
            ``batch["step"]`` and ``batch["hyperparams"]`` (see :mod:`losses.api`).
        optimizer: a :class:`~mstudio.optim.GradientTransformation`.
        reached: names of the parameters the objective's loss depends on.
        value_and_grad: :func:`value_and_grad_func` (traceable) or :func:`value_and_grad_autograd` (eager).
        autocast_dtype: run forward and objective under ``torch.autocast`` in this dtype (``None``: off).
        ema_decay: update ``state.ema`` with this decay after every applied update (``None``: leave it).
        skip_nonfinite: when the loss, the gradients or the update are not finite, keep the parameters,
            optimizer state and EMA as they were (``torch.where``: no host sync) and count it in
            ``skipped_updates``. Either way ``metrics["nonfinite"]`` (long 0-d, 1 or 0) says whether they were.
        grad_reduce: ``Gradients -> Gradients`` applied between the two halves, before clipping and the
            optimizer (data parallelism: :func:`average_across_ranks`); ``None``: nothing in between.
        donate: eager only: the step consumes ``state``, writing the update into its tensors (the returned
            state holds them) instead of allocating new ones; see :meth:`TrainStep.__call__`.
        pack: traced, run an element-wise optimizer over packed buffers (:mod:`mstudio.train.packing`);
            ``False``: tensor by tensor.
    """

    gradients, update = train_step_parts(apply_fn, objective, optimizer, reached, value_and_grad,
                                         autocast_dtype=autocast_dtype, ema_decay=ema_decay,
                                         skip_nonfinite=skip_nonfinite, grad_reduce=grad_reduce, pack=pack)

    def train_step(state: TrainState, batch: Mapping[str, Any]) -> tuple[TrainState, dict[str, Tensor]]:
        return update(state, batch, gradients(state, batch), donate=donate)

    return train_step


class Gradients(NamedTuple):
    """What the first half of a step computes: ``grads`` (name -> tensor, for the ``reached`` parameters only),
    the ``loss``, the objective's ``out`` dict and the policy's ``state_out``."""

    grads: dict[str, Tensor]
    loss: Tensor
    out: dict[str, Tensor]
    state_out: Any


#: What runs between the two halves of a step (:func:`average_across_ranks`).
GradientReduce = Callable[[Gradients], Gradients]


def average_across_ranks(group: torch.distributed.ProcessGroup | None = None) -> GradientReduce:
    """``reduce(computed) -> computed`` with the gradients, the loss and the objective's floating-point metrics
    averaged over the ranks of ``group`` (default: the world): data parallelism inside the pure step.

    With ``B / R`` rows on each of ``R`` ranks and an objective that averages over rows (as ``behavior_clone``
    does), the mean of the ranks' gradients is the gradient one process computes on all ``B`` rows, so what
    follows (clipping by the global norm, AdamW, the non-finite guard) is the same on every rank and the
    replicas stay equal. The loss is averaged too: the guard's verdict must be the same on every rank, and a
    loss that is NaN or inf on one rank makes the mean so on all. Integer and Python-number metrics and
    ``state_out`` (each rank's own rows) are left as they are.

    Traceable (functional collectives): the compiled step stays one graph. The group is resolved now.
    """
    mean = mean_across_ranks(group)

    def reduce(computed: Gradients) -> Gradients:
        floats = {key: value for key, value in computed.out.items()
                  if key != "loss" and isinstance(value, Tensor) and value.is_floating_point()}
        grads, loss, floats = mean((computed.grads, computed.loss, floats))
        return computed._replace(grads=grads, loss=loss, out={**computed.out, **floats, "loss": loss})

    return reduce


def train_step_parts(
    apply_fn: Callable,
    objective: Objective,
    optimizer: GradientTransformation,
    reached: frozenset[str],
    value_and_grad: Callable = value_and_grad_func,
    *,
    autocast_dtype: torch.dtype | None = None,
    ema_decay: float | None = None,
    skip_nonfinite: bool = True,
    grad_reduce: GradientReduce | None = None,
    pack: bool = True,
) -> tuple[Callable[[TrainState, Mapping[str, Any]], Gradients],
           Callable[[TrainState, Mapping[str, Any], Gradients], tuple[TrainState, dict[str, Tensor]]]]:
    """:func:`train_step_function`'s two halves, pure: ``gradients(state, batch) -> Gradients`` (memory carry,
    forward, objective, gradients) and ``update(state, batch, gradients, *, donate=False) -> (new_state, metrics)``
    (``grad_reduce`` when given, optimizer, guard, EMA, carry; ``donate``: in place, eager only).
    ``update(state, batch, gradients(state, batch))`` is the step.

    They are apart so the first can be ``torch.func.vmap``-ed over stacked states (a sweep of K variants in one
    call, :mod:`mstudio.research.sweep`) while the second, whose ``torch._foreach_*`` kernels have no vmap rule,
    runs per variant. Arguments as for :func:`train_step_function`.
    """

    def gradients(state: TrainState, batch: Mapping[str, Any]) -> Gradients:
        timestamp = batch["timestamp"]
        precision = (
            functools.partial(torch.autocast, timestamp.device.type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext
        )
        memory = carry_memory(state.memory, state.init_memory, episode_starts(timestamp, state.last_timestamp))
        seen_by_objective = objective_batch(batch, state)
        trainable = {name: p for name, p in state.params.items() if name in reached}
        untouched = {name: p for name, p in state.params.items() if name not in reached}

        def loss_fn(trainable: dict[str, Tensor]) -> tuple[Tensor, Any]:
            params = {**untouched, **trainable}
            with precision():
                latents, state_out = apply_fn(params, state.buffers, batch, memory)
                out = objective(seen_by_objective, latents, params)
            return out["loss"], (out, state_out)

        grads, loss, (out, state_out) = value_and_grad(loss_fn, trainable)
        return Gradients(grads, loss, dict(out), state_out)

    def update(state: TrainState, batch: Mapping[str, Any], computed: Gradients, *,
               donate: bool = False) -> tuple[TrainState, dict[str, Tensor]]:
        # Detached: parameters handed in with requires_grad (a state built by hand) would otherwise give a new
        # state that carries an autograd graph, growing by one update every step. (Views: a donated update
        # writes through them into the state's own tensors.)
        current = {name: p.detach() for name, p in state.params.items()}
        # None marks "no gradient": the optimizer leaves those parameters and their moments alone.
        grads = {name: computed.grads.get(name) for name in current}
        # Traced, an elementwise optimizer runs over one flat buffer per dtype (mstudio.train.packing); packed
        # first, data-parallel ranks average one buffer rather than every tensor.
        packing = packing_for(optimizer, grads, current) if pack and torch.compiler.is_compiling() else None
        if packing is not None:
            grads = packing.pack(grads)
            computed = computed._replace(grads=grads)
        if grad_reduce is not None:  # before clipping, so the global norm is the norm of the global gradient
            computed = grad_reduce(computed)
            grads = computed.grads if packing is not None else {name: computed.grads.get(name) for name in current}
        loss, out = computed.loss, computed.out
        grad_norm = global_norm(grads)
        metrics = {key: torch.as_tensor(value).detach() for key, value in out.items()}
        lr = optimizer.learning_rate(state.opt_state) if optimizer.learning_rate is not None else None
        if lr is not None:
            metrics["lr"] = lr.to(torch.float32)
        # Truncated BPTT: no gradient flows into the next batch. Standard strides, because the compiled step
        # guards on input strides and a strided view here would recompile it on the second call.
        carried = trees.tree_map(lambda t: _standard_strides(t.detach()), computed.state_out)
        if donate:
            params, opt_state, ema, finite = _update_donated(optimizer, grads, state, current, loss, grad_norm, lr,
                                                             ema_decay, skip_nonfinite)
            if skip_nonfinite and not finite:
                carried = state.init_memory  # as the pure guard: a skipped batch restarts every row's memory
        else:
            params, opt_state, finite = _update_pure(optimizer, grads, state.opt_state, current, loss, grad_norm,
                                                     packing, skip_nonfinite)
            ema = _ema(state.ema, params, ema_decay)
            if skip_nonfinite:
                ema = keep_if(finite, ema, state.ema)
                carried = keep_if(finite, carried, state.init_memory)  # a skipped batch restarts every row's memory
        skipped = state.skipped_updates
        if skip_nonfinite:
            skipped = skipped + (~finite).to(skipped.dtype)
        metrics["grad_norm"] = grad_norm
        metrics["nonfinite"] = (~finite).to(skipped.dtype)
        metrics["skipped_updates"] = skipped
        new_state = state._replace(
            params=params,
            opt_state=opt_state,
            memory=carried,
            last_timestamp=_standard_strides(batch["timestamp"][:, -1]),  # with B = 1, a view of the batch
            step=state.step + 1,
            ema=ema,
            skipped_updates=skipped,
        )
        return new_state, metrics

    return gradients, update


class TrainStep:
    """``step(state, batch) -> (new_state, metrics)``, built by :func:`make_train_step`.

    The first call probes the objective once, eagerly, to learn which parameters its loss reaches
    (``torch.func`` returns zero gradients, not ``None``, for the others, yet ``torch.optim.AdamW`` and thus
    MineStudio leave them untouched: no decay, no moment update), checks that the policy's forward is
    stateless, then builds (and compiles) the step; it also checks, once, that the state's optimizer state fits
    the optimizer and that every float tensor of the state is finite (one host sync). Every call checks the
    state (:func:`mstudio.train.checks.check_state`, no sync) and validates and normalizes the batch first.

    Data-parallel (``data_parallel=True``), the first call also checks that every rank reaches the same parameters
    and holds the same state (:func:`mstudio.distributed.check_replicas`), and a failed collective (a rank that
    died or hangs) raises :class:`mstudio.distributed.CollectiveFailure`.

    Attributes:
        reached: names of the parameters that get gradients (set by the first call).
    """

    def __init__(self, policy: nn.Module, objective: Objective, optimizer: GradientTransformation, *,
                 compile: bool, validate: bool, autocast_dtype: torch.dtype | None, ema_decay: float | None,
                 skip_nonfinite: bool, data_parallel: bool = False, pack_optimizer: bool = True,
                 compile_options: Mapping[str, Any] | None = None):
        self.policy, self.objective, self.optimizer = policy, objective, optimizer
        self._compile_options = check_compile_options(compile_options)
        self.compile, self.validate, self.data_parallel = compile, validate, data_parallel
        self._options = dict(autocast_dtype=autocast_dtype, ema_decay=ema_decay, skip_nonfinite=skip_nonfinite,
                             pack=pack_optimizer)
        self.apply_fn, params, buffers = functionalize(policy)
        self._spec = (tensor_spec(params), tensor_spec(buffers))  # what every state handed in must hold
        self.reached: frozenset[str] | None = None
        self._step_fn: StepFn | None = None
        self._batch_keys: frozenset[str] | None = None
        self._mask_dtype: torch.dtype | None = None
        self._cuda_graphs = False
        self._donating_fn: StepFn | None = None  # eager, in place; None when compiled

    @property
    def built(self) -> bool:
        """Whether the first call has run: the checks done and, compiled, the step traced and compiled."""
        return self._step_fn is not None

    def __call__(self, state: TrainState, batch: Mapping[str, Any], *,
                 donate: bool = False) -> tuple[TrainState, dict[str, Tensor]]:
        """One step: ``(new_state, metrics)``; ``state`` and ``batch`` are left as they are unless ``donate``.

        Args:
            state: the current :class:`TrainState`.
            batch: one batch (layout in :mod:`mstudio.batch`).
            donate: hand ``state`` over to the step, which may then reuse its tensors: the eager step
                (``compile=False``) writes the optimizer update into them with in-place ``torch._foreach_*``
                ops (:func:`mstudio.optim.donated`) instead of allocating a new state, the same numbers up
                to one rounding of the step (``adamw``'s in-place update is ``torch.optim.AdamW``'s). A
                compiled step computes as without donation (its graph already fuses the update). Either way
                ``state`` is then spent: the returned state may share its tensors, and passing it to a step
                again raises ``RuntimeError``. Use it when nothing else keeps the old state (a training loop
                that only ever steps the newest state). Eagerly, the non-finite guard then decides before
                writing, with one host sync (see ``_update_donated``).

        With CUDA graphs (compiled on CUDA) every replay overwrites the previous replay's outputs, so the step
        returns metrics the caller owns (copied out of the graph's buffers) and ``state`` is always spent, as if
        donated; to keep a state past the next step (a checkpoint written in the background), copy it
        (``optree.tree_map(torch.clone, state)``) before that step.

        Raises:
            RuntimeError: ``state`` was donated to an earlier call.
        """
        check_is_state(state)  # before state.batch_size is read
        check_not_donated(state)
        batch = self._prepare(state, batch, state.batch_size)
        step_fn = self._step_fn
        if donate and self._donating_fn is not None:
            mark_donated(state)  # first: an eager donated step that fails midway has written part of the state
            step_fn = self._donating_fn
        if self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        if self.data_parallel:
            with collective_failures("the data-parallel train step"):
                new_state, metrics = step_fn(state, batch)
        else:
            new_state, metrics = step_fn(state, batch)
        if self._cuda_graphs:
            # The next replay writes its outputs into the same memory: metrics a caller keeps past the next step
            # (logged every N steps) are copied out now (a few 0-d copies); the state handed in was copied into
            # the graph's inputs and is overwritten by the next replay, so it is spent, as if donated.
            metrics = {key: value.clone() for key, value in metrics.items()}
            donate = True
        if donate:
            mark_donated(state)  # compiled: after the call, so the graph never sees a marked tensor
        return new_state, metrics

    def _prepare(self, state: TrainState, batch: Mapping[str, Any], batch_size: int) -> dict[str, Any]:
        """``batch`` checked and normalized; on the first call, the step built for ``state`` (one, unstacked)."""
        check_state(state, *self._spec)
        check_batch(batch, batch_size=batch_size, check_values=self.validate)
        for reserved in (STEP_KEY, HYPERPARAMS_KEY):
            if reserved in batch:
                raise ValueError(f"batch key {reserved!r} is reserved: the step hands objectives its own there "
                                 "(see losses.api)")
        if self._mask_dtype is None and "mask" in batch:
            self._mask_dtype = batch["mask"].dtype  # a mask filled in later takes the run's dtype: no recompile
        batch = normalize_batch(batch, mask_dtype=self._mask_dtype or torch.uint8)
        if self._step_fn is None:
            self._build(state, batch)
        elif frozenset(batch) != self._batch_keys:
            raise ValueError(
                f"batch keys changed since the first batch: missing {sorted(self._batch_keys - set(batch))}, "
                f"new {sorted(set(batch) - self._batch_keys)}; every batch of a run must have the same tensor keys"
            )
        return batch

    def _build(self, state: TrainState, batch: Mapping[str, Any]) -> None:
        if (state.ema is None) != (self._options["ema_decay"] is None):
            raise ValueError(
                "make_train_step(ema_decay=...) and init_state(..., ema=True) go together: "
                f"ema_decay={self._options['ema_decay']}, state.ema is {'absent' if state.ema is None else 'kept'}"
            )
        check_opt_state(state, self.optimizer)
        check_finite_state(state)
        reuse_freed_memory(state.step.device)  # a CPU step's large buffers are allocated per call: no page faults
        self.reached = reached_parameters(self.policy, self.objective, state, batch)
        grad_reduce = None
        if self.data_parallel:
            grad_reduce = average_across_ranks()  # raises first when no process group is initialised
            with collective_failures("the data-parallel step's first-call checks"):
                check_same_across_ranks(",".join(sorted(self.reached)), "the parameters the objective reaches")
                check_replicas(state)
        self._batch_keys = frozenset(batch)
        traceable = value_and_grad_func if self.compile else value_and_grad_autograd
        step_fn = train_step_function(self.apply_fn, self.objective, self.optimizer, self.reached, traceable,
                                      **self._options, grad_reduce=grad_reduce)
        if not self.compile:
            self._step_fn = step_fn
            self._donating_fn = train_step_function(self.apply_fn, self.objective, self.optimizer, self.reached,
                                                    traceable, **self._options, grad_reduce=grad_reduce, donate=True)
            return
        configure_compile_cache()  # inductor's FX-graph and AOTAutograd caches in a persistent directory
        if state.step.device.type == "cpu":
            probe_cpu_compiler_in_background()  # overlaps inductor's compiler probe with dynamo's tracing
        self._cuda_graphs = state.step.device.type == "cuda"
        # CUDA graphs replay the whole step as one launch; on CPU there is nothing to replay.
        options = inductor_options(self._compile_options, cuda_graphs=self._cuda_graphs)
        # Compiled as mstudio compiles (mstudio.compile.compiled_call: kernels built in batches, the optimizer's
        # loops fused); VPT's max-pool run by ATen's kernels (mstudio.models.vpt.max_pool).
        self._step_fn = with_aten_max_pool(compiled_call(torch.compile(step_fn, fullgraph=True, options=options)))


def reached_parameters(policy: nn.Module, objective: Objective, state: TrainState,
                       batch: Mapping[str, Any]) -> frozenset[str]:
    """Run forward and objective once with autograd and return the names of the parameters the loss reaches.

    Also checks that the forward and the objective are pure (no attribute or buffer written on the module, no
    batch tensor written in place), the objective's output keeps the contract and uses no metric name the step
    reports itself, the loss reaches some parameter and ``state_out`` has the memory's structure (the checks
    :class:`TrainStep` runs on its first call).
    """
    apply_fn, _, _ = functionalize(policy)
    params = {name: p.detach().requires_grad_() for name, p in state.params.items()}
    label = objective_name(objective)

    def run():
        versions = tensor_versions(batch, "batch")
        with torch.enable_grad():
            latents, state_out = apply_fn(params, state.buffers, batch, state.memory)
            check_unwritten(versions, f"{type(policy).__name__}.forward")
            out = objective(objective_batch(batch, state), latents, params)
            check_unwritten(versions, f"objective {label}")
        return out, state_out

    out, state_out = check_stateless_forward(policy, state.buffers, run)
    out = check_output(out, objective)
    taken = sorted(STEP_METRICS & set(out))
    if taken:
        raise ValueError(f"objective {label} returns metric(s) {taken}, which the step reports itself; rename them")
    if not out["loss"].requires_grad:
        raise ValueError(f"the loss of objective {label} depends on no trainable parameter: it tracks no gradient "
                         "(detached, or computed from constants only)")
    _check_same_memory(state.memory, state_out)
    names = list(params)
    grads = torch.autograd.grad(out["loss"], [params[n] for n in names], allow_unused=True)
    reached = frozenset(name for name, grad in zip(names, grads) if grad is not None)
    if not reached:
        raise ValueError(f"the loss of objective {label} depends on no trainable parameter: its gradient reaches "
                         f"none of the policy's {len(names)} parameters, only other tensors that require grad")
    return reached


def _check_same_memory(memory: Any, state_out: Any) -> None:
    """``state_out`` must have ``memory``'s structure, shapes and dtypes, or the carry would recompile."""
    spec = lambda tree: optree.tree_map(lambda t: (tuple(t.shape), t.dtype), tree)  # noqa: E731
    if spec(memory) != spec(state_out):
        raise ValueError(
            "the policy's state_out must have the structure, shapes and dtypes of its state_in "
            f"(initial_state); got {spec(state_out)} for {spec(memory)}"
        )


def make_train_step(
    policy: nn.Module,
    objective: Objective,
    optimizer: GradientTransformation,
    *,
    compile: bool = True,
    validate: bool = True,
    autocast_dtype: torch.dtype | None = None,
    ema_decay: float | None = None,
    skip_nonfinite: bool = True,
    data_parallel: bool = False,
    pack_optimizer: bool = True,
    compile_options: Mapping[str, Any] | None = None,
) -> TrainStep:
    """Build ``step(state, batch) -> (new_state, metrics)`` for ``policy`` trained on ``objective``.

    One step, for episode windows ``batch`` (layout in :mod:`mstudio.batch`):

    1. memory carry (MineStudio's ``_make_memory``): rows whose ``timestamp[:, 0] != last_timestamp + 1``
       restart from ``init_memory``, the others continue from ``memory``;
    2. ``latents, state_out = policy(batch, memory)`` statelessly with ``state.params``;
    3. ``out = objective(batch | {"step", "hyperparams"}, latents, params)``; gradients of ``out["loss"]``
       with respect to the parameters it reaches;
    4. optimizer update (clipping, AdamW, schedule); parameters without a gradient stay bit-identical;
       with ``skip_nonfinite``, a non-finite loss, gradient or update leaves parameters and optimizer state as
       they were; the EMA follows the parameters when kept;
    5. ``memory = state_out`` detached (truncated BPTT), ``last_timestamp = timestamp[:, -1]``, ``step + 1``.

    On its first call with a CPU state the step makes the process's malloc keep the large blocks it frees
    (:func:`mstudio.host_memory.reuse_freed_memory`; ``MSTUDIO_MALLOC=system`` opts out).

    Args:
        policy: an ``nn.Module`` following :mod:`mstudio.policy`.
        objective: ``(batch, latents, params) -> {"loss": scalar, **metrics}`` (see :mod:`losses.api`).
        optimizer: e.g. :func:`mstudio.optim.adamw`.
        compile: compile the whole step as one graph (``torch.compile(fullgraph=True)``; on CUDA with CUDA
            graphs). ``False`` runs the same step eagerly. Compiled graphs are cached on disk
            (:mod:`mstudio.compile`: ``$TORCHINDUCTOR_CACHE_DIR``, else ``~/.cache/mstudio/inductor``), so
            another process building the same step loads it instead of compiling again. Compiled, an
            element-wise optimizer (``adamw``) updates flat buffers (:mod:`mstudio.train.packing`).
        validate: check every batch's action indices are in range (one device sync per step). Keys, dtypes
            and shapes are always checked.
        autocast_dtype: e.g. ``torch.bfloat16`` on CUDA for mixed precision; ``None`` (default) runs in the
            parameters' precision. (bf16 on CPU is two orders of magnitude slower than float32.)
        ema_decay: keep ``state.ema`` (make the state with ``init_state(..., ema=True)``) as
            ``ema <- ema + (1 - ema_decay) * (params - ema)`` after every update; ``None``: no EMA.
        skip_nonfinite: the non-finite guard above (default on).
        data_parallel: between 3 and 4, average the gradients, the loss and the float metrics over the ranks of
            the initialised ``torch.distributed`` process group (:func:`average_across_ranks`: functional
            collectives, still one compiled graph), so every rank applies the same update; each rank passes its own
            rows and keeps its own memory. Launch with torchrun and call
            :func:`mstudio.distributed.init_distributed` first. ``False`` (default): a single process, unchanged.
        pack_optimizer: compiled, run an element-wise optimizer over packed buffers (:mod:`mstudio.train.packing`;
            default). ``False``: tensor by tensor, as eagerly (clipping by the norm of per-tensor norms, every
            new tensor its own; compiling takes longer). No effect on the eager step.
        compile_options: inductor settings for the compiled step (``torch.compile(options=...)``; names in
            ``torch._inductor.list_options()``), e.g. ``{"cpp_wrapper": True}``: a C++ wrapper around the
            kernels instead of Python; on 2 CPU cores, interleaved with the default
            (``benchmarks/bench_compiled_variants.py``), VPT ``tiny`` 15.22 -> 14.32 ms and ``small`` 179.5 ->
            176.3 ms a step, for a longer cold compile (one g++ run over the wrapper and every kernel; VPT
            ``tiny`` 85 s where the default takes 53 s with its kernels built in batches, one fresh process each).
            ``None``: inductor's defaults. No effect on the eager step.

    Returns:
        A :class:`TrainStep`; ``metrics`` holds the objective's outputs plus ``grad_norm`` (global norm before
        clipping), ``lr`` (the learning rate this update applied), ``nonfinite`` (long 0-d: 1 when this step's
        loss, gradient norm or update norm was NaN or inf, else 0; reported whether or not ``skip_nonfinite``
        skips the update, computed on the device without a host sync) and ``skipped_updates`` (so far), all as
        detached tensors. An objective may not return metrics of these names. Data-parallel, the loss and the
        objective's float metrics are means over the ranks, and every metric is the same on every rank.

    Raises:
        TypeError, ValueError: at build, a bad argument; on a call, a malformed batch (:mod:`mstudio.batch`) or
            state (another policy's, another batch size's or optimizer's, or, on the first call, holding NaN),
            or an objective that breaks the contract of :mod:`losses.api`; all before any work. Data-parallel, on
            the first call: ``RuntimeError`` without a process group, ``ValueError`` when the ranks' states or
            reached parameters differ; on any call, :class:`mstudio.distributed.CollectiveFailure` when another
            rank died or timed out.
    """
    check_policy(policy)
    if not callable(objective):
        raise TypeError(f"objective must be callable (batch, latents, params) -> dict, got {type(objective).__name__}")
    if not isinstance(optimizer, GradientTransformation):
        raise TypeError(f"optimizer must be a mstudio.optim.GradientTransformation, got {type(optimizer).__name__}")
    if ema_decay is not None and not 0 <= ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
    for name, flag in (("data_parallel", data_parallel), ("pack_optimizer", pack_optimizer)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__} {flag!r}")
    return TrainStep(policy, objective, optimizer, compile=compile, validate=validate, autocast_dtype=autocast_dtype,
                     ema_decay=ema_decay, skip_nonfinite=skip_nonfinite, data_parallel=data_parallel,
                     pack_optimizer=pack_optimizer, compile_options=compile_options)
