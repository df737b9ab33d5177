"""Adversarial train states: bad batch sizes, a state from another policy, optimizer or batch size, a state
holding NaN, and bad values for ``mstudio.set_hyperparams``.

A state the step cannot use is refused on the call, naming the field (``state.params['...']``,
``state.memory``, ``state.opt_state``), what was expected and what came. A state that turned non-finite
after the step was built cannot be checked without a host sync: the guard skips its updates instead.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import optree
import torch

import losses
import mstudio
from tests.adversarial.cases_batch import B, assert_same, good_batch, skipped, tiny_policy, train_once, trained
from tests.adversarial.harness import Case, Handled, Refused

optim = mstudio.optim


def _init(batch_size: Any = B, *, policy: Any = None, optimizer: Any = None, **kwargs: Any) -> Callable[[Any], Any]:
    """A ``run``: ``init_state`` with one argument replaced."""
    return lambda tmp: mstudio.init_state(tiny_policy() if policy is None else policy,
                                          optim.adamw(1e-3) if optimizer is None else optimizer, batch_size, **kwargs)


def _state(policy=None, optimizer=None, batch_size: int = B, **kwargs: Any):
    return mstudio.init_state(policy or tiny_policy(), optimizer or optim.adamw(1e-3), batch_size, **kwargs)


def _step_on(make_state: Callable[[], Any], **options: Any) -> Callable[[Any], Any]:
    """A ``run``: a fresh step (built on this call) on ``make_state()`` and a good batch."""
    return lambda tmp: train_once(good_batch(), state=make_state(), **options)


def _built_step_on(make_state: Callable[[], Any]) -> Callable[[Any], Any]:
    """A ``run``: a step already built on a good state, then called on ``make_state()``."""

    def run(tmp):
        policy, optimizer = tiny_policy(), optim.adamw(1e-3)
        step = mstudio.make_train_step(policy, losses.behavior_clone, optimizer, compile=False)
        step(_state(policy, optimizer), good_batch())
        return train_once(good_batch(1, start=1), state=make_state(), step=step)  # continues a fresh state's memory

    return run


def _poisoned(field: str, value: float = float("nan")) -> Callable[[], Any]:
    """A fresh state whose first tensor of ``field`` (in optree's sorted order) holds ``value`` at one element."""

    def make():
        state = _state()
        tree = getattr(state, field)
        leaves, treedef = optree.tree_flatten(tree)
        target = next(i for i, leaf in enumerate(leaves) if leaf.is_floating_point() and leaf.numel() > 1)
        leaves[target] = leaves[target].clone()
        leaves[target].view(-1)[0] = value
        return state._replace(**{field: optree.tree_unflatten(treedef, leaves)})

    return make


def _nu_poisoned():
    """A state whose Adam second moments hold an inf: a finite loss and gradient, an infinite update."""
    state = _state()
    inject = state.opt_state
    adam = inject.inner_state[1]
    nu = {**adam.nu, "pi_buttons.bias": torch.full_like(adam.nu["pi_buttons.bias"], float("-inf"))}
    inner = (inject.inner_state[0], adam._replace(nu=nu), *inject.inner_state[2:])
    return state._replace(opt_state=inject._replace(inner_state=inner))


def _with_params(change: Callable[[dict], dict]) -> Callable[[], Any]:
    def make():
        state = _state()
        return state._replace(params=change(dict(state.params)))

    return make


def _without(name: str) -> Callable[[dict], dict]:
    return lambda params: {k: v for k, v in params.items() if k != name}


def _memory_rows(rows: int) -> Callable[[], Any]:
    def make():
        state = _state()
        return state._replace(memory=(torch.zeros(rows, 8),))

    return make


def _skipped_and_restarted(run, tmp=None) -> None:
    skipped(run)
    assert_same(run.after.memory, run.state.init_memory, "memory after a skipped update")


def _nograd_params(run, tmp=None) -> None:
    trained(run)
    assert not any(p.requires_grad or p.grad_fn is not None for p in run.after.params.values()), \
        "the new state's parameters carry an autograd graph"


def _twice_same(tmp):
    """The same state and batch twice through one step: equal results (the step is pure)."""
    policy, optimizer = tiny_policy(), optim.adamw(1e-3)
    step = mstudio.make_train_step(policy, losses.behavior_clone, optimizer, compile=False)
    state = _state(policy, optimizer)
    first = train_once(good_batch(), state=state, step=step)
    second = train_once(good_batch(), state=state, step=step)
    assert_same(first.after, second.after, "second result")
    return second


def _set(**values: Any) -> Callable[[Any], Any]:
    objective = losses.weighted(losses.behavior_clone, losses.Hyperparam("bc_weight", 0.01))
    return lambda tmp: mstudio.set_hyperparams(_state(objective=objective), **values)


def _set_values(expected: dict[str, float]) -> Callable[[Any, Any], None]:
    def check(state, tmp=None) -> None:
        found = {**optim.find_hyperparams(state.opt_state), **state.hyperparams}
        for name, value in expected.items():
            assert found[name].dtype == torch.float64 and found[name].item() == value, f"{name} is {found[name]}"

    return check


def _refuse(name: str, run: Callable, error: type, *fragments: str) -> Case:
    return Case("state", name, run, Refused(error, *fragments))


def _accept(name: str, run: Callable, check: Callable) -> Case:
    return Case("state", name, run, Handled(check))


def _has_batch_size(size: int) -> Callable[[Any, Any], None]:
    def check(state, tmp=None) -> None:
        assert type(state.batch_size) is int and state.batch_size == size
        assert state.memory[0].shape == (size, 8)

    return check


BAD_SIZE = ("batch_size", "positive int")

CASES = [
    # -- init_state
    _refuse("batch-size-bool", _init(True), ValueError, *BAD_SIZE, "bool"),
    _refuse("batch-size-zero", _init(0), ValueError, *BAD_SIZE, "got 0"),
    _refuse("batch-size-negative", _init(-2), ValueError, *BAD_SIZE, "-2"),
    _refuse("batch-size-float", _init(2.0), ValueError, *BAD_SIZE, "float 2.0"),
    _refuse("batch-size-str", _init("2"), ValueError, *BAD_SIZE, "str '2'"),
    _refuse("batch-size-none", _init(None), ValueError, *BAD_SIZE, "NoneType"),
    _refuse("batch-size-vector", _init(torch.tensor([2, 2])), ValueError, *BAD_SIZE, "Tensor"),
    _accept("batch-size-numpy", _init(np.int64(3)), _has_batch_size(3)),
    _accept("batch-size-0d-tensor", _init(torch.tensor(3)), _has_batch_size(3)),
    _refuse("policy-not-a-module", _init(policy="tiny"), TypeError, "policy", "torch.nn.Module", "str"),
    _refuse("torch-optimizer", lambda tmp: mstudio.init_state(
        tiny_policy(), torch.optim.AdamW(tiny_policy().parameters()), B), TypeError, "optimizer",
        "GradientTransformation", "AdamW"),
    _refuse("optimizer-str", _init(optimizer="adamw"), TypeError, "optimizer", "GradientTransformation", "str"),
    _refuse("objective-str", _init(objective="behavior_clone"), TypeError, "objective", "callable", "str"),
    # -- a state the step cannot use
    _refuse("state-is-a-tuple", _step_on(lambda: tuple(_state())), TypeError, "state", "TrainState", "tuple"),
    _refuse("state-is-a-dict", _step_on(lambda: _state()._asdict()), TypeError, "state", "TrainState", "dict"),
    _refuse("state-of-a-wider-policy", _step_on(lambda: _state(tiny_policy(hidsize=16))), ValueError,
            "state.params['encoder_out.weight']", "(8, 32)", "(16, 32)"),
    _refuse("state-missing-a-param", _step_on(_with_params(_without("value.bias"))), ValueError, "state.params",
            "missing", "value.bias"),
    _refuse("state-with-an-extra-param", _step_on(_with_params(lambda p: {**p, "ghost": torch.zeros(2)})), ValueError,
            "state.params", "unexpected", "ghost"),
    _refuse("state-float64-param", _step_on(_with_params(lambda p: {**p, "conv1.bias": p["conv1.bias"].double()})),
            ValueError, "state.params['conv1.bias']", "torch.float32", "torch.float64"),
    _refuse("state-for-three-rows", _step_on(lambda: _state(batch_size=3)), ValueError, "batch size 2",
            "batch_size=3"),
    _refuse("state-memory-rows", _step_on(_memory_rows(3)), ValueError, "state.memory", "batch (2)", "(3, 8)"),
    _refuse("state-of-another-optimizer", _step_on(lambda: _state(optimizer=optim.chain(
        optim.scale_by_adam(), optim.scale_by_learning_rate(1e-3)))), ValueError, "state.opt_state", "optimizer",
        "init_state"),
    _refuse("state-without-ema", _step_on(_state, ema_decay=0.9), ValueError, "ema_decay", "ema=True", "absent"),
    _refuse("nan-params-on-first-call", _step_on(_poisoned("params")), ValueError, "state.params['conv1.bias']",
            "finite", "1 NaN or inf"),
    _refuse("inf-opt-state-on-first-call", _step_on(_nu_poisoned), ValueError, "state.opt_state", "finite",
            "NaN or inf"),
    _refuse("nan-memory-on-first-call", _step_on(_poisoned("memory")), ValueError, "state.memory", "finite",
            "NaN or inf"),
    _accept("nan-params-later", _built_step_on(_poisoned("params")), skipped),
    _accept("inf-adam-moment-later", _built_step_on(_nu_poisoned), skipped),
    _accept("nan-memory-later", _built_step_on(_poisoned("memory")), _skipped_and_restarted),
    _accept("params-requiring-grad", _step_on(_with_params(
        lambda p: {k: v.clone().requires_grad_() for k, v in p.items()})), _nograd_params),
    _accept("same-state-twice", _twice_same, trained),
    # -- mstudio.set_hyperparams
    _refuse("set-unknown-name", _set(lr=1e-4), KeyError, "['lr']", "bc_weight", "learning_rate"),
    _refuse("set-nan-lr", _set(learning_rate=float("nan")), ValueError, "learning_rate", "finite number >= 0", "nan"),
    _refuse("set-negative-lr", _set(learning_rate=-1e-3), ValueError, "learning_rate", "finite number >= 0", "-0.001"),
    _refuse("set-str-lr", _set(learning_rate="1e-3"), TypeError, "learning_rate", "number", "str"),
    _refuse("set-bool-weight", _set(bc_weight=True), TypeError, "bc_weight", "number", "bool"),
    _refuse("set-nan-weight", _set(bc_weight=float("nan")), ValueError, "bc_weight", "finite number", "nan"),
    _accept("set-negative-weight-on-purpose", _set(bc_weight=-1.0), _set_values({"bc_weight": -1.0})),
    _refuse("set-tensor-weight", _set(bc_weight=torch.tensor(0.5)), TypeError, "bc_weight", "number", "Tensor"),
    _refuse("set-on-an-optimizer-state", lambda tmp: mstudio.set_hyperparams(_state().opt_state, learning_rate=1e-4),
            TypeError, "set_hyperparams", "TrainState", "InjectHyperparamsState"),
    _accept("set-numpy-values", _set(learning_rate=np.float64(2e-3), bc_weight=np.float32(0.5)),
            _set_values({"learning_rate": 2e-3, "bc_weight": 0.5})),
]
