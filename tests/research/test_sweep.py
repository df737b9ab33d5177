"""SweepStep: K variants trained in one vmapped call equal K separate runs of make_train_step."""

import pytest
import torch

import losses
import mstudio
from mstudio.data.synthetic import random_batch
from mstudio.models import TinyPolicy
from mstudio.optim import adamw
from mstudio.research import SweepStep, stack_states, unstack_state

B, T, SIZE = 2, 3, 16
OBJECTIVE = losses.combine(losses.behavior_clone, losses.weighted(losses.kl_gaussian, losses.Hyperparam("kl", 0.5)))
VARIANTS = [{"kl": 0.0}, {"kl": 0.5, "learning_rate": 3e-3}, {"kl": 2.0, "learning_rate": 1e-3}]


class GaussianTiny(TinyPolicy):
    """TinyPolicy plus posterior and prior Gaussians from its features, so a KL term has something to pull."""

    def __init__(self):
        super().__init__(hidsize=8, image_size=SIZE)
        self.posterior = torch.nn.Linear(8, 4)

    def forward(self, batch, state_in):
        latents, state_out = super().forward(batch, state_in)
        mean = self.posterior(state_out[0])
        latents["posterior_dist"] = {"mu": mean, "log_var": mean * 0.1}
        latents["prior_dist"] = {"mu": torch.zeros_like(mean), "log_var": torch.zeros_like(mean)}
        return latents, state_out


def _batches(count=4):
    # row 1 restarts at batch 2: the reset rule must hold per variant
    return [random_batch(B, T, SIZE, seed=i, start=torch.tensor([i * T, (i % 2) * T])) for i in range(count)]


def _separate_runs(policy, optimizer, batches):
    finals = []
    for values in VARIANTS:
        step = mstudio.make_train_step(policy, OBJECTIVE, optimizer, compile=False)
        state = mstudio.set_hyperparams(mstudio.init_state(policy, optimizer, B, objective=OBJECTIVE), **values)
        for batch in batches:
            state, metrics = step(state, batch)
        finals.append((state, metrics))
    return finals


def _assert_same(swept, separate, initial, tolerance):
    """Each parameter's total update within ``tolerance`` (relative L2) of the separate run's: float32 gradients by
    torch.func (vmapped) and by autograd (the eager step) differ in the last bits, which Adam's normalisation
    lifts to ~1e-5 of the update after a few steps."""
    for name, p in separate.params.items():
        update = p - initial.params[name]
        error = (swept.params[name] - p).norm() / update.norm().clamp_min(1e-12)
        assert error <= tolerance, f"{name}: relative error of the update {error:.2e}"
    for a, b in zip(swept.memory, separate.memory):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert torch.equal(swept.step, separate.step) and torch.equal(swept.last_timestamp, separate.last_timestamp)


def test_a_sweep_of_three_weightings_equals_three_separate_runs():
    torch.manual_seed(0)
    policy, optimizer, batches = GaussianTiny(), adamw(1e-2, clip_norm=1.0), _batches()
    sweep = SweepStep(policy, OBJECTIVE, optimizer, compile=False)
    states = sweep.init(B, VARIANTS)
    for batch in batches:
        states, metrics = sweep(states, batch)
    assert metrics["loss"].shape == (3,)
    initial = unstack_state(sweep.init(B, VARIANTS), 0)
    for k, (separate, separate_metrics) in enumerate(_separate_runs(policy, optimizer, batches)):
        _assert_same(unstack_state(states, k), separate, initial, tolerance=1e-4)
        torch.testing.assert_close(metrics["loss"][k], separate_metrics["loss"], rtol=1e-5, atol=1e-6)
    assert not torch.equal(unstack_state(states, 0).params["posterior.weight"],
                           unstack_state(states, 2).params["posterior.weight"])


@pytest.mark.slow
def test_the_compiled_sweep_equals_separate_runs():
    torch.manual_seed(0)
    policy, optimizer, batches = GaussianTiny(), adamw(1e-2, clip_norm=1.0), _batches(3)
    sweep = SweepStep(policy, OBJECTIVE, optimizer, compile=True)
    states = sweep.init(B, VARIANTS)
    for batch in batches:
        states, _ = sweep(states, batch)
    initial = unstack_state(sweep.init(B, VARIANTS), 0)
    for k, (separate, _) in enumerate(_separate_runs(policy, optimizer, batches)):
        _assert_same(unstack_state(states, k), separate, initial, tolerance=1e-4)


def test_stacking_checks():
    policy, optimizer = GaussianTiny(), adamw(1e-2)
    with pytest.raises(ValueError, match="at least one state"):
        stack_states([])
    with_ema = mstudio.init_state(policy, optimizer, B, ema=True)
    without = mstudio.init_state(policy, optimizer, B)
    with pytest.raises(ValueError, match="one structure"):
        stack_states([with_ema, without])
    states = stack_states([without, without])
    with pytest.raises(IndexError, match="variant 2 out of range for a sweep of 2"):
        unstack_state(states, 2)
    with pytest.raises(ValueError, match="at least one variant"):
        SweepStep(policy, OBJECTIVE, optimizer, compile=False).init(B, [])
    with pytest.raises(KeyError, match="no hyper-parameter"):
        SweepStep(policy, OBJECTIVE, optimizer, compile=False).init(B, [{"nope": 1.0}])
