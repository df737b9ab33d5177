"""Adversarial batches for the train step: what a careless user or a broken loader hands ``step(state, batch)``.

Every case runs one eager step (``make_train_step(..., compile=False)``) of a tiny :class:`TinyPolicy` on a
``B=2, T=3, 16x16`` batch. A malformed batch must be refused before anything runs, naming the key, what was
expected and what came; a batch that is unusual but valid (non-contiguous, expanded, extra keys, a missing
mask) must give exactly the result of its plain twin. Every successful step is also checked for purity: the
batch and the state it was given are unchanged.

The helpers here (:func:`train_once` and the checks) are shared by the ``objective``, ``optimizer`` and
``state`` cases.
"""

from __future__ import annotations

import copy
import dataclasses
import types
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor

import losses
import mstudio
from mstudio.data.synthetic import random_batch
from mstudio.models import TinyPolicy
from mstudio.train import TrainState
from tests.adversarial.harness import Case, Handled, Refused

B, T, SIZE = 2, 3, 16
DELETE = object()  # marks a key to remove in :func:`edited`


def tiny_policy(hidsize: int = 8) -> TinyPolicy:
    """A seeded :class:`TinyPolicy` for ``SIZE x SIZE`` frames (same weights on every call)."""
    torch.manual_seed(0)
    return TinyPolicy(hidsize=hidsize, image_size=SIZE)


def good_batch(seed: int = 0, start: int = 0) -> dict[str, Any]:
    """A valid ``(B, T)`` batch with a uint8 mask of ones."""
    return random_batch(B, T, SIZE, seed=seed, start=start)


def edited(*path: Any, to: Any) -> Callable[[], dict[str, Any]]:
    """A factory of :func:`good_batch` with ``batch[path[0]][path[1]]...`` replaced by ``to(old)`` (callable),
    ``to`` itself, or removed (``DELETE``)."""

    def make() -> dict[str, Any]:
        batch = good_batch()
        target = batch
        for key in path[:-1]:
            target = target[key]
        if to is DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = to(target[path[-1]]) if callable(to) else to
        return batch

    return make


@dataclasses.dataclass
class StepRun:
    """One step: the state and batch it got, copies taken before it ran, and what it returned."""

    state: TrainState
    batch: Any
    state_copy: TrainState
    batch_copy: Any
    after: TrainState
    metrics: dict[str, Tensor]


def _copy(tree: Any) -> Any:
    if isinstance(tree, types.MappingProxyType):
        tree = dict(tree)
    return copy.deepcopy(tree)


def train_once(batch: Any, *, objective: Callable = losses.behavior_clone, optimizer=None,
               state: TrainState | None = None, policy: TinyPolicy | None = None, step=None, **options: Any) -> StepRun:
    """One eager step of a tiny policy on ``batch`` (``options`` go to ``make_train_step``)."""
    policy = policy or tiny_policy()
    optimizer = optimizer or mstudio.optim.adamw(1e-3)
    if state is None:
        state = mstudio.init_state(policy, optimizer, B, objective=objective)
    step = step or mstudio.make_train_step(policy, objective, optimizer, compile=False, **options)
    state_copy, batch_copy = _copy(state), _copy(batch)
    after, metrics = step(state, batch)
    return StepRun(state, batch, state_copy, batch_copy, after, metrics)


def run_batch(make: Callable[[], Any], **options: Any) -> Callable[[Any], StepRun]:
    """A case's ``run``: one step on ``make()``."""
    return lambda tmp: train_once(make(), **options)


def assert_same(a: Any, b: Any, where: str) -> None:
    """``a`` equals ``b`` leaf by leaf (NaN equal to NaN, dtypes and shapes too); ``AssertionError`` naming where."""
    if isinstance(a, Mapping):
        assert isinstance(b, Mapping) and list(a) == list(b), f"{where}: keys {list(a)} vs {list(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, Tensor):
        assert isinstance(b, Tensor) and (a.dtype, a.shape) == (b.dtype, b.shape), f"{where}: {a!r:.80} vs {b!r:.80}"
        if a.device.type != "meta":
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), \
                f"{where}: values differ"
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), f"{where}: values differ"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def untouched(run: StepRun) -> None:
    """The step modified neither its batch nor its state."""
    assert_same(run.batch, run.batch_copy, "batch")
    assert_same(run.state, run.state_copy, "state")


def flag(run: StepRun, key: str) -> int:
    """``metrics[key]`` as an int; ``AssertionError`` unless it is a 0-d tensor."""
    value = run.metrics.get(key)
    assert isinstance(value, Tensor) and value.dim() == 0, f"metrics[{key!r}] must be a 0-d tensor, got {value!r}"
    return int(value)


def trained(run: StepRun, tmp=None) -> None:
    """A finite update was applied: finite loss and parameters, some parameter moved, nothing flagged."""
    untouched(run)
    assert torch.isfinite(run.metrics["loss"]), f"loss {run.metrics['loss']}"
    assert flag(run, "nonfinite") == 0 and flag(run, "skipped_updates") == 0, "a finite step was flagged"
    assert all(torch.isfinite(p).all() for p in run.after.params.values()), "a parameter is not finite"
    assert any(not torch.equal(p, run.state.params[n]) for n, p in run.after.params.items()), "no parameter moved"


def skipped(run: StepRun, tmp=None) -> None:
    """The non-finite guard skipped the update: parameters and optimizer state as they were, and counted."""
    untouched(run)
    assert flag(run, "nonfinite") == 1, "the bare step's metrics do not report the non-finite step"
    assert flag(run, "skipped_updates") == 1, "skipped_updates did not count the skipped update"
    assert_same(run.after.params, run.state.params, "params")
    assert_same(run.after.opt_state, run.state.opt_state, "opt_state")


def same_as(make_reference: Callable[[], Any], **options: Any) -> Callable[[StepRun, Any], None]:
    """A check: the step trained and gave the result of one step on ``make_reference()`` (a plain batch)."""

    def check(run: StepRun, tmp=None) -> None:
        trained(run)
        reference = train_once(make_reference(), **options)
        torch.testing.assert_close(run.metrics["loss"], reference.metrics["loss"], rtol=1e-6, atol=1e-7)
        for name, p in run.after.params.items():
            torch.testing.assert_close(p, reference.after.params[name], rtol=1e-6, atol=1e-7, msg=name)
        assert_same(run.after.last_timestamp, reference.after.last_timestamp, "last_timestamp")

    return check


def _mask(values: list[float], dtype: torch.dtype = torch.float32) -> Callable[[Tensor], Tensor]:
    """Replace the mask by ``values`` (T of them) on every row."""
    return lambda old: torch.tensor(values, dtype=dtype).expand(B, T).clone()


def _non_contiguous_image(old: Tensor) -> Tensor:
    """The same values as ``old`` stored channels-first: a permuted, non-contiguous view."""
    return old.permute(0, 1, 4, 2, 3).contiguous().permute(0, 1, 3, 4, 2)


def _transposed(old: Tensor) -> Tensor:
    """The same values as ``old`` stored time-major: a non-contiguous view."""
    return old.transpose(0, 1).contiguous().transpose(0, 1)


def _two_steps(first: Callable[[], Any], second: Callable[[], Any], **options: Any) -> Callable[[Any], StepRun]:
    """A ``run`` that steps on ``first()`` then, with the same step function, on ``second()``."""

    def run(tmp) -> StepRun:
        policy, optimizer = tiny_policy(), mstudio.optim.adamw(1e-3)
        step = mstudio.make_train_step(policy, losses.behavior_clone, optimizer, compile=False, **options)
        state, _ = step(mstudio.init_state(policy, optimizer, B), first())
        return train_once(second(), state=state, step=step, policy=policy, optimizer=optimizer)

    return run


def _restarts_memory(run: StepRun, tmp=None) -> None:
    """The second step restarted every row from ``init_memory`` (its timestamps do not continue)."""
    trained(run)
    policy, optimizer = tiny_policy(), mstudio.optim.adamw(1e-3)
    step = mstudio.make_train_step(policy, losses.behavior_clone, optimizer, compile=False)
    reset = run.state._replace(memory=run.state.init_memory)
    again = train_once(run.batch, state=reset, step=step)
    assert_same(run.after.params, again.after.params, "params")


def _carries_memory(run: StepRun, tmp=None) -> None:
    """The second step continued from the first one's memory (its timestamps continue)."""
    trained(run)
    assert not all(torch.equal(m, i) for m, i in zip(run.state.memory, run.state.init_memory)), "memory not carried"
    reset = run.state._replace(memory=run.state.init_memory)
    again = train_once(run.batch, state=reset)
    assert not torch.equal(again.metrics["loss"], run.metrics["loss"]), "the carried memory was ignored"


def _mask_grad_untouched(run: StepRun, tmp=None) -> None:
    same_as(good_batch)(run)
    assert run.batch["mask"].grad is None, "the step wrote a gradient into batch['mask']"


def _zero_loss(run: StepRun, tmp=None) -> None:
    untouched(run)
    assert run.metrics["loss"].item() == 0 and flag(run, "nonfinite") == 0


def _nan_mask(old: Tensor) -> Tensor:
    mask = old.float()
    mask[1, 2] = float("nan")
    return mask


def _refuse(name: str, make: Callable[[], Any], *fragments: str, error: type = ValueError, **options) -> Case:
    return Case("batch", name, run_batch(make, **options), Refused(error, *fragments))


def _accept(name: str, make: Callable[[], Any], check: Callable = None, **options) -> Case:
    return Case("batch", name, run_batch(make, **options), Handled(check or same_as(good_batch)))


TS, IMG, BTN, CAM, MASK = "batch['timestamp']", "batch['image']", \
    "batch['agent_action']['buttons']", "batch['agent_action']['camera']", "batch['mask']"

CASES = [
    # -- structure: the batch itself, its keys
    _refuse("not-a-dict", lambda: list(good_batch().values()), "batch", "dict", "got list"),
    _refuse("none", lambda: None, "batch", "dict", "got NoneType"),
    _refuse("non-str-key", edited(0, to=torch.zeros(B, T)), "batch", "str", "int"),
    _refuse("missing-timestamp", edited("timestamp", to=DELETE), TS, "long (B, T)", "batch has"),
    _refuse("missing-image", edited("image", to=DELETE), IMG, "uint8 (B, T, H, W, 3)", "batch has"),
    _refuse("missing-agent-action", edited("agent_action", to=DELETE), "behavior_clone", "batch['agent_action']",
            "batch has only"),
    _refuse("reserved-step-key", edited("step", to=torch.tensor(0)), "'step'", "reserved"),
    _refuse("reserved-hyperparams-key", edited("hyperparams", to={}), "'hyperparams'", "reserved"),
    _accept("missing-mask", edited("mask", to=DELETE)),
    _accept("extra-tensor-key", edited("env_reward", to=torch.zeros(B, T))),
    _accept("episode-ids-as-strings", edited("episode", to=["ep-a", "ep-b"])),
    _accept("episode-ids-as-numpy-strings", edited("episode", to=np.array(["ep-a", "ep-b"]))),
    _accept("raw-env-action-lists", edited("env_action", to={"keys": [["w"], ["a", "d"]]})),
    _accept("read-only-mapping", lambda: types.MappingProxyType(good_batch())),
    # -- image
    _refuse("float-image", edited("image", to=lambda t: t.float() / 255), IMG, "uint8", "torch.float32"),
    _refuse("int64-image", edited("image", to=lambda t: t.long()), IMG, "uint8", "torch.int64"),
    _refuse("bool-image", edited("image", to=lambda t: t > 127), IMG, "uint8", "torch.bool"),
    _refuse("numpy-image", edited("image", to=lambda t: t.numpy()), IMG, "uint8", "ndarray"),
    _refuse("image-without-channels", edited("image", to=lambda t: t[..., 0]), IMG, "(B, T, H, W, 3)",
            "(2, 3, 16, 16)"),
    _refuse("image-channels-first", edited("image", to=lambda t: t.permute(0, 1, 4, 2, 3)), IMG, "(B, T, H, W, 3)",
            "(2, 3, 3, 16, 16)"),
    _refuse("image-rgba", edited("image", to=lambda t: torch.cat([t, t[..., :1]], -1)), IMG, "(B, T, H, W, 3)",
            "(2, 3, 16, 16, 4)"),
    _refuse("image-other-resolution", edited("image", to=lambda t: t.repeat(1, 1, 2, 2, 1)), "image",
            "(2, 3, 16, 16, 3)", "(2, 3, 32, 32, 3)"),
    _refuse("image-more-rows", edited("image", to=lambda t: torch.cat([t, t[:1]])), IMG, "(B, T) = (2, 3)",
            "(3, 3, 16, 16, 3)"),
    _refuse("image-fewer-steps", edited("image", to=lambda t: t[:, :2]), IMG, "(B, T) = (2, 3)", "(2, 2, 16, 16, 3)"),
    _refuse("meta-image", edited("image", to=lambda t: t.to("meta")), IMG, "meta device"),
    _accept("non-contiguous-image", edited("image", to=_non_contiguous_image)),
    _accept("time-major-image", edited("image", to=_transposed)),
    # -- timestamp
    _refuse("numpy-timestamp", edited("timestamp", to=lambda t: t.numpy()), TS, "long (B, T)", "ndarray"),
    _refuse("list-timestamp", edited("timestamp", to=lambda t: t.tolist()), TS, "long (B, T)", "list"),
    _refuse("int32-timestamp", edited("timestamp", to=lambda t: t.int()), TS, "long (B, T)", "torch.int32"),
    _refuse("float-timestamp", edited("timestamp", to=lambda t: t.float()), TS, "long (B, T)", "torch.float32"),
    _refuse("timestamp-rank-1", edited("timestamp", to=lambda t: t[:, 0]), TS, "long (B, T)", "(2,)"),
    _refuse("timestamp-rank-3", edited("timestamp", to=lambda t: t[..., None]), TS, "long (B, T)", "(2, 3, 1)"),
    _refuse("negative-timestamp", edited("timestamp", to=lambda t: t - 1), TS, "non-negative", "-1"),
    _refuse("decreasing-timestamp", edited("timestamp", to=lambda t: t.flip(1)), TS, "increase along T", "-1"),
    _refuse("repeated-timestamp", edited("timestamp", to=lambda t: torch.tensor([[4, 4, 5], [0, 1, 2]])), TS,
            "increase along T", "by 0"),
    _refuse("zero-steps", lambda: random_batch(B, 0, SIZE), TS, "at least one row and one step", "(2, 0)"),
    _refuse("zero-rows", lambda: random_batch(0, T, SIZE), TS, "at least one row", "(0, 3)"),
    _refuse("more-rows-than-state", lambda: random_batch(3, T, SIZE), "batch size 3", "batch_size=2"),
    _refuse("meta-timestamp", edited("timestamp", to=lambda t: t.to("meta")), TS, "meta device"),
    _accept("expanded-timestamp", edited("timestamp", to=lambda t: torch.arange(T).expand(B, T))),
    # -- agent_action
    _refuse("actions-not-a-dict", edited("agent_action", to=lambda a: a["buttons"]), "batch['agent_action']", "dict",
            "torch.int64"),
    _refuse("actions-as-list", edited("agent_action", to=lambda a: list(a.values())), "batch['agent_action']", "dict",
            "list"),
    _refuse("actions-missing-camera", edited("agent_action", "camera", to=DELETE), CAM, "missing", "has ['buttons']"),
    _refuse("int32-buttons", edited("agent_action", "buttons", to=lambda t: t.int()), BTN, "long (2, 3, 1)",
            "torch.int32"),
    _refuse("float-buttons", edited("agent_action", "buttons", to=lambda t: t.float()), BTN, "long (2, 3, 1)",
            "torch.float32"),
    _refuse("uint8-camera", edited("agent_action", "camera", to=lambda t: t.to(torch.uint8)), CAM, "long (2, 3, 1)",
            "torch.uint8"),
    _refuse("numpy-camera", edited("agent_action", "camera", to=lambda t: t.numpy()), CAM, "long (2, 3, 1)",
            "ndarray"),
    _refuse("buttons-without-action-dim", edited("agent_action", "buttons", to=lambda t: t[..., 0]), BTN,
            "long (2, 3, 1)", "(2, 3)"),
    _refuse("buttons-fewer-steps", edited("agent_action", "buttons", to=lambda t: t[:, :2]), BTN, "long (2, 3, 1)",
            "(2, 2, 1)"),
    _refuse("camera-past-last-class", edited("agent_action", "camera", to=lambda t: t.fill_(121)), CAM,
            "[0, 121)", "[121, 121]"),
    _refuse("negative-camera", edited("agent_action", "camera", to=lambda t: t.fill_(-1)), CAM, "[0, 121)", "[-1, -1]"),
    _refuse("buttons-past-last-class", edited("agent_action", "buttons", to=lambda t: t.fill_(8641)), BTN,
            "[0, 8641)", "[8641, 8641]"),
    _accept("extra-action-head", edited("agent_action", "jump", to=torch.zeros(B, T, 1, dtype=torch.long))),
    _accept("non-contiguous-actions", edited("agent_action", "buttons", to=_transposed)),
    # -- mask
    _refuse("complex-mask", edited("mask", to=lambda t: t.to(torch.complex64)), MASK, "real", "complex64"),
    _refuse("numpy-mask", edited("mask", to=lambda t: t.numpy()), MASK, "tensor of shape (2, 3)", "ndarray"),
    _refuse("mask-per-row", edited("mask", to=lambda t: t[:, 0]), MASK, "(2, 3)", "(2,)"),
    _refuse("mask-with-action-dim", edited("mask", to=lambda t: t[..., None]), MASK, "(2, 3)", "(2, 3, 1)"),
    _refuse("mask-more-rows", edited("mask", to=lambda t: torch.cat([t, t[:1]])), MASK, "(2, 3)", "(3, 3)"),
    _refuse("negative-mask", edited("mask", to=_mask([1, -1, 1])), MASK, "[0, 1]", "[-1, 1]", "gradient ascent"),
    _refuse("mask-above-one", edited("mask", to=_mask([1, 2.5, 1])), MASK, "[0, 1]", "[1, 2.5]"),
    _refuse("int-mask-of-two", edited("mask", to=_mask([1, 2, 0], torch.int64)), MASK, "[0, 1]", "[0, 2]"),
    _refuse("nan-mask", edited("mask", to=_mask([1, float("nan"), 1])), MASK, "finite", "NaN or inf"),
    _refuse("inf-mask", edited("mask", to=_mask([1, float("inf"), 1])), MASK, "finite", "NaN or inf"),
    _refuse("meta-mask-unvalidated", edited("mask", to=lambda t: t.to("meta")), MASK, "meta device", validate=False),
    Case("batch", "nan-mask-unvalidated", run_batch(edited("mask", to=_nan_mask), validate=False), Handled(skipped)),
    _accept("bool-mask", edited("mask", to=lambda t: t.bool())),
    _accept("float16-mask", edited("mask", to=lambda t: t.half())),
    _accept("expanded-mask", edited("mask", to=lambda t: torch.ones(1, T, dtype=torch.uint8).expand(B, T))),
    _accept("requires-grad-mask", edited("mask", to=lambda t: t.float().requires_grad_()), _mask_grad_untouched),
    _accept("fractional-mask", edited("mask", to=_mask([0.5, 0.25, 1.0], torch.float64)), trained),
    _accept("all-zero-mask", edited("mask", to=lambda t: torch.zeros_like(t)), _zero_loss),
    # -- across batches
    Case("batch", "new-key-on-second-batch", _two_steps(good_batch, edited("env_reward", to=torch.zeros(B, T))),
         Refused(ValueError, "batch keys changed", "new ['env_reward']")),
    Case("batch", "same-window-twice-restarts-memory", _two_steps(good_batch, good_batch),
         Handled(_restarts_memory)),
    Case("batch", "continuing-window-carries-memory", _two_steps(good_batch, lambda: good_batch(1, start=T)),
         Handled(_carries_memory)),
    Case("batch", "mask-dtype-changes-mid-run", _two_steps(good_batch, edited("mask", to=lambda t: t.float())),
         Handled(trained)),
    Case("batch", "window-length-changes-mid-run", _two_steps(good_batch, lambda: random_batch(B, 5, SIZE, seed=1)),
         Handled(trained)),
]
