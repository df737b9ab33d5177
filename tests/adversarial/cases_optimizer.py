"""Adversarial optimizer hyper-parameters: typos, NaN, wrong types and out-of-range values.

A hyper-parameter that cannot work (NaN or infinite, negative where it must not be, betas outside [0, 1),
``eps <= 0``, a string, a bool) is refused when the optimizer or schedule is built, or when
``set_hyperparams`` is called, with the argument's name, the rule and the value. A schedule that returns NaN
mid-run cannot be checked without a host sync, so the step's guard skips that update.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

import mstudio
from mstudio.optim import schedules
from tests.adversarial.cases_batch import flag, good_batch, same_as, skipped, train_once, untouched
from tests.adversarial.harness import Case, Handled, Refused

optim = mstudio.optim
NAN, INF = float("nan"), float("inf")


def _build(factory: Callable, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
    return lambda tmp: factory(*args, **kwargs)


def _step_with(optimizer: Callable[[], Any]) -> Callable[[Any], Any]:
    """A ``run``: one behaviour-cloning step with ``optimizer()``."""
    return lambda tmp: train_once(good_batch(), optimizer=optimizer())


def _refuse(name: str, run: Callable, error: type, *fragments: str) -> Case:
    return Case("optimizer", name, run, Refused(error, *fragments))


def _adamw(name: str, error: type, *fragments: str, **kwargs: Any) -> Case:
    """``adamw(**kwargs)`` (lr 1e-3 unless given) must be refused naming ``fragments``."""
    return _refuse(name, _build(optim.adamw, **{"lr": 1e-3, **kwargs}), error, "adamw", *fragments)


def _opt_state():
    params = {"w": torch.ones(3)}
    return optim.adamw(1e-3).init(params)


def _set(**values: Any) -> Callable[[Any], Any]:
    return lambda tmp: optim.set_hyperparams(_opt_state(), **values)


def _lr_is(expected: float) -> Callable[[Any, Any], None]:
    def check(opt_state, tmp=None) -> None:
        value = optim.find_hyperparams(opt_state)["learning_rate"]
        assert value.dtype == torch.float64 and value.item() == expected, f"learning_rate is {value}"

    return check


def _frozen(run, tmp=None) -> None:
    """lr 0: the step ran and moved no parameter (decay is scaled by lr too)."""
    untouched(run)
    assert torch.isfinite(run.metrics["loss"]) and flag(run, "nonfinite") == 0
    for name, p in run.after.params.items():
        assert torch.equal(p, run.state.params[name]), f"{name} moved with lr 0"


def _nan_lr_at_first_step(step):
    return torch.where(step == 0, NAN, 1e-3)


def _schedule(value: Any) -> Callable:
    return lambda step: value


CASES = [
    # -- adamw
    _adamw("lr-nan", ValueError, "lr", "finite number >= 0", "nan", lr=NAN),
    _adamw("lr-inf", ValueError, "lr", "finite number >= 0", "inf", lr=INF),
    _adamw("lr-negative", ValueError, "lr", "finite number >= 0", "-0.001", lr=-1e-3),
    _adamw("lr-str", TypeError, "lr", "number", "str", lr="1e-3"),
    _adamw("lr-bool", TypeError, "lr", "number", "bool", lr=True),
    _adamw("lr-none", TypeError, "lr", "number", "NoneType", lr=None),
    _adamw("lr-tensor", TypeError, "lr", "number", "Tensor", lr=torch.tensor(1e-3)),
    _adamw("lr-list", TypeError, "lr", "number", "list", lr=[1e-3]),
    _adamw("betas-b2-one", ValueError, "betas", "[0, 1)", "1.0", betas=(0.9, 1.0)),
    _adamw("betas-negative", ValueError, "betas", "[0, 1)", "-0.1", betas=(-0.1, 0.999)),
    _adamw("betas-nan", ValueError, "betas", "[0, 1)", "nan", betas=(NAN, 0.999)),
    _adamw("betas-one-number", TypeError, "betas", "two numbers", "float", betas=0.9),
    _adamw("betas-three", ValueError, "betas", "two numbers", "(0.9, 0.99, 0.9)", betas=(0.9, 0.99, 0.9)),
    _adamw("betas-str", TypeError, "betas", "number", "str", betas=("0.9", 0.999)),
    _adamw("eps-zero", ValueError, "eps", "> 0", "0", eps=0.0),
    _adamw("eps-negative", ValueError, "eps", "> 0", "-1e-08", eps=-1e-8),
    _adamw("eps-nan", ValueError, "eps", "> 0", "nan", eps=NAN),
    _adamw("eps-str", TypeError, "eps", "number", "str", eps="1e-8"),
    _adamw("weight-decay-negative", ValueError, "weight_decay", ">= 0", "-0.1", weight_decay=-0.1),
    _adamw("weight-decay-nan", ValueError, "weight_decay", ">= 0", "nan", weight_decay=NAN),
    _adamw("weight-decay-inf", ValueError, "weight_decay", "finite", "inf", weight_decay=INF),
    _adamw("weight-decay-str", TypeError, "weight_decay", "number", "str", weight_decay="0.01"),
    _adamw("weight-decay-bool", TypeError, "weight_decay", "number", "bool", weight_decay=False),
    _adamw("warmup-negative", ValueError, "warmup_steps", ">= 0", "-1", warmup_steps=-1),
    _adamw("warmup-fractional", TypeError, "warmup_steps", "int", "float", warmup_steps=1.5),
    _adamw("warmup-nan", TypeError, "warmup_steps", "int", "nan", warmup_steps=NAN),
    _adamw("warmup-str", TypeError, "warmup_steps", "int", "str", warmup_steps="10"),
    _adamw("clip-zero", ValueError, "clip_norm", "> 0", "0", clip_norm=0.0),
    _adamw("clip-negative", ValueError, "clip_norm", "> 0", "-1", clip_norm=-1.0),
    _adamw("clip-nan", ValueError, "clip_norm", "> 0", "nan", clip_norm=NAN),
    _adamw("clip-str", TypeError, "clip_norm", "number", "str", clip_norm="1.0"),
    _refuse("betas-positional", _build(optim.adamw, 1e-3, (0.9, 0.99)), TypeError, "adamw", "positional"),
    Case("optimizer", "lr-zero-moves-nothing", _step_with(lambda: optim.adamw(0.0)), Handled(_frozen)),
    Case("optimizer", "lr-numpy-float32", _step_with(lambda: optim.adamw(np.float32(1e-3), warmup_steps=np.int64(2))),
         Handled(same_as(good_batch, optimizer=optim.adamw(float(np.float32(1e-3)), warmup_steps=2)))),
    # -- the blocks adamw is made of
    _refuse("adam-b1-one", _build(optim.scale_by_adam, b1=1.0), ValueError, "scale_by_adam", "b1", "[0, 1)", "1.0"),
    _refuse("adam-b2-negative", _build(optim.scale_by_adam, b2=-0.5), ValueError, "scale_by_adam", "b2", "[0, 1)",
            "-0.5"),
    _refuse("adam-eps-zero", _build(optim.scale_by_adam, eps=0), ValueError, "scale_by_adam", "eps", "> 0", "0"),
    _refuse("adam-b1-str", _build(optim.scale_by_adam, b1="0.9"), TypeError, "scale_by_adam", "b1", "number", "str"),
    _refuse("clip-block-zero", _build(optim.clip_by_global_norm, 0.0), ValueError, "clip_by_global_norm", "max_norm",
            "> 0", "0"),
    _refuse("clip-block-nan", _build(optim.clip_by_global_norm, NAN), ValueError, "clip_by_global_norm", "max_norm",
            "> 0", "nan"),
    _refuse("clip-block-str", _build(optim.clip_by_global_norm, "1"), TypeError, "clip_by_global_norm", "max_norm",
            "number", "str"),
    _refuse("chain-not-a-transform", _build(optim.chain, optim.identity(), "adamw"), TypeError, "chain",
            "GradientTransformation", "str"),
    _refuse("chain-two-optimizers", _build(optim.chain, optim.adamw(1e-3), optim.adamw(1e-3)), ValueError, "chain",
            "more than one", "learning rate"),
    # -- schedules
    _refuse("constant-nan", _build(schedules.constant, NAN), ValueError, "constant", "value", "finite", "nan"),
    _refuse("constant-str", _build(schedules.constant, "1e-3"), TypeError, "constant", "value", "number", "str"),
    _refuse("warmup-schedule-negative", _build(schedules.linear_warmup, 1e-3, -5), ValueError, "warmup_steps", ">= 0",
            "-5"),
    _refuse("warmup-schedule-nan-value", _build(schedules.linear_warmup, NAN, 5), ValueError, "linear_warmup", "value",
            "finite", "nan"),
    _refuse("cosine-zero-steps", _build(schedules.cosine_decay, 1e-3, 0), ValueError, "decay_steps", "int >= 1", "0"),
    _refuse("cosine-fractional-steps", _build(schedules.cosine_decay, 1e-3, 2.5), TypeError, "decay_steps", "int",
            "float"),
    _refuse("cosine-nan-alpha", _build(schedules.cosine_decay, 1e-3, 10, alpha=NAN), ValueError, "cosine_decay",
            "alpha", "finite", "nan"),
    _refuse("join-unordered", _build(schedules.join, [schedules.constant(1.0)] * 3, [5, 2]), ValueError, "boundaries",
            "increase", "[5, 2]"),
    _refuse("join-count", _build(schedules.join, [schedules.constant(1.0)], [3]), ValueError, "join", "boundaries",
            "1 schedules"),
    _refuse("join-not-a-schedule", _build(schedules.join, [1e-3, 1e-4], [10]), TypeError, "join", "schedules[0]",
            "callable", "float"),
    _refuse("schedule-returns-str", _step_with(lambda: optim.adamw(_schedule("1e-3"))), TypeError, "learning_rate",
            "schedule", "number", "str"),
    _refuse("schedule-returns-vector", _step_with(lambda: optim.adamw(_schedule(torch.ones(2)))), ValueError,
            "learning_rate", "schedule", "0-d", "(2,)"),
    Case("optimizer", "schedule-returns-nan", _step_with(lambda: optim.adamw(_nan_lr_at_first_step)), Handled(skipped)),
    Case("optimizer", "cosine-schedule-trains", _step_with(lambda: optim.adamw(schedules.cosine_decay(1e-3, 10))),
         Handled(same_as(good_batch, optimizer=optim.adamw(1e-3)))),
    # -- set_hyperparams on an optimizer state
    _refuse("set-unknown-name", _set(lr=1e-4), KeyError, "['lr']", "learning_rate", "weight_decay"),
    _refuse("set-nan", _set(learning_rate=NAN), ValueError, "learning_rate", "finite number >= 0", "nan"),
    _refuse("set-negative", _set(weight_decay=-1.0), ValueError, "weight_decay", "finite number >= 0", "-1"),
    _refuse("set-str", _set(learning_rate="1e-4"), TypeError, "learning_rate", "number", "str"),
    _refuse("set-bool", _set(learning_rate=True), TypeError, "learning_rate", "number", "bool"),
    _refuse("set-list", _set(learning_rate=[1e-4]), TypeError, "learning_rate", "number", "list"),
    Case("optimizer", "set-numpy", _set(learning_rate=np.float32(0.5)), Handled(_lr_is(0.5))),
    Case("optimizer", "set-int", _set(learning_rate=1), Handled(_lr_is(1.0))),
]
