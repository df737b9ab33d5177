"""kl_gaussian against the closed-form KL between diagonal Gaussians, in float64."""

import math

import pytest
import torch

import losses


def _dists(B=4, D=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda: torch.randn(B, D, generator=gen, dtype=torch.float64)  # noqa: E731
    return {"posterior_dist": {"mu": make(), "log_var": make()}, "prior_dist": {"mu": make(), "log_var": make()}}


def _reference(latents):
    """KL(q || p) = sum_d [log(sp/sq) + (sq^2 + (mq - mp)^2) / (2 sp^2) - 1/2], averaged over rows."""
    q, p = latents["posterior_dist"], latents["prior_dist"]
    total = 0.0
    B, D = q["mu"].shape
    for b in range(B):
        for d in range(D):
            sq = math.exp(0.5 * q["log_var"][b, d].item())
            sp = math.exp(0.5 * p["log_var"][b, d].item())
            dm = q["mu"][b, d].item() - p["mu"][b, d].item()
            total += math.log(sp / sq) + (sq**2 + dm**2) / (2 * sp**2) - 0.5
    return total / B


def test_matches_closed_form():
    latents = _dists()
    out = losses.weighted(losses.kl_gaussian, 0.5)({}, latents, {})
    ref = _reference(latents)
    assert out["kl_div"].item() == pytest.approx(ref, rel=1e-12)
    assert out["loss"].item() == pytest.approx(0.5 * ref, rel=1e-12)
    assert out["kl_weight"].item() == 0.5


def test_zero_for_equal_distributions():
    latents = _dists()
    latents["prior_dist"] = {k: v.clone() for k, v in latents["posterior_dist"].items()}
    assert losses.kl_gaussian({}, latents, {})["kl_div"].item() == pytest.approx(0.0, abs=1e-12)


def test_gradcheck():
    latents = _dists(B=2, D=3)
    leaves = [latents[d][k].requires_grad_() for d in ("posterior_dist", "prior_dist") for k in ("mu", "log_var")]

    def f(q_mu, q_lv, p_mu, p_lv):
        lat = {"posterior_dist": {"mu": q_mu, "log_var": q_lv}, "prior_dist": {"mu": p_mu, "log_var": p_lv}}
        return losses.kl_gaussian({}, lat, {})["loss"]

    assert torch.autograd.gradcheck(f, tuple(leaves))


def test_missing_and_mismatched_inputs():
    latents = _dists()
    del latents["prior_dist"]["log_var"]
    with pytest.raises(ValueError, match=r"latents\['prior_dist'\]\['log_var'\]"):
        losses.kl_gaussian({}, latents, {})
    latents = _dists()
    latents["prior_dist"]["mu"] = torch.zeros(4, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="one shape"):
        losses.kl_gaussian({}, latents, {})
