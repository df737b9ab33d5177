"""Adversarial objectives and loss weights: what a loss researcher's first draft returns.

An objective that breaks the contract of :mod:`losses.api` (no ``"loss"``, a non-scalar loss, a metric that
is not a number, a loss that reaches no parameter) must be refused on the first step with its name, what was
expected and what came. A non-finite loss or gradient must never reach the parameters: the step's guard skips
the update and reports ``nonfinite``. Bad weights for :func:`losses.weighted` are refused when it is built.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

import losses
from tests.adversarial.cases_batch import (B, flag, good_batch, same_as, skipped, tiny_policy, train_once, trained,
                                           untouched)
from tests.adversarial.harness import Case, Handled, Refused


def _bc_with(**changes: Callable[[dict], Any]) -> Callable:
    """behavior_clone whose output entries ``name`` are replaced by ``change(out)`` (``None`` removes them)."""

    def objective(batch, latents, params):
        out = losses.behavior_clone(batch, latents, params)
        for name, change in changes.items():
            if change is None:
                del out[name]
            else:
                out[name] = change(out)
        return out

    objective.__name__ = "draft_objective"
    return objective


def _returning(value: Any) -> Callable:
    def draft_objective(batch, latents, params):
        losses.behavior_clone(batch, latents, params)
        return value

    return draft_objective


def _with_objective(objective: Callable, **options: Any) -> Callable[[Any], Any]:
    """A ``run``: one step of behaviour cloning replaced by ``objective``."""
    return lambda tmp: train_once(good_batch(), objective=objective, **options)


def _nan_gradient(batch, latents, params):
    """A finite loss whose gradient is NaN: ``d sqrt(x) / dx`` at 0 is inf, times 0."""
    out = losses.behavior_clone(batch, latents, params)
    weight = params["value.weight"]
    return {**out, "loss": out["loss"] + 0 * torch.sqrt(weight - weight).sum()}


def _int_key(batch, latents, params):
    return {**losses.behavior_clone(batch, latents, params), 0: torch.tensor(1.0)}


_int_key.__name__ = "draft_objective"


def _writes_mask(batch, latents, params):
    batch["mask"].mul_(0)
    return losses.behavior_clone(batch, latents, params)


def _metrics_detached(run, tmp=None) -> None:
    trained(run)
    assert not any(m.requires_grad for m in run.metrics.values()), "a metric still tracks gradients"
    assert run.metrics["twice"].dtype.is_floating_point


def _reported_not_skipped(run, tmp=None) -> None:
    """``skip_nonfinite=False``: the update is applied, but the bare step's metrics still say it was non-finite."""
    untouched(run)
    assert flag(run, "nonfinite") == 1, "metrics['nonfinite'] is not 1"
    assert flag(run, "skipped_updates") == 0, "skip_nonfinite=False skipped an update"


def _negated(run, tmp=None) -> None:
    """A negative weight is an explicit choice (``weighted``'s docstring): the loss is scaled, sign included."""
    trained(run)
    reference = train_once(good_batch())
    torch.testing.assert_close(run.metrics["loss"], -0.5 * reference.metrics["loss"])
    assert run.metrics["bc_weight"].item() == -0.5


def _python_metric_is_a_tensor(run, tmp=None) -> None:
    trained(run)
    assert isinstance(run.metrics["count"], torch.Tensor) and run.metrics["count"].item() == 3


def _nan_metric_is_logged(run, tmp=None) -> None:
    trained(run)
    assert torch.isnan(run.metrics["ratio"]), "the NaN metric was not reported as it is"


def _zero_weight(run, tmp=None) -> None:
    untouched(run)
    assert run.metrics["loss"].item() == 0 and run.metrics["bc_weight"].item() == 0
    assert flag(run, "nonfinite") == 0


def _latents(batch: dict) -> dict:
    """The tiny policy's latents for ``batch`` from its initial memory."""
    policy = tiny_policy()
    return policy(batch, policy.initial_state(B))[0]


def _direct(objective: Callable, latents: Callable[[dict], dict] = _latents,
            batch: Callable[[], dict] = good_batch) -> Callable[[Any], Any]:
    """A ``run``: ``objective(batch, latents, {})`` called directly, outside a step."""

    def run(tmp):
        data = batch()
        return objective(data, latents(data), {})

    return run


def _gaussian(mu_shape=(B, 4), log_var_shape=(B, 4), dtype=torch.float32) -> dict:
    return {"mu": torch.zeros(mu_shape, dtype=dtype), "log_var": torch.zeros(log_var_shape, dtype=dtype)}


def _kl_latents(posterior: Any, prior: Any = None) -> Callable[[dict], dict]:
    return lambda batch: {"posterior_dist": posterior, "prior_dist": prior if prior is not None else _gaussian()}


def _camera_only_logits(batch: dict) -> dict:
    latents = _latents(batch)
    return {**latents, "pi_logits": {"buttons": latents["pi_logits"]["buttons"]}}


def _schedule(value: Any) -> Callable:
    return lambda step: value


def _nan_at_first_step(step):
    return torch.where(step == 0, float("nan"), 0.5)


def _refuse(name: str, run: Callable, error: type, *fragments: str) -> Case:
    return Case("objective", name, run, Refused(error, *fragments))


def _accept(name: str, run: Callable, check: Callable) -> Case:
    return Case("objective", name, run, Handled(check))


def _weighted(weight: Any) -> Callable[[Any], Any]:
    """A ``run``: build ``weighted(behavior_clone, weight)`` and take one step with it."""
    return lambda tmp: train_once(good_batch(), objective=losses.weighted(losses.behavior_clone, weight))


NAME = "draft_objective"

CASES = [
    # -- what an objective returns
    _refuse("returns-a-tensor", _with_objective(_returning(torch.tensor(1.0, requires_grad=True))), ValueError, NAME,
            "a dict with a 'loss' entry", "Tensor"),
    _refuse("returns-none", _with_objective(_returning(None)), ValueError, NAME, "'loss'", "NoneType"),
    _refuse("returns-a-tuple", _with_objective(_returning((torch.tensor(1.0),))), ValueError, NAME, "'loss'", "tuple"),
    _refuse("no-loss-key", _with_objective(_bc_with(total=lambda o: o["loss"], loss=None)), ValueError, NAME, "'loss'",
            "'total'"),
    _refuse("per-row-loss", _with_objective(_bc_with(loss=lambda o: o["loss"].expand(B))), ValueError, NAME,
            "float scalar 'loss'", "(2,)"),
    _refuse("one-element-loss", _with_objective(_bc_with(loss=lambda o: o["loss"].reshape(1))), ValueError, NAME,
            "float scalar 'loss'", "(1,)"),
    _refuse("integer-loss", _with_objective(_bc_with(loss=lambda o: o["loss"].long())), ValueError, NAME,
            "float scalar 'loss'", "torch.int64"),
    _refuse("python-float-loss", _with_objective(_bc_with(loss=lambda o: o["loss"].item())), ValueError, NAME,
            "float scalar 'loss'", "float"),
    _refuse("complex-loss", _with_objective(_bc_with(loss=lambda o: o["loss"] + 0j)), ValueError, NAME,
            "float scalar 'loss'", "complex64"),
    _refuse("str-metric", _with_objective(_bc_with(note=lambda o: "hello")), ValueError, NAME, "'note'",
            "scalar", "str"),
    _refuse("none-metric", _with_objective(_bc_with(note=lambda o: None)), ValueError, NAME, "'note'", "scalar",
            "NoneType"),
    _refuse("per-row-metric", _with_objective(_bc_with(per_row=lambda o: torch.ones(B))), ValueError, NAME,
            "'per_row'", "scalar", "(2,)"),
    _refuse("list-metric", _with_objective(_bc_with(pair=lambda o: [1.0, 2.0])), ValueError, NAME, "'pair'", "scalar",
            "list"),
    _refuse("non-str-key", _with_objective(_int_key), ValueError, NAME, "key", "str", "int"),
    _refuse("metric-named-grad-norm", _with_objective(_bc_with(grad_norm=lambda o: o["loss"].detach())), ValueError,
            NAME, "['grad_norm']", "reports itself"),
    _refuse("metric-named-lr", _with_objective(_bc_with(lr=lambda o: 1e-3)), ValueError, NAME, "['lr']",
            "reports itself"),
    _accept("python-number-metric", _with_objective(_bc_with(count=lambda o: 3)), _python_metric_is_a_tensor),
    _accept("numpy-metric", _with_objective(_bc_with(count=lambda o: np.float32(3))), _python_metric_is_a_tensor),
    _accept("metric-tracking-gradients", _with_objective(_bc_with(twice=lambda o: o["loss"] * 2)), _metrics_detached),
    _accept("nan-metric", _with_objective(_bc_with(ratio=lambda o: o["loss"] * float("nan"))), _nan_metric_is_logged),
    _accept("float64-loss", _with_objective(_bc_with(loss=lambda o: o["loss"].double())), trained),
    # -- what the loss depends on
    _refuse("constant-loss", _with_objective(_bc_with(loss=lambda o: torch.tensor(1.0))), ValueError, NAME,
            "depends on no trainable parameter"),
    _refuse("loss-of-a-foreign-leaf", _with_objective(_bc_with(loss=lambda o: torch.ones((), requires_grad=True) * 2)),
            ValueError, NAME, "depends on no trainable parameter"),
    _refuse("detached-loss", _with_objective(_bc_with(loss=lambda o: o["loss"].detach())), ValueError, NAME,
            "depends on no trainable parameter"),
    _refuse("writes-its-batch", _with_objective(_writes_mask), RuntimeError, "_writes_mask", "batch['mask']",
            "in place"),
    _refuse("not-callable", _with_objective("behavior_clone"), TypeError, "objective", "callable", "str"),
    # -- non-finite values: skipped by the guard, never applied
    _accept("nan-loss", _with_objective(_bc_with(loss=lambda o: o["loss"] * float("nan"))), skipped),
    _accept("inf-loss", _with_objective(_bc_with(loss=lambda o: o["loss"] + float("inf"))), skipped),
    _accept("minus-inf-loss", _with_objective(_bc_with(loss=lambda o: o["loss"] - float("inf"))), skipped),
    _accept("nan-gradient-finite-loss", _with_objective(_nan_gradient), skipped),
    _accept("nan-in-one-combined-term", _with_objective(losses.combine(
        losses.behavior_clone, _bc_with(loss=lambda o: o["loss"] * float("nan")))), skipped),
    _accept("nan-loss-unguarded-is-reported", _with_objective(_bc_with(loss=lambda o: o["loss"] * float("nan")),
                                                              skip_nonfinite=False),
            _reported_not_skipped),
    # -- the built-in objectives called directly
    _refuse("bc-without-pi-logits", _direct(losses.behavior_clone, latents=lambda b: {"vpred": None}), ValueError,
            "behavior_clone", "latents['pi_logits']", "latents has only"),
    _refuse("bc-without-camera-head", _direct(losses.behavior_clone, latents=_camera_only_logits), ValueError,
            "behavior_clone", "latents['pi_logits']['camera']", "has only ['buttons']"),
    _refuse("bc-mask-per-row", _direct(losses.behavior_clone, batch=lambda: {**good_batch(), "mask": torch.ones(B)}),
            ValueError, "batch['mask']", "(2, 3)", "(2,)"),
    _refuse("bc-float-actions", _direct(losses.behavior_clone, batch=lambda: {
        **good_batch(), "agent_action": {k: v.float() for k, v in good_batch()["agent_action"].items()}}),
        ValueError, "agent_action['buttons']", "integer", "torch.float32"),
    _refuse("kl-on-a-policy-without-posterior",
            _with_objective(losses.combine(losses.behavior_clone, losses.kl_gaussian)), ValueError, "kl_gaussian", "latents['posterior_dist']", "latents has only"),
    _refuse("kl-posterior-not-a-dict", _direct(losses.kl_gaussian, latents=_kl_latents(torch.zeros(B, 4))), ValueError,
            "kl_gaussian", "latents['posterior_dist']", "dict", "Tensor"),
    _refuse("kl-without-log-var", _direct(losses.kl_gaussian, latents=_kl_latents({"mu": torch.zeros(B, 4)})),
            ValueError, "kl_gaussian", "latents['posterior_dist']['log_var']"),
    _refuse("kl-integer-mean", _direct(losses.kl_gaussian, latents=_kl_latents(_gaussian(dtype=torch.int64))),
            ValueError, "kl_gaussian", "latents['posterior_dist']['mu']", "float", "torch.int64"),
    _refuse("kl-shapes-differ", _direct(losses.kl_gaussian, latents=_kl_latents(_gaussian(log_var_shape=(B, 5)))),
            ValueError, "one shape", "(2, 4)", "(2, 5)"),
    # -- weights
    _refuse("weight-nan", _weighted(float("nan")), ValueError, "weighted", "weight", "finite", "nan"),
    _refuse("weight-inf", _weighted(float("inf")), ValueError, "weighted", "weight", "finite", "inf"),
    _accept("weight-negative-is-ascent-on-purpose", _weighted(-0.5), _negated),
    _refuse("weight-str", _weighted("0.01"), TypeError, "weighted", "weight", "number", "str"),
    _refuse("weight-bool", _weighted(True), TypeError, "weighted", "weight", "number", "bool"),
    _refuse("weight-none", _weighted(None), TypeError, "weighted", "weight", "number", "NoneType"),
    _refuse("weight-tensor-with-grad", _weighted(torch.tensor(0.5, requires_grad=True)), TypeError, "weighted",
            "weight", "Hyperparam", "Tensor"),
    _refuse("hyperparam-default-nan", _weighted(losses.Hyperparam("w", float("nan"))), ValueError, "Hyperparam",
            "'w'", "finite", "nan"),
    _refuse("hyperparam-default-inf", _weighted(losses.Hyperparam("w", float("-inf"))), ValueError, "Hyperparam",
            "'w'", "finite", "-inf"),
    _refuse("hyperparam-default-str", _weighted(losses.Hyperparam("w", "1")), TypeError, "Hyperparam", "'w'",
            "number", "str"),
    _refuse("hyperparam-name-not-str", _weighted(losses.Hyperparam(3, 1.0)), TypeError, "Hyperparam", "name", "str",
            "int"),
    _refuse("schedule-returns-str", _weighted(_schedule("0.5")), TypeError, "weighted", "schedule", "number", "str"),
    _refuse("schedule-returns-vector", _weighted(_schedule(torch.ones(2))), ValueError, "weighted", "schedule", "0-d",
            "(2,)"),
    _accept("schedule-returns-nan", _weighted(_nan_at_first_step), skipped),
    _accept("numpy-weight", _weighted(np.float32(0.5)), same_as(good_batch, objective=losses.weighted(
        losses.behavior_clone, 0.5))),
    _accept("zero-weight", _weighted(0.0), _zero_weight),
    _refuse("weighted-not-callable", lambda tmp: losses.weighted("behavior_clone", 0.5), TypeError, "weighted",
            "objective", "callable", "str"),
    _refuse("combine-nothing", lambda tmp: losses.combine(), ValueError, "combine", "at least one objective"),
    _refuse("combine-not-callable", lambda tmp: losses.combine(losses.behavior_clone, 0.5), TypeError, "combine",
            "callable", "float"),
    _refuse("combine-two-defaults", lambda tmp: losses.combine(
        losses.weighted(losses.behavior_clone, losses.Hyperparam("w", 1.0)),
        losses.weighted(losses.kl_gaussian, losses.Hyperparam("w", 2.0))), ValueError, "'w'", "two defaults"),
]
