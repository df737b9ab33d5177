"""The eager step's edges: an optional mask mid-run, the non-finite guard and the ``nonfinite`` metric, the EMA,
hyper-parameters as state."""

import optree
import pytest
import torch

import losses
import mstudio
from mstudio.batch import normalize_batch
from mstudio.data.synthetic import random_batch
from mstudio.train.step import train_step_function, value_and_grad_autograd
from tests.support.policies import CountingPolicy


def _make(objective=None, ema_decay=None, validate=True, **optimizer_kwargs):
    torch.manual_seed(0)
    policy = CountingPolicy()
    optimizer = mstudio.optim.adamw(1e-3, weight_decay=0.1, **optimizer_kwargs)
    objective = objective or losses.weighted(losses.behavior_clone, 0.01)
    state = mstudio.init_state(policy, optimizer, 2, objective=objective, ema=ema_decay is not None)
    return state, mstudio.make_train_step(policy, objective, optimizer, compile=False, ema_decay=ema_decay,
                                          validate=validate)


def _equal_trees(a, b) -> bool:
    return all(optree.tree_leaves(optree.tree_map(torch.equal, a, b)))


def test_an_optional_mask_may_appear_and_disappear_mid_run():
    batches = [random_batch(2, 4, 8, seed=i, start=4 * i) for i in range(3)]
    without = [{k: v for k, v in b.items() if k != "mask"} for b in batches]
    mixed = [without[0], without[1], batches[2]]  # MineStudio trains on such a stream
    results = []
    for stream in (mixed, batches):
        state, step = _make()
        for batch in stream:
            state, metrics = step(state, batch)
        results.append(state)
    assert _equal_trees(results[0].params, results[1].params)  # a missing mask is all ones


def test_a_nonfinite_loss_skips_the_update_and_training_continues():
    # validate=False skips the batch's value checks (which refuse an inf mask): the guard is what is left
    state, step = _make(validate=False)
    state, _ = step(state, random_batch(2, 4, 8, seed=0))
    poisoned = random_batch(2, 4, 8, seed=1, start=4)
    poisoned["mask"] = poisoned["mask"].float()
    poisoned["mask"][1, 2] = float("inf")
    after, metrics = step(state, poisoned)
    assert not torch.isfinite(metrics["loss"]) and metrics["skipped_updates"].item() == 1
    assert _equal_trees(after.params, state.params) and _equal_trees(after.opt_state, state.opt_state)
    assert after.step.item() == 2  # batches processed; the optimizer's own count did not move
    clean = random_batch(2, 4, 8, seed=2, start=8)
    clean["mask"] = clean["mask"].float()
    final, metrics = step(after, clean)
    assert torch.isfinite(metrics["loss"]) and metrics["skipped_updates"].item() == 1
    assert not _equal_trees(final.params, after.params)


def test_a_nonfinite_objective_is_guarded_too():
    def exploding(batch, latents, params):
        out = losses.behavior_clone(batch, latents, params)
        return {**out, "loss": out["loss"] * float("nan")}

    state, step = _make(objective=exploding)
    after, metrics = step(state, random_batch(2, 4, 8))
    assert metrics["skipped_updates"].item() == 1 and _equal_trees(after.params, state.params)


def test_ema_is_the_lerp_of_the_parameters():
    state, step = _make(ema_decay=0.9)
    ema = {k: v.clone() for k, v in state.params.items()}
    for i in range(3):
        state, _ = step(state, random_batch(2, 4, 8, seed=i, start=4 * i))
        ema = {k: torch.lerp(ema[k], state.params[k], 0.1) for k in ema}
    assert _equal_trees(state.ema, ema)


def test_ema_needs_both_switches():
    policy = CountingPolicy()
    optimizer = mstudio.optim.adamw(1e-3)
    step = mstudio.make_train_step(policy, losses.behavior_clone, optimizer, compile=False, ema_decay=0.99)
    with pytest.raises(ValueError, match="ema_decay"):
        step(mstudio.init_state(policy, optimizer, 2), random_batch(2, 4, 8))
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\)"):
        mstudio.make_train_step(policy, losses.behavior_clone, optimizer, ema_decay=1.0)


def test_set_hyperparams_changes_the_loss_weight_and_the_lr():
    objective = losses.weighted(losses.behavior_clone, losses.Hyperparam("bc_weight", 0.01))
    state, step = _make(objective=objective)
    batch = random_batch(2, 4, 8)
    _, before = step(state, batch)
    changed = mstudio.set_hyperparams(state, bc_weight=0.04, learning_rate=5e-3)
    _, after = step(changed, batch)
    assert after["bc_weight"].item() == pytest.approx(0.04) and after["lr"].item() == pytest.approx(5e-3)
    torch.testing.assert_close(after["loss"], before["loss"] * 4)
    assert state.hyperparams["bc_weight"].item() == 0.01  # the old state is unchanged
    with pytest.raises(KeyError, match="bc_wieght"):
        mstudio.set_hyperparams(state, bc_wieght=1.0)


def test_a_hyperparam_objective_needs_a_state_that_holds_it():
    objective = losses.weighted(losses.behavior_clone, losses.Hyperparam("bc_weight", 0.01))
    policy = CountingPolicy()
    optimizer = mstudio.optim.adamw(1e-3)
    step = mstudio.make_train_step(policy, objective, optimizer, compile=False)
    with pytest.raises(ValueError, match=r"init_state\(\.\.\., objective=objective\)"):
        step(mstudio.init_state(policy, optimizer, 2), random_batch(2, 4, 8))


def _nan_loss(batch, latents, params):
    out = losses.behavior_clone(batch, latents, params)
    return {**out, "loss": out["loss"] * float("nan")}


@pytest.mark.parametrize("skip_nonfinite", [True, False])
def test_the_bare_step_reports_nonfinite_whether_or_not_it_skips(skip_nonfinite):
    policy = CountingPolicy()
    optimizer = mstudio.optim.adamw(1e-3)
    state = mstudio.init_state(policy, optimizer, 2)
    step = mstudio.make_train_step(policy, _nan_loss, optimizer, compile=False, skip_nonfinite=skip_nonfinite)
    after, metrics = step(state, random_batch(2, 4, 8))
    assert metrics["nonfinite"].dim() == 0 and metrics["nonfinite"].dtype == torch.int64
    assert metrics["nonfinite"].item() == 1
    assert metrics["skipped_updates"].item() == int(skip_nonfinite)
    assert _equal_trees(after.params, state.params) == skip_nonfinite  # unguarded, the NaN reaches the parameters


def test_a_finite_step_reports_nonfinite_zero():
    state, step = _make()
    _, metrics = step(state, random_batch(2, 4, 8))
    assert metrics["nonfinite"].item() == 0 and metrics["skipped_updates"].item() == 0


def test_a_nan_learning_rate_is_nonfinite_although_loss_and_gradient_are_finite():
    # a schedule's NaN cannot be checked at the edge (it is a tensor of the step): the update norm shows it
    policy = CountingPolicy()
    optimizer = mstudio.optim.adamw(lambda step: torch.where(step == 0, float("nan"), 1e-3))
    state = mstudio.init_state(policy, optimizer, 2)
    step = mstudio.make_train_step(policy, losses.behavior_clone, optimizer, compile=False)
    after, metrics = step(state, random_batch(2, 4, 8))
    assert torch.isfinite(metrics["loss"]) and torch.isfinite(metrics["grad_norm"])
    assert metrics["nonfinite"].item() == 1 and _equal_trees(after.params, state.params)


def test_the_pure_step_computes_nonfinite_without_a_host_sync(monkeypatch):
    policy = CountingPolicy()
    optimizer = mstudio.optim.adamw(1e-3)
    state = mstudio.init_state(policy, optimizer, 2)
    batch = normalize_batch(random_batch(2, 4, 8))
    apply_fn, params, _ = mstudio.functionalize(policy)
    reached = frozenset(name for name in params if not name.startswith("value."))
    pure = train_step_function(apply_fn, _nan_loss, optimizer, reached, value_and_grad_autograd)
    syncs = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _o=original, _n=name, **k: (syncs.append(_n), _o(self, *a, **k))[1])
    _, metrics = pure(state, batch)
    monkeypatch.undo()
    assert syncs == [] and metrics["nonfinite"].item() == 1
