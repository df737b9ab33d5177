"""mstudio.research: every gradient tool against a plain autograd computation, a loop, or finite differences."""

import pytest
import torch

import losses
import mstudio
from mstudio.data.synthetic import random_batch
from mstudio.models import TinyPolicy
from mstudio.optim import adamw
from mstudio.train.state import objective_batch
from mstudio.research import (
    curvature,
    diagnose,
    gradient_noise_scale,
    gradient_similarity,
    hessian_vector_product,
    loss_function,
    objective_gradients,
    per_sample_gradients,
    term,
)

B, T, SIZE = 3, 4, 16


def l2_weights(batch, latents, params):
    """A term that reads the parameters directly (no latent): its gradient never passes through the policy."""
    loss = sum(p.square().sum() for p in params.values()) * 1e-3
    return {"loss": loss}


def _setup(dtype=torch.float32):
    """A TinyPolicy state after one step, and a batch whose row 1 starts a new episode (its memory resets)."""
    policy = TinyPolicy(hidsize=8, image_size=SIZE).to(dtype)
    state = mstudio.init_state(policy, adamw(1e-2), B)
    step = mstudio.make_train_step(policy, losses.behavior_clone, adamw(1e-2), compile=False)
    state, _ = step(state, random_batch(B, T, SIZE, seed=1))
    batch = random_batch(B, T, SIZE, seed=2, start=torch.tensor([T, 0, T]))
    batch["mask"][2, -1] = 0
    return policy, state, batch


def _autograd(policy, objective, state, batch):
    """The objective's gradient the long way: the step's memory rule written out, torch.autograd.grad."""
    restart = batch["timestamp"][:, 0] != state.last_timestamp + 1
    memory = tuple(torch.where(restart[:, None], i, m) for m, i in zip(state.memory, state.init_memory))
    params = {k: v.detach().requires_grad_() for k, v in state.params.items()}
    latents, _ = torch.func.functional_call(policy, ({**params, **state.buffers}), (batch, memory))
    seen = objective_batch(batch, state)
    loss = objective(seen, latents, params)["loss"]
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {k: torch.zeros_like(params[k]) if g is None else g for k, g in zip(params, grads)}


def test_objective_gradients_equal_autograd_for_each_objective():
    policy, state, batch = _setup()
    objectives = {"bc": losses.behavior_clone, "l2": l2_weights,
                  "both": losses.combine(losses.weighted(losses.behavior_clone, 0.5), l2_weights)}
    grads, outputs = objective_gradients(policy, objectives, state, batch)
    for name, objective in objectives.items():
        expected = _autograd(policy, objective, state, batch)
        for key in expected:
            torch.testing.assert_close(grads[name][key], expected[key], rtol=1e-5, atol=1e-6, msg=f"{name} {key}")
    assert set(outputs["bc"]) >= {"loss", "camera_loss", "button_loss"}


def test_cosine_with_itself_is_one_and_with_its_negation_minus_one():
    policy, state, batch = _setup()
    objectives = {"bc": losses.behavior_clone, "same": losses.weighted(losses.behavior_clone, 3.0),
                  "negated": losses.weighted(losses.behavior_clone, -1.0), "l2": l2_weights}
    similarity = gradient_similarity(objective_gradients(policy, objectives, state, batch)[0])
    assert similarity["grad_cosine/bc__same"].item() == pytest.approx(1.0, abs=1e-9)
    assert similarity["grad_cosine/bc__negated"].item() == pytest.approx(-1.0, abs=1e-9)
    assert similarity["grad_norm/same"].item() == pytest.approx(3 * similarity["grad_norm/bc"].item(), rel=1e-5)
    assert -1 < similarity["grad_cosine/bc__l2"].item() < 1


def test_similarity_matches_its_formula_and_a_zero_gradient_has_cosine_zero():
    a = {"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([4.0, -3.0]), "b": torch.tensor([5.0])}
    zero = {"w": torch.zeros(2), "b": torch.zeros(1)}
    out = gradient_similarity({"a": a, "b": b, "zero": zero})
    assert out["grad_norm/a"].item() == 5.0 and out["grad_norm/b"].item() == pytest.approx(50 ** 0.5)
    assert out["grad_cosine/a__b"].item() == 0.0
    assert out["grad_cosine/a__zero"].item() == 0.0
    assert sorted(out) == ["grad_cosine/a__b", "grad_cosine/a__zero", "grad_cosine/b__zero",
                           "grad_norm/a", "grad_norm/b", "grad_norm/zero"]


def test_per_sample_gradients_equal_a_loop_of_single_row_gradients():
    policy, state, batch = _setup()
    per_sample = per_sample_gradients(policy, losses.behavior_clone, state, batch, chunk_size=2)
    for row in range(B):
        one = {k: v[row:row + 1] for k, v in batch.items() if k != "agent_action"}
        one["agent_action"] = {k: v[row:row + 1] for k, v in batch["agent_action"].items()}
        row_state = state._replace(
            memory=tuple(m[row:row + 1] for m in state.memory), init_memory=tuple(m[row:row + 1] for m in state.init_memory),
            last_timestamp=state.last_timestamp[row:row + 1])
        expected = _autograd(policy, losses.behavior_clone, row_state, one)
        for key in expected:
            torch.testing.assert_close(per_sample[key][row], expected[key], rtol=1e-4, atol=1e-6, msg=f"row {row} {key}")


def test_per_time_step_gradients_add_up_to_the_row_gradient_and_skip_padding():
    policy, state, batch = _setup()
    per_row = per_sample_gradients(policy, losses.behavior_clone, state, batch)
    per_step = per_sample_gradients(policy, losses.behavior_clone, state, batch, over_time=True)
    for key in per_row:
        assert per_step[key].shape == (B, T, *state.params[key].shape)
        torch.testing.assert_close(per_step[key].sum(1), per_row[key], rtol=1e-4, atol=1e-5)
    assert all(per_step[key][2, -1].abs().max() == 0 for key in per_step)  # masked out: no gradient


def test_per_time_step_gradients_need_a_mask():
    policy, state, batch = _setup()
    del batch["mask"]
    with pytest.raises(ValueError, match=r"over_time=True.*batch\['mask'\]"):
        per_sample_gradients(policy, losses.behavior_clone, state, batch, over_time=True)


def test_gradient_noise_scale_matches_its_formula():
    gen = torch.Generator().manual_seed(0)
    grads = {"a": torch.randn(5, 3, generator=gen) + 2.0, "b": torch.randn(5, 2, generator=gen)}
    matrix = torch.cat([grads["a"], grads["b"]], 1).double()
    mean = matrix.mean(0)
    trace = sum(((row - mean) ** 2).sum() for row in matrix) / 4
    sq_norm = (mean ** 2).sum() - trace / 5
    out = gradient_noise_scale(grads)
    assert out["trace_covariance"].item() == pytest.approx(trace.item(), rel=1e-12)
    assert out["noise_scale"].item() == pytest.approx((trace / sq_norm).item(), rel=1e-12)
    noise_only = gradient_noise_scale({"a": torch.tensor([[1.0], [-1.0]])})
    assert noise_only["noise_scale"].item() == float("inf")
    with pytest.raises(ValueError, match="at least 2"):
        gradient_noise_scale({"a": torch.ones(1, 3)})


def test_hessian_vector_product_equals_finite_differences():
    policy, state, batch = _setup(torch.float64)
    loss = loss_function(policy, losses.behavior_clone, state, batch)
    params = dict(state.params)
    gen = torch.Generator().manual_seed(3)
    vector = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}
    hv = hessian_vector_product(loss, params, vector)
    eps = 1e-7  # small: a larger step crosses ReLU kinks, where the gradient jumps
    grad = torch.func.grad(loss)
    plus = grad({k: p + eps * vector[k] for k, p in params.items()})
    minus = grad({k: p - eps * vector[k] for k, p in params.items()})
    for key in params:
        torch.testing.assert_close(hv[key], (plus[key] - minus[key]) / (2 * eps), rtol=1e-5, atol=1e-6)
    along_gradient = curvature(loss, params)
    g = grad(params)
    hg = hessian_vector_product(loss, params, g)
    expected = sum((g[k] * hg[k]).sum() for k in g) / sum((g[k] ** 2).sum() for k in g)
    assert along_gradient["curvature"].item() == pytest.approx(expected.item(), rel=1e-10)


def test_bc_terms_add_up_to_bc_and_diagnose_reports_them():
    policy, state, batch = _setup()
    objectives = {"bc": losses.behavior_clone, "camera": term(losses.behavior_clone, "camera_loss"),
                  "buttons": term(losses.behavior_clone, "button_loss")}
    grads, _ = objective_gradients(policy, objectives, state, batch)
    for key in grads["bc"]:
        torch.testing.assert_close(grads["camera"][key] + grads["buttons"][key], grads["bc"][key], rtol=1e-5, atol=1e-6)
    report = diagnose(policy, objectives, state, batch)
    assert set(report) == {"loss/bc", "loss/camera", "loss/buttons", "grad_norm/bc", "grad_norm/camera",
                           "grad_norm/buttons", "grad_cosine/bc__camera", "grad_cosine/bc__buttons",
                           "grad_cosine/camera__buttons"}
    assert report["loss/camera"] + report["loss/buttons"] == pytest.approx(report["loss/bc"].item(), rel=1e-6)
    with pytest.raises(KeyError, match=r"behavior_clone.*'nope'.*camera_loss"):
        term(losses.behavior_clone, "nope")(objective_batch(batch, state), policy(batch, state.memory)[0], {})
