"""MineStudio's front door: ``MineLightning``, ``ObjectiveCallback`` and the built-in callbacks, on mstudio's step.

A MineStudio training script keeps its shape::

    from mstudio.compat import BehaviorCloneCallback, MineLightning

    trainer = MineLightning(policy, callbacks=[BehaviorCloneCallback(weight=0.01)], learning_rate=4e-5,
                            weight_decay=1.81e-4, warmup_steps=2000)
    metrics = trainer.fit(loader, max_steps=10_000, gradient_clip_val=1.0)   # trainer.mine_policy is trained

Underneath, the callbacks become one pure objective (:func:`callbacks_to_objective`) and ``fit`` runs
:func:`mstudio.make_train_step` (compiled by default). The built-in callbacks map to :mod:`losses` directly.
A callback of your own runs unchanged: it is called with MineStudio's arguments while ``mine_policy`` is
reparametrized with the parameters being differentiated, so weights it reads through ``mine_policy`` get
gradients. If its code cannot be compiled (``.item()`` in an ``if``, ``print`` of a tensor, ...), ``fit``
warns once and trains eagerly instead.

Where this differs from MineStudio: ``batch_idx`` inside ``__call__`` is the step counter as a long 0-d
tensor (a traced value, not a Python int; ``before_step`` gets a Python int); callbacks see only the
batch's tensor entries; ``bc_weight`` / ``kl_weight`` are tensors; and validation keeps its own memory.
"""

from __future__ import annotations

import inspect
import os
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import optree
import torch
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module

import losses
from mstudio.batch import check_batch, normalize_batch
from mstudio.distributions import diagonal_gaussian_kl
from mstudio.optim import adamw
from mstudio.policy import check_policy
from mstudio.train import TrainState, init_state, make_train_step
from mstudio.train.evaluate import evaluate

__all__ = [
    "BehaviorCloneCallback",
    "KLDivergenceCallback",
    "MineLightning",
    "ObjectiveCallback",
    "callbacks_to_objective",
]

Batch = dict[str, Any]
#: Entries the train step adds to the batch it hands objectives; callbacks get the batch without them.
_STEP_ENTRIES = (losses.STEP_KEY, losses.HYPERPARAMS_KEY)


class ObjectiveCallback:
    """MineStudio's objective callback (``minestudio.offline.mine_callbacks.ObjectiveCallback``).

    Subclass it and override ``__call__`` (and optionally ``before_step``). ``__call__`` may read
    ``mine_policy``'s weights (``mine_policy.pi_head.logprob(...)``, ``mine_policy.some_layer.weight``):
    during training they are the parameters being differentiated. Keep it traceable (no ``.item()``,
    ``print`` of tensor values or branches on them) and the whole step compiles into one graph.
    """

    def __init__(self) -> None:
        """Nothing to set up; subclasses store their configuration (e.g. a weight)."""

    def __call__(
        self, batch: Batch, batch_idx: Tensor, step_name: str, latents: dict[str, Any], mine_policy: nn.Module
    ) -> dict[str, Any]:
        """This callback's objective terms.

        Args:
            batch: the batch's tensor entries (``image``, ``agent_action``, ``timestamp``, ``mask``, ...).
            batch_idx: long 0-d tensor, the updates done before this batch (the step counter).
            step_name: ``"train"`` or ``"val"``.
            latents: what the policy's forward returned (``pi_logits``, ``vpred``, ...).
            mine_policy: the policy module, holding the parameters of this step.

        Returns:
            ``{"loss": float 0-d tensor, **metrics}``: every callback's ``loss`` is added into the loss that is
            optimized; other entries are logged (same-named entries of several callbacks are added). The
            base class returns ``{}``.
        """
        del batch, batch_idx, step_name, latents, mine_policy
        return {}

    def before_step(self, batch: Mapping[str, Any], batch_idx: int, step_name: str) -> Mapping[str, Any]:
        """Hook on the raw batch before the step (eager, outside the compiled graph); returns the batch to use.

        Args:
            batch: the batch as the data source yielded it (non-tensor entries included).
            batch_idx: the step counter (train) or the batch's index in the validation pass, a Python int.
            step_name: ``"train"`` or ``"val"``.
        """
        del batch_idx, step_name
        return batch


class _WeightedLossCallback(ObjectiveCallback):
    """A MineStudio callback that is ``weight`` times one pure loss of :mod:`losses` (``_loss``)."""

    _loss: Callable[..., dict[str, Tensor]]

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight

    def objective(self) -> losses.Objective:
        """The pure objective this callback computes: ``losses.weighted(<its loss>, weight)``."""
        return losses.weighted(type(self)._loss, self.weight)

    def __call__(
        self, batch: Batch, batch_idx: Tensor, step_name: str, latents: dict[str, Any], mine_policy: nn.Module
    ) -> dict[str, Tensor]:
        """See :class:`ObjectiveCallback`; the keys read are those of the loss."""
        del batch_idx, step_name, mine_policy
        return self.objective()(batch, latents, {})


class BehaviorCloneCallback(_WeightedLossCallback):
    """MineStudio's ``BehaviorCloneCallback``: ``weight`` times the behaviour-cloning NLL
    (:func:`losses.behavior_clone`; reads ``batch["agent_action"]``, ``batch["mask"]``, ``latents["pi_logits"]``).

    Returns ``loss``, ``camera_loss``, ``button_loss``, ``entropy`` and ``bc_weight`` (a tensor here).
    """

    _loss = staticmethod(losses.behavior_clone)


class KLDivergenceCallback(_WeightedLossCallback):
    """MineStudio's ``KLDivergenceCallback``: ``weight`` times the mean Gaussian KL (:func:`losses.kl_gaussian`;
    reads ``latents["posterior_dist"]`` and ``latents["prior_dist"]``).

    Returns ``loss``, ``kl_div`` and ``kl_weight`` (a tensor here).
    """

    _loss = staticmethod(losses.kl_gaussian)

    def kl_divergence(self, q_mu: Tensor, q_log_var: Tensor, p_mu: Tensor, p_log_var: Tensor) -> Tensor:
        """``KL(q || p)`` of diagonal Gaussians, float ``(B, D)`` each -> ``(B,)`` (MineStudio's helper method)."""
        return diagonal_gaussian_kl(q_mu, q_log_var, p_mu, p_log_var)


#: Callbacks whose exact type maps to a pure objective (a subclass may override ``__call__``, so it does not).
_BUILT_IN: dict[type, Callable[[Any], losses.Objective]] = {
    BehaviorCloneCallback: BehaviorCloneCallback.objective,
    KLDivergenceCallback: KLDivergenceCallback.objective,
}


def _is_built_in(callback: ObjectiveCallback) -> bool:
    return type(callback) in _BUILT_IN


def _callback_objective(callback: ObjectiveCallback, policy: nn.Module, step_name: str) -> losses.Objective:
    """One callback as an objective: built-ins directly, others called with ``policy`` reparametrized."""
    if _is_built_in(callback):
        return _BUILT_IN[type(callback)](callback)
    name = type(callback).__name__

    def objective(batch: Mapping[str, Any], latents: Mapping[str, Any], params: Mapping[str, Tensor]) -> dict[str, Any]:
        if losses.STEP_KEY not in batch:
            raise ValueError(f"callback {name} reads batch_idx from batch[{losses.STEP_KEY!r}] (long 0-d tensor); "
                             "make_train_step adds it, a direct call must pass it")
        callback_batch = {key: value for key, value in batch.items() if key not in _STEP_ENTRIES}
        # The callback reads weights through the module: let it see (and differentiate) the step's params.
        with _reparametrize_module(policy, dict(params), tie_weights=True):
            out = callback(callback_batch, batch[losses.STEP_KEY], step_name, latents, policy)
        if not isinstance(out, Mapping):
            raise TypeError(f"callback {name} must return a dict of tensors, got {type(out).__name__}")
        # MineStudio callbacks return Python numbers too (weights); the step's metrics are tensors.
        return {key: value if isinstance(value, Tensor) else torch.as_tensor(value, dtype=torch.float32)
                for key, value in out.items()}

    objective.__name__ = name
    return objective


def callbacks_to_objective(
    callbacks: Sequence[ObjectiveCallback], policy: nn.Module, *, step_name: str = "train"
) -> losses.Objective:
    """MineStudio's callbacks as one pure objective ``(batch, latents, params) -> {"loss", **metrics}``.

    Every callback is called as ``callback(batch, batch_idx, step_name, latents, policy)`` with ``batch_idx
    = batch["step"]`` (the step counter the train step adds; long 0-d) while ``policy`` is reparametrized with
    ``params`` (``torch.func.functional_call``'s machinery), so weights read through the module are the ones
    being differentiated. Built-in callbacks (exact types) map to :mod:`losses` without that detour. Outputs
    are summed as ``MineLightning._batch_step`` sums them: ``loss`` is added, and so are same-named keys.

    Args:
        callbacks: at least one callback, and at least one of them must return a ``loss``.
        policy: the module the callbacks receive as ``mine_policy``.
        step_name: passed to the callbacks (``"train"`` or ``"val"``).

    Returns:
        An objective for :func:`mstudio.make_train_step`.
    """
    if not callbacks:
        raise ValueError("callbacks_to_objective needs at least one ObjectiveCallback (e.g. BehaviorCloneCallback())")
    for callback in callbacks:
        if not callable(callback):
            raise TypeError(f"callbacks must be ObjectiveCallback instances, got {type(callback).__name__}")
    parts = [_callback_objective(callback, policy, step_name) for callback in callbacks]
    names = ", ".join(type(callback).__name__ for callback in callbacks)

    def objective(batch: Mapping[str, Any], latents: Mapping[str, Any], params: Mapping[str, Tensor]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for part in parts:
            for key, value in part(batch, latents, params).items():
                result[key] = result[key] + value if key in result else value
        if "loss" not in result:
            raise ValueError(f"none of the callbacks ({names}) returned a 'loss'; one of them must")
        return result

    objective.__name__ = f"callbacks({names})"
    return objective


class MineLightning:
    """MineStudio's ``MineLightning`` (``minestudio/offline/trainer.py``) on mstudio's functional train step.

    The constructor takes MineStudio's arguments with its defaults; :meth:`fit` stands in for
    ``lightning.Trainer(...).fit(mine_lightning, datamodule)``. The optimizer is MineStudio's: AdamW over all
    parameters with a linear warmup ``lr * min((k + 1) / warmup_steps, 1)``; parameters no callback's loss
    reaches (the value head under BC) stay bit-identical. Recurrent memory is carried across
    episode-continuous batches as ``MineLightning._make_memory`` carries it.

    Args:
        mine_policy: the policy to train (``forward(batch, state_in)``, ``initial_state(B)``); after
            :meth:`fit` it holds the trained weights.
        callbacks: the :class:`ObjectiveCallback` s whose losses are summed.
        hyperparameters: recorded as ``self.hyperparameters`` (MineStudio hands them to its logger).
        log_freq: every ``log_freq`` steps (from step 0) the metrics are appended to :attr:`history`.
        learning_rate: AdamW's peak learning rate.
        warmup_steps: steps of the linear warmup.
        weight_decay: AdamW's decoupled weight decay.

    Attributes:
        history: ``[{"step": k, "train/loss": ..., "train/lr": ..., ...}, ...]`` every ``log_freq`` steps, and
            ``{"step": k, "val/...": ...}`` after each validation pass, as floats.
        state: the last :class:`mstudio.TrainState` of :meth:`fit` (parameters, optimizer moments, memory).
    """

    def __init__(
        self,
        mine_policy: nn.Module,
        callbacks: Sequence[ObjectiveCallback] = (),
        hyperparameters: Mapping[str, Any] | None = None,
        *,
        log_freq: int = 20,
        learning_rate: float = 1e-5,
        warmup_steps: int = 1000,
        weight_decay: float = 0.01,
    ) -> None:
        check_policy(mine_policy)
        if not (isinstance(log_freq, int) and log_freq > 0):
            raise ValueError(f"log_freq must be a positive int, got {log_freq!r}")
        self.mine_policy = mine_policy
        self.callbacks = list(callbacks)
        self.hyperparameters = dict(hyperparameters or {})
        self.log_freq = log_freq
        self.learning_rate = learning_rate
        self.warmup_steps = warmup_steps
        self.weight_decay = weight_decay
        self.history: list[dict[str, float]] = []
        self.state: TrainState | None = None

    def fit(
        self,
        train_batches: Iterable[Mapping[str, Any]],
        *,
        max_steps: int,
        val_batches: Iterable[Mapping[str, Any]] | None = None,
        val_every: int | None = None,
        gradient_clip_val: float | None = None,
        compile: bool = True,
    ) -> dict[str, float]:
        """Train for ``max_steps`` updates, then load the trained weights into :attr:`mine_policy`.

        Each call starts a fresh optimizer (moments, warmup) from :attr:`mine_policy`'s current weights, as a
        new ``lightning.Trainer`` would.

        Each batch passes through every callback's ``before_step``, keeps only its tensor entries (MineStudio's
        ``episode`` ids and ``text`` are dropped: a callback needing them should turn them into tensors in
        ``before_step``), gets a ``mask`` of ones if it has none, and moves to the policy's device. Every batch
        must have the first batch's size and keys (drop a short last batch).

        Args:
            train_batches: any iterable of batches (a list, :func:`mstudio.data.make_loader`, a MineStudio
                loader), iterated again whenever it runs out before ``max_steps``.
            max_steps: number of updates.
            val_batches: if given, a validation pass over it after training (no update, the callbacks with
                ``step_name="val"``, a memory of its own); its metrics are means over its batches.
            val_every: also validate every ``val_every`` steps (needs ``val_batches``).
            gradient_clip_val: global-norm gradient clipping (Lightning's ``Trainer(gradient_clip_val=)``).
            compile: compile the step into one graph. If a callback cannot be traced, the first step warns
                once and training continues eagerly from the same state.

        Returns:
            The last step's metrics as floats, ``"train/<key>"`` (``loss``, ``lr``, ``grad_norm`` and the
            callbacks' keys), plus the final validation's ``"val/<key>"``.
        """
        if not (isinstance(max_steps, int) and max_steps > 0):
            raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
        if val_every is not None and (val_batches is None or not (isinstance(val_every, int) and val_every > 0)):
            raise ValueError(f"val_every must be a positive int and needs val_batches; got val_every={val_every!r}")
        optimizer = adamw(self.learning_rate, weight_decay=self.weight_decay, warmup_steps=self.warmup_steps,
                          clip_norm=gradient_clip_val)
        objective = callbacks_to_objective(self.callbacks, self.mine_policy, step_name="train")
        batches, step = _cycle(train_batches), None
        for k in range(max_steps):
            batch = self._prepare(next(batches), k, "train")
            if step is None:
                state = init_state(self.mine_policy, optimizer, batch_size=batch["timestamp"].shape[0])
                step, (state, metrics) = self._first_step(objective, optimizer, state, batch, compile)
            else:
                state, metrics = step(state, batch)
            if k % self.log_freq == 0:
                self.history.append({"step": k, **_floats("train", metrics)})
            if val_every is not None and (k + 1) % val_every == 0 and k + 1 < max_steps:
                self.history.append({"step": k + 1, **self._validate(state, val_batches)})
        self.state = state
        # Only state_dict entries: named_buffers() also lists non-persistent buffers, which load_state_dict rejects.
        keys = self.mine_policy.state_dict().keys()
        self.mine_policy.load_state_dict({k: v for k, v in {**state.params, **state.buffers}.items() if k in keys})
        result = _floats("train", metrics)
        if val_batches is not None:
            validation = self._validate(state, val_batches)
            self.history.append({"step": max_steps, **validation})
            result.update(validation)
        return result

    def _prepare(self, batch: Mapping[str, Any], batch_idx: int, step_name: str) -> Batch:
        """``before_step`` hooks, then the batch's tensor entries (:func:`mstudio.batch.normalize_batch`), on the
        policy's device."""
        for callback in self.callbacks:
            batch = callback.before_step(batch, batch_idx, step_name)
        check_batch(batch, check_values=False)  # a clear error before anything reads the batch
        device = next(self.mine_policy.parameters()).device
        return optree.tree_map(lambda t: t.to(device), normalize_batch(batch))

    def _first_step(self, objective: losses.Objective, optimizer: Any, state: TrainState, batch: Batch,
                    compile: bool) -> tuple[Callable, tuple[TrainState, dict[str, Tensor]]]:
        """Build the step and run it once; a compiled step that a callback keeps from tracing falls back to eager."""
        step = make_train_step(self.mine_policy, objective, optimizer, compile=compile)
        if not compile:
            return step, step(state, batch)
        # Imported here: dynamo takes a second to import, and eager runs never need it.
        from torch._dynamo.exc import TorchDynamoException

        try:
            return step, step(state, batch)
        except TorchDynamoException as error:  # inductor's errors derive from it too
            custom = [callback for callback in self.callbacks if not _is_built_in(callback)]
            if not custom:
                raise
            warnings.warn(_fallback_warning(error, custom), stacklevel=3)
        # The step is pure, so the failed attempt left `state` as it was: start again from it.
        step = make_train_step(self.mine_policy, objective, optimizer, compile=False)
        return step, step(state, batch)

    def _validate(self, state: TrainState, val_batches: Iterable[Mapping[str, Any]]) -> dict[str, float]:
        """Means of the callbacks' outputs (``step_name="val"``) over ``val_batches``, without updates.

        The memory starts from ``initial_state`` and is carried between the pass's batches by the train
        step's rule; it is not shared with training (MineStudio shares it, a bug).
        """
        objective = callbacks_to_objective(self.callbacks, self.mine_policy, step_name="val")
        batches = (self._prepare(raw, index, "val") for index, raw in enumerate(val_batches))
        means = evaluate(self.mine_policy, objective, state, batches)
        return {f"val/{key}": value for key, value in means.items()}


def _floats(step_name: str, metrics: Mapping[str, Tensor]) -> dict[str, float]:
    """``{"<step_name>/<key>": float}``: MineStudio's logged names (one host sync per metric)."""
    return {f"{step_name}/{key}": float(value) for key, value in metrics.items()}


def _cycle(batches: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    """The batches of ``batches``, iterated again each time they run out."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError(
                "train_batches yielded no batch; if it is an iterator that ran out, pass something that can be "
                "iterated again (a list, a DataLoader, mstudio.data.make_loader(...))"
            )


def _fallback_warning(error: Exception, custom: Sequence[ObjectiveCallback]) -> str:
    """The message naming the callback dynamo could not trace (found in the error's user stack) and why."""
    culprits, where = list(custom), ""
    for frame in reversed(getattr(error, "real_stack", None) or []):
        found = [cb for cb in custom if _defines(type(cb), frame.filename, frame.lineno)]
        if found:
            culprits, where = found[:1], f" at {frame.filename}:{frame.lineno}"
            break
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    details = [line for line in lines[1:] if line.startswith(("Explanation:", "Caused by:"))][:1]
    reason = " ".join(lines[:1] + details) or type(error).__name__
    names = ", ".join(type(cb).__name__ for cb in culprits)
    return (f"MineLightning.fit: the train step could not be compiled because of callback {names}{where}: "
            f"{reason} ({type(error).__name__}). Training continues without torch.compile (compile=False); "
            "make the callback traceable (no .item(), print of tensors or Python branches on tensor values) "
            "to compile it, or pass compile=False to silence this warning.")


def _defines(cls: type, filename: str, lineno: int) -> bool:
    """Whether ``filename:lineno`` lies inside the source of class ``cls``."""
    try:
        lines, start = inspect.getsourcelines(cls)
        source = inspect.getsourcefile(cls)
    except (OSError, TypeError):  # classes defined in a REPL have no source
        return False
    return source is not None and os.path.realpath(source) == os.path.realpath(filename) and (
        start <= lineno < start + len(lines))
