"""``step(state, batch, donate=True)``: the eager update in place, the pure contract kept for everyone else."""

import optree
import pytest
import torch

import losses
import mstudio
from mstudio.data.synthetic import random_batch
from mstudio.models import TinyPolicy

NAN_STEP = 2
EMA_DECAY = 0.5


def _batches(count=5):
    """Row 1 restarts its episode at batches 2 and 4, row 0 never does."""
    return [random_batch(2, 4, 16, seed=i, start=torch.tensor([4 * i, 4 * (i % 2)])) for i in range(count)]


def _nan_at(step):
    objective = losses.weighted(losses.behavior_clone, 0.01)

    def poisoned(batch, latents, params):
        out = objective(batch, latents, params)
        return {**out, "loss": out["loss"] * torch.where(batch[losses.STEP_KEY] == step, float("nan"), 1.0)}

    return poisoned


def _setup(objective=None):
    torch.manual_seed(0)
    policy = TinyPolicy(hidsize=16, image_size=16)
    optimizer = mstudio.optim.adamw(1e-3, weight_decay=0.1, warmup_steps=3, clip_norm=1.0)
    objective = objective or losses.weighted(losses.behavior_clone, 0.01)
    step = mstudio.make_train_step(policy, objective, optimizer, compile=False, ema_decay=EMA_DECAY)
    return step, lambda: mstudio.init_state(policy, optimizer, 2, ema=True)


def _run(donate, objective=None):
    step, fresh = _setup(objective)
    state, history = fresh(), []
    for batch in _batches():
        state, metrics = step(state, batch, donate=donate)
        history.append((optree.tree_map(torch.clone, state), {k: v.clone() for k, v in metrics.items()}))
    return history


def _close(a, b):
    for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b), strict=True):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("objective", [None, _nan_at(NAN_STEP)], ids=["bc", "nan_at_step_2"])
def test_donated_steps_match_the_pure_ones(objective):
    pure, donated = _run(False, objective), _run(True, objective)
    for (pure_state, pure_metrics), (state, metrics) in zip(pure, donated, strict=True):
        assert pure_metrics.keys() == metrics.keys()
        for key in pure_metrics:
            if key == "loss" and objective is not None:
                continue  # NaN at the poisoned step in both
            torch.testing.assert_close(metrics[key], pure_metrics[key], rtol=1e-5, atol=1e-7, equal_nan=True)
        _close(pure_state.params, state.params)
        _close(pure_state.opt_state, state.opt_state)
        _close(pure_state.ema, state.ema)
        _close(pure_state.memory, state.memory)
        assert torch.equal(pure_state.skipped_updates, state.skipped_updates)
    if objective is not None:  # the guard skipped the poisoned update on both paths, before writing anything
        assert donated[NAN_STEP][1]["nonfinite"].item() == 1
        assert donated[-1][0].skipped_updates.item() == 1
        assert all(optree.tree_leaves(optree.tree_map(torch.equal, donated[NAN_STEP - 1][0].params,
                                                      donated[NAN_STEP][0].params)))


def test_without_donation_the_input_state_is_untouched_bit_for_bit():
    step, fresh = _setup()
    state = fresh()
    for batch in _batches(2):
        before = optree.tree_map(torch.clone, state)
        new_state, _ = step(state, batch)
        assert all(optree.tree_leaves(optree.tree_map(torch.equal, before, state)))
        state = new_state


def test_a_donated_state_is_updated_in_place_and_refused_afterwards():
    step, fresh = _setup()
    batches = _batches(2)
    state = fresh()
    new_state, _ = step(state, batches[0], donate=True)
    name = next(iter(state.params))
    assert new_state.params[name].data_ptr() == state.params[name].data_ptr()  # no new parameter tensors
    with pytest.raises(RuntimeError, match="donated to an earlier step"):
        step(state, batches[1])
    with pytest.raises(RuntimeError, match="donated to an earlier step"):
        step(state, batches[1], donate=True)
    step(new_state, batches[1], donate=True)  # the returned state is the one to go on with
